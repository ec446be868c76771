"""Kernel plan -> a TileLang module (source text): per plan kernel, a factory that takes the
compile-time sizes and returns its `@T.prim_func`. The kernels have the Triton backend's
semantics and arguments (see codegen/triton/kernels.py.j2); statements come from body.py and
printer.py, one printer method per IR op."""
from __future__ import annotations

from dataclasses import dataclass

from ...ir.nodes import TensorDecl
from ...passes.plan import KernelPlan, Plan, StatePlan
from ...version import __version__
from .. import template
from .body import F32, IN, Body, Buffer
from .printer import UNSUPPORTED, TileLangPrinter, broadcast_index
from .schedule import leaves, schedule

_RESERVED = ("T", "tilelang", "H", "C", "BLOCK", "dtype", "threads", "num_stages", "is_varlen", "has_init",
             "store_final", "store_history", "pid_s", "pid_p", "i_bh", "i_b", "i_h", "i_c", "c_lo", "c_hi",
             "n_valid", "bos", "T_seq", "c_base", "n_chunks_seq", "T_total", "T_pad", "seg", "cu", "chunk_off",
             "chunks_per_seg", "n_segments", "n_bh", "i0", "i1", "i2", "i_row", "i_ch", "decay_span")
# arguments after the params, as the Triton kernels take them (minus what a shape carries)
COMMON = ("T_pad", "chunks_per_seg", "n_segments", "n_bh", "cu", "chunk_off")


def _history_dtype(state) -> str:
    """As runtime.checks.history_dtype: matrix states in the kernel's `hist_dtype` (16-bit on a GPU),
    vector and scalar states in fp32."""
    return "hist_dtype" if len(state.dims) >= 2 else '"float32"'


def factory_name(spec_name: str, kernel: str) -> str:
    return f"{spec_name}_{kernel}"


@dataclass
class _KernelView:
    factory: str
    fn: str
    plan: KernelPlan
    dynamic: list[str]  # symbolic sizes bound from the tensors' shapes
    params: list[str]  # the prim_func's arguments, in the order the runtime passes them
    grid: str
    gemms: str  # the (M, N) of its gemms, as a Python expression over the sizes
    padded: dict[str, str]  # a masked dim's tile size (K_P = the next power of two >= 16), from its real size
    pass_configs: dict
    allocs: list[str]
    prelude: list[str]  # per-program scalars
    consts: dict[str, str]  # factory-level constants of the sizes
    init: dict[str, tuple[list[str], list[str]]]  # walk: state -> (lines with an initial state, without)
    prologue: list[str]  # walk: fold earlier segments; summary: zero state, unit decay
    history: list[str]  # walk: store the state entering the chunk
    loads: list[str]
    body: list[str]
    stores: list[str]
    carry: list[str]
    epilogue: list[str]


def state_roles(kp: KernelPlan) -> tuple[str, ...]:
    return (("init", "final", "hist") if kp.role == "walk" else ()) + ("segw", "segd")


def kernel_params(spec, kp: KernelPlan) -> list[str]:
    """Argument names of a kernel, in call order (the runtime passes them in this order)."""
    names = [f"{d.name}_in" for d in kp.loads] + [f"{o.name}_out" for o in kp.stores]
    names += [f"{s.name}_{role}" for s in kp.states for role in state_roles(kp)]
    return names + [f"p_{p}" for p in kp.params] + list(COMMON)


def _all(conds) -> str:
    return " and ".join(conds)


