"""The user-facing op: `op(q, k, v, *gates, scale=None, initial_state=None,
output_final_state=False)` -> `(o, final_state)`, inputs (B, T, H, D)."""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..compiler import Compilation
from ..errors import ArgumentError, SpecError
from ..ir.nodes import Spec
from ..passes.partition import PARTITIONS
from ..policy.tiling import Problem, TileConfig, choose, history_policy
from ..policy.tuning import Tuned
from ..policy.tuning import sm_count as _sm_count
from .cache import op_module
from .checks import (
    check_cu_seqlens,
    check_inputs,
    check_knobs,
    check_state,
    chunk_tile_row,
    decode_inputs,
    describe,
    history_dtype,
    param_values,
    rebuild,
    state_list,
)
from .dim_parts import choose_parts
from .oracle import evaluate
from .torch_op import call_lengths, host_parts, host_plan, keepable_prep, linear_torch_ops, live


class AttentionOp(Tuned):
    def __init__(self, comp: Compilation, backend: str = "triton", parts=None):
        """`parts` (runtime.dim_parts.PartMap): `comp` is a split spec's, run on the caller's tensors, whose spec
        (`parts.caller`) the call's arguments follow."""
        from ..compiler import BACKENDS
        if backend not in BACKENDS:
            raise ArgumentError(f"unknown backend '{backend}'; expected one of {', '.join(BACKENDS)}")
        self.comp, self.backend, self.parts = comp, backend, parts
        self.spec: Spec = comp.typed
        self.interface: Spec = parts.caller if parts is not None else self.spec  # what the call's arguments follow
        self.name = self.spec.name
        self._modules: dict = {}  # per Triton mode (runtime.cache.op_module)
        self._late_modules: dict = {}
        self.last_config: TileConfig | None = None
        # sympy is slow: tiling choices (Tuned.config) and param defaults are memoised per call shape
        self._configs: dict[tuple, TileConfig] = {}
        self._defaults: dict[tuple, dict[str, float]] = {}
        self._parted: dict[tuple, tuple] = {}  # part sizes -> (the split op, runtime.dim_parts, or None; why)
        self.last_dim_parts = ""
        live(self)
        self._torch_ops = linear_torch_ops(self)

    def __repr__(self) -> str:
        args = ", ".join(d.name for d in self.spec.inputs)
        return f"<effc op {self.name}({args}) backend={self.backend}>"

    @property
    def module(self):
        # the Triton module always loads: the backward runs on Triton for every backend
        module, self.source_path = op_module(self._modules, self.name, lambda: self.comp.source("triton"))
        return module

    @property
    def late_module(self):
        """The same kernels with each chunk-parallel kernel's loads at their first reader: a launch takes a kernel
        from it where the module's own compiles to spills (runtime.launch.spill_free)."""
        from ..codegen.triton import emit_module
        from ..compiler.driver import checked_source
        source = lambda: checked_source(emit_module(self.comp.plan, late_loads=True), self.name, "triton")
        return op_module(self._late_modules, self.name, source)[0]

    # -- parameters ---------------------------------------------------------------------------
    def param_values(self, dims: dict[str, int], given: dict) -> dict[str, float]:
        return param_values(self.spec, self._defaults, dims, given)

    def _split(self, *tensors, params, for_kernels=True):
        """(B, T, H, the caller's dim sizes, the params' values)."""
        B, T, H, dims = check_inputs(self.interface, tensors, for_kernels)
        return B, T, H, dims, self.param_values(self._run_dims(dims), {k: v for k, v in params.items() if v is not None})

    def _run_dims(self, dims: dict[str, int]) -> dict[str, int]:
        """The kernels' dim sizes for the caller's `dims` (with the parts' sizes where dims run in parts)."""
        return self.parts.dims(dims) if self.parts is not None else dims

    def tiles(self, problem: Problem, tuned: dict | None = None, **given) -> TileConfig:
        """The configuration for `problem`: the tuned knobs (None: the model's), explicit arguments winning."""
        return choose(self.spec, self.comp.legality, problem,
                      **{**(tuned or {}), **{k: v for k, v in given.items() if v is not None}})

    # -- the kernels ----------------------------------------------------------------------------
    def __call__(self, *tensors, initial_state=None, output_final_state: bool = False, cu_seqlens=None,
                 chunk: int | None = None, block: int | None = None, segments: int | None = None,
                 num_warps: int | None = None, num_stages: int | None = None, save_states: bool | None = None,
                 defer_merge: bool | None = None, partition: str | None = None, walk_block: int | None = None,
                 walk_chunk: int | None = None, pos_offset: int = 0, dim_parts: bool = True, **params):
        """(o, final_state) for (B, T, H, D) inputs; with `cu_seqlens`, packed (1, total_T, H, D) sequences.
        Differentiable: gradients reach every input and the initial state. Works under torch.compile:
        the host-side checks and choices are compile-time constants of the call's shapes.
        chunk, block, segments, num_warps, num_stages, defer_merge (merge in the chunk-parallel out kernel
        instead of the walk), walk_block (the split dim's block in the serial walk and adjoint scan of a
        general transition, at most `block`), walk_chunk (the serial walk's chunk length, a multiple of `chunk`:
        the walk updates the state in chunks of walk_chunk, then each is walked again in chunks of `chunk`, in
        parallel, for the outputs) override the tiling model's or `effc tune`'s choice.
        partition: how the backward's gradient kernels run (passes.partition: 'block', 'loop', 'cut',
        'cut_each' or 'cut_common', those the spec's plan lists); None: the plan's default.
        pos_offset: the position (`pos`) of every sequence's first token, for a spec that reads `pos` run on a
        later piece of its sequences (context parallel, decoding); 0 by default.
        dim_parts: run a feature dim that is not a power of two (96, 192) as two power-of-two parts (64 + 32)
        where that pads less than one tile (passes.dim_parts; `op.last_dim_parts` says what ran); False keeps
        one padded tile."""
        if not isinstance(dim_parts, bool):
            raise ArgumentError(f"dim_parts must be True or False, got {dim_parts!r}")
        inner = None
        if dim_parts and self.parts is None and self.spec.family == "linear":
            first = next((t for t in tensors if torch.is_tensor(t)), None)
            key = host_parts(id(self), tuple(tuple(t.shape) if torch.is_tensor(t) else None for t in tensors),
                             first.device.type if first is not None else "cpu")
            inner = self._parted[key][0]
        if inner is not None:
            res = inner(*tensors, initial_state=initial_state, output_final_state=output_final_state,
                        cu_seqlens=cu_seqlens, chunk=chunk, block=block, segments=segments, num_warps=num_warps,
                        num_stages=num_stages, save_states=save_states, defer_merge=defer_merge,
                        partition=partition, walk_block=walk_block, walk_chunk=walk_chunk, pos_offset=pos_offset,
                        **params)
            self.last_config = inner.last_config
            return res
        init = state_list(self.interface, initial_state)
        longest = call_lengths(cu_seqlens, tensors[0])
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in list(tensors) + init if torch.is_tensor(t))
        overrides = (("chunk", chunk), ("block", block), ("segments", segments), ("num_warps", num_warps),
                     ("num_stages", num_stages), ("defer_merge", defer_merge), ("partition", partition),
                     ("walk_block", walk_block), ("walk_chunk", walk_chunk))
        n_seq = None if cu_seqlens is None else cu_seqlens.shape[0] - 1
        ints, pvals = host_plan(id(self), tuple(describe(t) for t in tensors), tuple(describe(t) for t in init),
                                 n_seq, longest, output_final_state, grad, save_states, overrides,
                                 tuple(sorted(params.items())))
        pos_offset = self._pos_offset(pos_offset)
        res = self._torch_ops.call(list(tensors), init, cu_seqlens, list(ints) + [pos_offset], list(pvals))
        n_out, n_state = len(self.interface.outputs), len(self.interface.states)
        outs, finals = res[:n_out], res[n_out:n_out + n_state]
        o = outs[0] if n_out == 1 else tuple(outs)
        if not output_final_state:
            return o, None
        return o, (finals[0] if n_state == 1 else tuple(finals))

    def tuning_key(self, problem: Problem):
        """A split op's calls read the caller's op's entry at the caller's dims (what `effc tune` timed)."""
        if self.parts is None or self.parts.owner is None:
            return None
        caller_dims = tuple((n, s) for n, s in problem.dims if n in self.interface.dims)
        return self.parts.owner, replace(problem, dims=caller_dims)

    def _choose_parts(self, shapes: tuple, device: str = "cpu") -> tuple:
        return choose_parts(self, shapes, self._parted, device)

    def _pos_offset(self, pos_offset) -> int:
        if not isinstance(pos_offset, int) or isinstance(pos_offset, bool) or pos_offset < 0:
            raise ArgumentError(f"pos_offset must be an int >= 0 (the position of each sequence's first token); "
                                f"got {pos_offset!r}")
        if pos_offset and self.backend != "triton" and self.spec.reads("pos"):
            raise NotImplementedError(f"{self.name}: pos_offset on the {self.backend} backend (its kernels count "
                                      "positions from 0); use backend='triton'")
        return pos_offset if self.spec.reads("pos") else 0  # no kernel reads it otherwise: one cache entry

    def _plan_call(self, descs, init_descs, n_seq, longest, output_final_state, grad, save_states, overrides,
                   params) -> tuple[tuple, tuple]:
        # here, not in __call__: under torch.compile this runs once, as a constant, outside the traced graph
        knobs = dict(overrides)
        self.comp.plan.check_partition(knobs.pop("partition", None))
        check_knobs(split=bool(self.comp.plan.split_dim), output_final_state=output_final_state,
                    save_states=save_states, **knobs)
        tensors = [rebuild(d) for d in descs]
        B, T, H, dims, pvals = self._split(*tensors, params=dict(params))
        n_seq = B if n_seq is None else n_seq
        init = [rebuild(d) for d in init_descs]
        check_state(self.interface, init or None, n_seq, H, dims, tensors[0].device)
        longest = longest or T
        cfg = self.config(n_seq, longest, H, self._run_dims(dims), tensors[0].device, dtype=tensors[0].dtype,
                          **dict(overrides))
        self.last_config = cfg
        keep = False
        if grad:
            keep, self.last_history_reason = self._history(save_states, tensors, n_seq, longest, H, dims, cfg)
        ints = (cfg.chunk, cfg.block, cfg.segments, cfg.num_warps, cfg.num_stages, int(cfg.defer_merge),
                PARTITIONS.index(cfg.partition) if cfg.partition else -1, cfg.serial_block, cfg.walk_chunk,
                int(bool(output_final_state)), int(keep), 1)
        return ints, tuple(pvals[p.name] for p in self.spec.params)

    def _history(self, save_states, tensors, n_seq, longest, H, dims, cfg) -> tuple[int, str]:
        """What the forward keeps for the backward (policy.tiling.history_policy: 0, 1 or 2) and why."""
        chunks = n_seq * math.ceil(longest / cfg.serial_chunk)  # the walk's history (a coarse walk's)
        history = sum(chunks * H * math.prod(dims[n] for n in s.dims) * history_dtype(s, tensors[0].dtype).itemsize
                      for s in self.interface.states)  # as stored: matrix states in the operand dtype
        rows = [chunk_tile_row(d, cfg.chunk, dims, tensors[0].dtype) for d in keepable_prep(self, cfg)]
        prep = sum(chunks * cfg.chunk * H * math.prod(row) * dtype.itemsize for row, dtype in rows)
        keep, why = history_policy(history, sum(math.prod(t.shape) * t.dtype.itemsize for t in tensors), prep)
        if save_states is not None:  # the states as asked; prep's values as the budget allows
            keep = max(keep, 1) if save_states else 0
            return keep, (f"{'kept' if save_states else 'recomputed'} as asked (save_states={save_states})"
                          + (", with prep's values" if keep == 2 else ""))
        return keep, why

    # -- decoding ---------------------------------------------------------------------------------
    def step(self, *tokens, state=None, pos_offset: int | None = None, **params):
        """One decoding step: `tokens` are (B, H, D) (or (B, H) gates), `state` the carried state(s) (None:
        zeros). Returns (o_t, next state). Runs the generated walk kernel on a single token. A spec that reads
        `pos` needs `pos_offset`, the token's position in its sequence (the tokens before it)."""
        if self.spec.reverse_states:
            s = self.spec.reverse_states[0]
            raise SpecError(f"spec '{self.spec.name}' cannot decode token by token: its reverse state '{s.name}' "
                            "holds the tokens AFTER each one, which do not exist yet", s.loc,
                            "a spec whose states are all forward (no 'reverse' annotation) for step(); call the "
                            "op on the whole sequence")
        if self.spec.reads("pos") and pos_offset is None:  # the single token would be position 0
            raise ArgumentError(f"{self.name}.step: the spec reads 'pos', the token's position in its sequence: "
                                "pass pos_offset= that position (the number of tokens before it)")
        o, nxt = self(*decode_inputs(self.spec, tokens), initial_state=state, output_final_state=True, segments=1,
                      pos_offset=pos_offset or 0, **params)
        return (o[:, 0] if torch.is_tensor(o) else tuple(x[:, 0] for x in o)), nxt

    # -- the oracle ---------------------------------------------------------------------------
    def reference(self, *tensors, initial_state=None, output_final_state: bool = False, cu_seqlens=None,
                  chunk: int | None = None, dtype=torch.float64, matmul_dtype=None, pos_offset: int = 0, **params):
        """The spec evaluated with PyTorch ops (chunk=1 gives the token-by-token recurrence).
        Differentiable with torch.autograd; grouped inputs are repeated to all heads; packed
        sequences (`cu_seqlens`) are evaluated one by one."""
        B, T, H, dims, pvals = self._split(*tensors, params=params, for_kernels=False)
        n_seq = check_cu_seqlens(cu_seqlens, B, T, tensors[0].device)
        init = check_state(self.spec, initial_state, n_seq, H, dims, tensors[0].device)
        full = [x.repeat_interleave(H // x.shape[2], dim=2) if x.shape[2] != H else x for x in tensors]
        if cu_seqlens is None:
            pieces = [(full, init)]
        else:
            c = cu_seqlens.tolist()
            pieces = [([x[:, a:b] for x in full], {k: v[i:i + 1] for k, v in init.items()})
                      for i, (a, b) in enumerate(zip(c, c[1:]))]
        results = [evaluate(self.spec, {d.name: x for d, x in zip(self.spec.inputs, xs)}, pvals,
                            chunk or self.spec.chunk, st, dtype, matmul_dtype, pos_offset) for xs, st in pieces]
        names = [o.name for o in self.spec.outputs]
        outs = [torch.cat([r[0][n] for r in results], 1) for n in names]
        states = [torch.cat([r[1][s.name] for r in results], 0) for s in self.spec.states]
        o = outs[0] if len(outs) == 1 else tuple(outs)
        if not output_final_state:
            return o, None
        return o, (states[0] if len(states) == 1 else tuple(states))

    def recurrent_reference(self, *tensors, **kw):
        return self.reference(*tensors, chunk=1, **kw)


class AutoBackendOp:
    """backend="auto": for each call shape, the backend whose `effc tune` entry is faster (the tuning
    cache records each backend's best time per shape bucket); Triton where nothing is recorded.
    Everything but the call (reference, step, config, ...) is the Triton op's."""

    backend = "auto"

    def __init__(self, comp: Compilation):
        from ..compiler import BACKENDS
        self.ops = {b: AttentionOp(comp, b) for b in BACKENDS}
        self.comp, self.spec, self.name = comp, comp.typed, comp.typed.name
        self._choice: dict[tuple, str] = {}
        self.last_backend_reason = ""

    def __repr__(self) -> str:
        return f"<effc op {self.name} backend=auto ({', '.join(self.ops)})>"

    def __getattr__(self, name):
        return getattr(self.ops["triton"], name)

    def pick(self, *tensors, cu_seqlens=None) -> str:
        from ..policy.tuning import TuningKey, device_name, read_entry
        x = tensors[0]
        B, T, H = x.shape[:3]
        n_seq = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        dims = {n: s for d, t in zip(self.spec.inputs, tensors) for n, s in zip(d.dims[3:], t.shape[3:])}
        problem = Problem(n_seq, T, H, tuple(sorted(dims.items())), _sm_count(x.device))
        key = (problem, str(x.device), x.dtype)
        if key not in self._choice:
            timed = {}
            for b, op in self.ops.items():
                entry = read_entry(TuningKey.of(op, problem, device_name(x.device), x.dtype).path)
                if entry is not None and entry.key == TuningKey.of(op, problem, device_name(x.device), x.dtype):
                    timed[b] = entry.ms
            best = min(timed, key=timed.get) if timed else "triton"
            self._choice[key] = best
            self.last_backend_reason = (f"{best}: tuned times {', '.join(f'{b} {ms:.3f} ms' for b, ms in timed.items())}"
                                        if timed else "triton: no tuning entry for this shape (run `effc tune`)")
        return self._choice[key]

    def __call__(self, *tensors, cu_seqlens=None, **kw):
        return self.ops[self.pick(*tensors, cu_seqlens=cu_seqlens)](*tensors, cu_seqlens=cu_seqlens, **kw)