class _Kernel:
    def __init__(self, plan: Plan, kp: KernelPlan, printer: TileLangPrinter, masked: frozenset):
        self.plan, self.kp, self.spec = plan, kp, plan.spec
        self.split = plan.split_dim
        self.sched = schedule(kp, printer.types)
        self.body = Body(printer, self.sched, self.split, masked)
        self.body.reserve(_RESERVED + tuple(kernel_params(self.spec, kp)) + tuple(self.spec.dims))
        self.state_buf: dict[str, Buffer] = {}
        self.decay_buf: dict[str, Buffer] = {}

    # -- indexing -------------------------------------------------------------------------------
    def _feat(self, dims, ivars) -> list[str]:
        return [f"pid_s * BLOCK + {i}" if d == self.split else i for d, i in zip(dims, ivars)]

    def _state_index(self, s: StatePlan, lead: str, ivars) -> str:
        return f"[{', '.join([lead] + self._feat(s.dims, ivars))}]"

    # -- sections ---------------------------------------------------------------------------------
    def _declare_states(self) -> None:
        b = self.body
        for s in self.kp.states:
            decl = next(d for d in self.spec.states if d.name == s.name)
            shape = b.extents(decl.tile.shape)
            scope = "fragment" if len(s.dims) == 2 else "shared"  # vectors and scalars: readable anywhere
            self.state_buf[s.name] = b.where[s.name] = b.alloc(f"st_{s.name}", shape, scope, F32)
            if self.kp.role == "summary":
                self.decay_buf[s.name] = b.alloc(f"d_{s.name}", shape, "fragment", F32)

    def _state_loop(self, buf: Buffer, lvalue, value, guard=None) -> None:
        self.body.loop(buf.shape, lvalue, value, guard)
        self.body.wrote(buf.name)

    def _real_guard(self, buf: Buffer):
        """A loop guard keeping the entries of `buf` that the tensors have (None: all of them)."""
        return (lambda iv: _all(self.body.real(buf.shape, iv))) if self.body.has_padding(buf.shape) else None

    def _walk_init(self, s: StatePlan) -> tuple[list[str], list[str]]:
        buf, b = self.state_buf[s.name], self.body
        with_init = b.section()

        def initial(iv):  # entries past a masked dim's real size start at 0 (the tensor has none)
            text = f"{s.name}_init{self._state_index(s, 'i_b, i_h', iv)}"
            for c in reversed(b.real(buf.shape, iv)):
                text = f"T.if_then_else({c}, {text}, 0.0)"
            return text

        self._state_loop(buf, lambda iv: f"{buf.name}[{', '.join(iv)}]", initial)
        without = b.section()
        b.stmt(f"T.clear({buf.name})")
        return with_init, without

    def _prologue(self) -> list[str]:
        b = self.body
        lines = b.section()
        for s in self.kp.states:
            buf = self.state_buf[s.name]
            if self.kp.role == "walk":
                b.stmt("for seg in T.serial(pid_p):  # fold the summaries of earlier segments")
                start = len(lines)
                self._state_loop(buf, lambda iv: f"{buf.name}[{', '.join(iv)}]",
                                 lambda iv: (f"{b.load(buf, iv)} * {s.name}_segd{self._state_index(s, 'i_bh, seg', iv)}"
                                             f" + {s.name}_segw{self._state_index(s, 'i_bh, seg', iv)}"),
                                 guard=self._real_guard(buf))
                lines[start:] = ["    " + ln for ln in lines[start:]]
            else:
                b.stmt(f"T.clear({buf.name})")
                b.stmt(f"T.fill({self.decay_buf[s.name].name}, 1.0)")
        return lines

    def _history(self) -> list[str]:
        lines = self.body.section()
        for s in self.kp.states:  # the state entering each chunk, for the backward
            buf = self.state_buf[s.name]
            self._store_state(buf, lambda iv, s=s: f"{s.name}_hist{self._state_index(s, 'c_base + i_c, i_h', iv)}",
                              dtype=_history_dtype(s))
        return lines

    def _loads(self) -> list[str]:
        """Per-chunk tiles of the inputs. Rows past the sequence's end read 0 (in a batch they belong to
        the next sequence); when every chunk is whole (`aligned`), bulk copies that TileLang can pipeline."""
        b = self.body
        lines = b.section()
        b.stmt("if aligned:")
        bufs = []

        def src(d, buf, tokens: bool):
            """Element by element: 0 on padded tokens (`tokens`) and on a masked dim's padded columns."""
            def value(iv):
                index = ", ".join([f"bos + i_c * C + {iv[0]}", self._head(d)] + self._feat(d.feature_dims, iv[1:]))
                text = f"{d.name}_in[{index}]"
                conds = b.real(buf.shape, iv) if tokens else b.real(buf.shape[1:], iv[1:])
                for c in reversed(conds):
                    text = f"T.if_then_else({c}, {text}, T.Cast(dtype, 0))"
                return text
            return value

        for d in self.kp.loads:
            buf = b.alloc(f"x_{d.name}", b.extents(d.tile.shape), "shared", IN)
            b.where[d.name] = buf
            b.loads.add(d.name)
            bufs.append((d, buf))
            start = len(lines)
            if b.has_padding(buf.shape[1:]):  # masked columns: no bulk copy past the tensor's last column
                b.loop(buf.shape, lambda iv, buf=buf: f"{buf.name}[{', '.join(iv)}]", src(d, buf, tokens=False))
                lines[start:] = ["    " + ln for ln in lines[start:]]
                continue
            feats = ["pid_s * BLOCK:(pid_s + 1) * BLOCK" if f == self.split else f"0:{f}" for f in d.feature_dims]
            region = ", ".join(["bos + i_c * C:bos + (i_c + 1) * C", self._head(d)] + feats)
            b.stmt(f"    T.copy({d.name}_in[{region}], {buf.name})")
        b.stmt("else:")
        start = len(lines)
        for d, buf in bufs:
            b.loop(buf.shape, lambda iv, buf=buf: f"{buf.name}[{', '.join(iv)}]", src(d, buf, tokens=True))
        lines[start:] = ["    " + ln for ln in lines[start:]]
        if not bufs:
            lines.clear()
        return lines

    def _head(self, d) -> str:
        return f"i_h // (H // HX_{d.name})"

    def _body(self) -> list[str]:
        b, sched = self.body, self.sched
        lines = b.section()
        for op in self.kp.ops:
            if op.out in sched.deferred or op.out not in sched.anchors:
                continue
            if op.out in sched.accumulate:
                self._accumulate(op)
            else:
                b.printer.emit(op, b)
        return lines

    def _accumulate(self, op) -> None:
        b, sched = self.body, self.sched
        acc = sched.accumulate[op.out]
        if op.out in sched.in_place:
            target = self.state_buf[sched.in_place[op.out]]
        elif op.out in sched.reuse:
            target = b.where[sched.reuse[op.out]]
        else:
            target = b.alloc(f"f_{op.out}", b.extents(op.type.shape), "fragment", F32)

        def start() -> str:  # after the gemm's operands are staged: they may read the entering state
            if b.where.get(acc.other) is not target:
                b.assign(target, acc.other)
            return target.name

        b.printer.emit_matmul(acc.matmul, b, into=start, clear=False)
        b.where[op.out] = target

    def _stores(self) -> list[str]:
        b = self.body
        lines = b.section()
        for o in self.kp.stores:
            shape = b.extents(o.tile.shape)
            lvalue = (lambda iv, o=o: f"{o.name}_out[{', '.join([f'bos + i_c * C + {iv[0]}', 'i_h'] + self._feat(o.feature_dims, iv[1:]))}]")
            b.loop(shape, lvalue, lambda iv, o=o: b.read(o.name, iv), guard=lambda iv, shape=shape: _all(b.real(shape, iv)),
                   dtype=IN)
        return lines

    def _carry(self) -> list[str]:
        b, sched, states = self.body, self.sched, self.kp.states
        lines = b.section()
        types = b.printer.types
        for s in states:  # the summary's product of decays over its chunks
            if self.kp.role == "summary" and s.decay is not None:
                d = self.decay_buf[s.name]
                shape = types[s.name].shape
                value = (lambda iv, d=d, s=s: f"{b.load(d, iv)} * "
                         + (b.printer.const(s.decay) if isinstance(s.decay, float)
                            else b.read(s.decay, broadcast_index(shape, types[s.decay].shape, iv))))
                b.loop(d.shape, lambda iv, d=d: f"{d.name}[{', '.join(iv)}]", value)
        pending = []
        for i, s in enumerate(states):
            buf = self.state_buf[s.name]
            if b.where.get(s.next) is buf:
                continue  # accumulated in place
            later = any(s.name in leaves(sched, t.next) for t in states[i + 1:])
            selfref = buf.scope == "shared" and s.name in leaves(sched, s.next)
            target = buf
            if later or selfref:  # others still read the entering value
                target = b.alloc(f"n_{s.name}", buf.shape, buf.scope, F32)
                pending.append((target, buf))
            b.assign(target, s.next)
        for tmp, buf in pending:
            b.fill(buf, lambda iv, tmp=tmp: b.load(tmp, iv))
        return lines

    def _epilogue(self) -> list[str]:
        b = self.body
        lines = b.section()
        for s in self.kp.states:
            buf = self.state_buf[s.name]
            if self.kp.role == "walk":
                lead = "i_b, i_h"
                self._store_state(buf, lambda iv, s=s: f"{s.name}_final{self._state_index(s, lead, iv)}")
            else:
                d = self.decay_buf[s.name]
                self._store_state(buf, lambda iv, s=s: f"{s.name}_segw{self._state_index(s, 'i_bh, pid_p', iv)}")
                self._store_state(d, lambda iv, s=s: f"{s.name}_segd{self._state_index(s, 'i_bh, pid_p', iv)}")
        return lines

    def _store_state(self, buf: Buffer, lvalue, dtype: str = F32) -> None:
        self.body.loop(buf.shape, lvalue, lambda iv: self.body.load(buf, iv), guard=self._real_guard(buf), dtype=dtype)

    # -- the kernel -------------------------------------------------------------------------------
    def _param_type(self, name: str) -> str:
        """The prim_func type of argument `name` of kernel_params, the one list the runtime passes too."""
        spec, kp = self.spec, self.kp
        if name in _SCALARS:
            return _SCALARS[name]
        if name.startswith("p_"):
            return "T.float32"
        for d in kp.loads:
            if name == f"{d.name}_in":
                return f"T.Tensor({_shape(d, f'HX_{d.name}')}, dtype)"
        for o in kp.stores:
            if name == f"{o.name}_out":
                return f"T.Tensor({_shape(o, 'H')}, dtype)"
        for s in kp.states:
            for role in state_roles(kp):
                if name == f"{s.name}_{role}":
                    dtype = _history_dtype(s) if role == "hist" else '"float32"'
                    return f"T.Tensor(({', '.join((f'{name}_n0', f'{name}_n1') + s.dims)},), {dtype})"
        raise AssertionError(f"kernel_params names '{name}', which _param_type does not type")

    def view(self) -> _KernelView:
        kp, spec = self.kp, self.spec
        self._declare_states()
        init = {s.name: self._walk_init(s) for s in kp.states} if kp.role == "walk" else {}
        prologue = self._prologue()
        history = self._history() if kp.role == "walk" else []
        loads = self._loads()
        body = self._body()
        stores = self._stores()
        carry = self._carry()
        epilogue = self._epilogue()
        # a tensor's leading sizes are symbols of its own: an unused one is passed as a small dummy
        dynamic = ["T_total", "cu_n", "chunk_off_n"] + [f"{s.name}_{role}_n{i}" for s in kp.states
                                                        for role in state_roles(kp) for i in (0, 1)]
        params = [f"{name}: {self._param_type(name)}" for name in kernel_params(spec, kp)]
        n_split = "1"
        if self.split:  # a split dim that BLOCK does not divide: its last block is masked
            n_split = f"({self.split} + BLOCK - 1) // BLOCK" if self.split in self.body.masked else f"{self.split} // BLOCK"
        programs = "n_segments" if kp.role == "walk" else "n_segments - 1"
        return _KernelView(
            factory=factory_name(spec.name, kp.name), fn=f"{spec.name}_{kp.name}_kernel", plan=kp,
            dynamic=dynamic, params=params, grid=f"{n_split}, n_bh, {programs}",
            gemms="[" + ", ".join(f"({m}, {n})" for m, n in dict.fromkeys(self.body.gemm_shapes)) + "]",
            padded={f"{d}_P": f"max(16, 1 << max(0, {d} - 1).bit_length())"
                    for d in self.spec.dims if d in self.body.masked and d != self.split},
            pass_configs=dict(sorted(self.body.pass_configs.items())), allocs=self.body.allocs,
            prelude=self.body.prelude, consts=self.body.consts,
            init=init, prologue=prologue, history=history, loads=loads, body=body, stores=stores, carry=carry,
            epilogue=epilogue)


_SCALARS = {"T_pad": "T.int32", "chunks_per_seg": "T.int32", "n_segments": "T.int32", "n_bh": "T.int32",
            "cu": 'T.Tensor((cu_n,), "int32")', "chunk_off": 'T.Tensor((chunk_off_n,), "int32")'}


def _shape(d: TensorDecl, heads: str) -> str:
    """Tokens of all sequences on one axis, as the Triton kernels index them."""
    return "(" + ", ".join(["T_total", heads, *d.feature_dims]) + ",)"


FORWARD = ("summary", "walk")  # the derived backward kernel is Triton-only for now
# the forward kernels of plans for general transitions (passes.fusion, passes.hoist), and why they are not here
# (`out` is not emitted either: its walk keeps merge fused, and the launcher refuses defer_merge)
_NOT_EMITTED = {"prep": "a chunk-parallel kernel for values hoisted out of the walk (in-chunk solves)"}


def _refuse_what_cannot_be_emitted(plan: Plan) -> None:
    """An unsupported tile op is named first (the most specific reason), then a kernel kind."""
    forward = [k for k in plan.kernels if not k.backward]
    for kp in forward:
        for op in kp.ops:
            if op.kind in UNSUPPORTED:
                raise TileLangPrinter(plan.spec, kp.types(plan.spec)).refuse(op)
    for kp in forward:
        if kp.name in _NOT_EMITTED:
            raise NotImplementedError(f"the TileLang backend has no '{kp.name}' kernel ({_NOT_EMITTED[kp.name]}); "
                                      "the Triton backend has")


def emit_module(plan: Plan, masked: frozenset = frozenset()) -> str:
    """The module for `plan`. `masked`: the feature dims whose tiles pass their real size (a dim that is not a
    power of two >= 16, tiles of its padded size; the split dim in blocks that do not divide it). Their
    programs mask loads, stores and the sums over them; with none (every power-of-two dim) no mask is printed."""
    spec = plan.spec
    unknown = set(masked) - set(spec.dims)
    if unknown:
        raise ValueError(f"masked dims {sorted(unknown)} are not dims of spec '{spec.name}'")
    if spec.reverse_states:
        raise NotImplementedError(f"backend 'tilelang' does not implement reverse states "
                                  f"({', '.join(s.name for s in spec.reverse_states)} of spec '{spec.name}': the "
                                  "right-to-left walk and the out kernel); use backend 'triton'")
    _refuse_what_cannot_be_emitted(plan)
    views = [_Kernel(plan, kp, TileLangPrinter(spec, kp.types(spec)), frozenset(masked)).view()
             for kp in plan.kernels if kp.name in FORWARD]
    summary = (f"kernels: {', '.join(v.plan.name for v in views)} (the backward runs on Triton); "
               f"split dim: {plan.split_dim or '-'}")
    return template(__file__, "kernels.py.j2").render(version=__version__, spec=spec, kernels=views, dims=spec.dims, split=plan.split_dim,
                              summary=summary)
