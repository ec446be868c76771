"""Lowering to a kernel plan: per kernel, its tensor arguments, per-chunk loads and stores,
the ops of its body and how each state is carried. Both backends consume this."""
from __future__ import annotations

import functools
from dataclasses import dataclass

from ..errors import ArgumentError
from ..ir import ops as O
from ..ir.nodes import Op, Spec, TensorDecl, next_state_name
from ..ir.printer import print_op
from .autodiff import seed_name
from .block_loop import BlockLoop, loop_over_blocks
from .decay_dot import per_channel
from .fusion import Fused, needed, seed_gradients
from .kernel_plan import Kernel, KernelArg, kernel_args
from .kernel_cost import typical_sizes
from .legality import Legality
from .scale_placement import place_scalings
from .shapes import value_types
from .transpose_sink import sink_transposes


@dataclass(frozen=True)
class StatePlan:
    name: str
    dims: tuple[str, ...]
    next: str  # SSA name of the value leaving the chunk
    decay: str | float | None  # the diagonal decay: a value name or a constant (segmentable specs); None: 1


@dataclass(frozen=True)
class KernelPlan(Kernel):
    """A chunked-scan kernel (role: prep, walk, summary, out, bwd_inject, bwd_scan, bwd_chunks); `loads` are
    the inputs it reads per chunk, `stores` the outputs (prep: the hoisted values) it writes per chunk."""

    ops: tuple[Op, ...]
    states: tuple[StatePlan, ...]
    params: tuple[str, ...]
    grads: tuple[tuple[TensorDecl, str | None], ...] = ()  # backward: input -> its gradient value
    state_grads: tuple[tuple[str, str | None], ...] = ()  # backward: state -> adjoint entering the chunk
    leaf_types: tuple = ()  # types of values the kernel reads but no op defines (the backward's seeds)
    hoisted_loads: tuple[TensorDecl, ...] = ()  # values the prep kernel wrote, read per chunk (passes.hoist)
    injected: tuple[tuple[str, str], ...] = ()  # (state, value): bwd_inject writes it per chunk, bwd_scan adds it
    hands: tuple[TensorDecl, ...] = ()  # per-token values a serial kernel writes for later kernels (passes.hand_on)
    block_loop: BlockLoop | None = None  # a gradient kernel with one program per chunk, looping over the split blocks
    reverse: bool = False  # carries reverse states: a walk right to left, an adjoint scan left to right
    read_states: tuple[StatePlan, ...] = ()  # a scan of one direction: the other's states, read from the history
    partitions: tuple[str, ...] = ()  # a gradient kernel: the partitions that launch it (passes.partition)

    def types(self, spec: Spec) -> dict:
        return {**value_types(spec), **dict(self.leaf_types), **{op.out: op.type for op in self.ops}}

    def _state_access(self) -> str:
        states = ', '.join(f"{s.name}[{','.join(s.dims)}]" for s in self.states) or '-'
        order = ""
        if self.reverse:
            order = " (chunks left to right)" if self.backward else " (chunks right to left)"
        if self.read_states:
            order += "; read " + ", ".join(s.name for s in self.read_states) + " entering the chunk from the history"
        if self.role == "bwd_scan":  # in P segments for a segmentable spec (grid), after a summary pass
            return f"carry the adjoints of {states} on chip{order}"
        loop = "; loops over the split dim's blocks, summing over them on chip" if self.block_loop else ""
        runs = f"; in partition {', '.join(self.partitions)}" if self.partitions else ""
        if self.role == "bwd_chunks" and not self.states:
            return f"reads no state{loop}{runs}"
        if self.role in ("walk", "summary") or not self.states:
            return f"carry {states} on chip{order}"
        return f"read {states} entering the chunk from the walk's history{loop}{runs}"

    def __str__(self) -> str:
        loads = [d.name for d in self.loads] + [f"{d.name} ({d.role})" for d in self.hoisted_loads]
        stores = ([d.name + (" (scratch)" if self.backward else "") for d in self.stores]
                  + [f"{d.name} (handed on)" for d in self.hands])
        lines = [f"  kernel {self.name}  grid={self.grid}",
                 f"    per chunk: load {', '.join(loads) or '-'}; store {', '.join(stores) or '-'}",
                 f"    {self._state_access()}"]
        lines += [f"    {print_op(op)}" for op in self.ops]
        return "\n".join(lines)


def _answered_once(method):
    """A plan is immutable, so each of its answers per arguments is computed once: the launcher asks the
    gradient kernels' order and slots at every training step (delta_net at 2x8192 on the H100: ~1 ms of a
    step's 3.96 ms of host time, where its kernels ran 2.93)."""
    @functools.wraps(method)
    def answer(self, *args, **kwargs):
        memo = self.__dict__.setdefault("_answers", {})
        key = (method.__name__, args, tuple(sorted(kwargs.items())))
        if key not in memo:
            memo[key] = method(self, *args, **kwargs)
        return memo[key]
    return answer


@dataclass(frozen=True)
class Plan:
    spec: Spec
    split_dim: str | None
    kernels: tuple[KernelPlan, ...]
    seed_grads: tuple[tuple[str, str], ...] = ()  # (input, output): its gradient is the output's cotangent
    partitions: tuple = ()  # the gradient kernels' schedules with the model's costs (passes.partition)
    partition: str | None = None  # the default one

    @_answered_once
    def gradient_kernels(self, partition: str | None = None) -> tuple[KernelPlan, ...]:
        """The gradient kernels one partition launches, in its order (kernels that several partitions share sit
        once in the module, where the first placed them), or every bwd_chunks kernel of a plan without
        partitions."""
        p = partition or self.partition
        launched = [k for k in self.kernels if k.role == "bwd_chunks" and (not k.partitions or p in k.partitions)]
        rank = {name: i for i, name in enumerate(next((c.kernels for c in self.partitions if c.name == p), ()))}
        return tuple(sorted(launched, key=lambda k: rank.get(k.name, len(rank))))

    def check_partition(self, partition: str | None) -> None:
        names = [c.name for c in self.partitions]
        if partition is not None and partition not in names:
            raise ArgumentError(f"partition={partition!r}: spec '{self.spec.name}' has "
                             + (f"the gradient partitions {', '.join(map(repr, names))}" if names
                                else "one gradient partition (pass partition=None)"))

    @property
    def segmentable(self) -> bool:
        return any(k.name == "summary" for k in self.kernels)

    def kernel(self, name: str) -> KernelPlan:
        return next(k for k in self.kernels if k.name == name)

    @property
    def deferrable(self) -> bool:
        """Has an `out` kernel: merge can leave the walk (TileConfig.defer_merge)."""
        return any(k.name == "out" for k in self.kernels)

    def merge_only(self) -> tuple[str, ...]:
        """The walk's values that only the outputs need: skipped when merge is deferred."""
        if self.spec.reverse_states:  # the walks compute no output: merge always runs in the out kernel
            return ()
        walk = self.kernel("walk")
        state = {op.out for op in needed(walk.ops, tuple(s.next for s in walk.states))}
        return tuple(op.out for op in walk.ops if op.out not in state) if self.deferrable else ()

    @_answered_once
    def grad_writers(self, x: str, partition: str | None = None) -> tuple[str, ...]:
        """The kernels that write a part of input x's gradient (passes.grad_terms) in a partition, in launch
        order."""
        return tuple(k.name for k in self.kernels if any(d.name == x for d, _ in k.grads)
                     and (k.role != "bwd_chunks" or k in self.gradient_kernels(partition)))

    @_answered_once
    def per_block(self, x: str, kernel: str) -> bool:
        """Does `kernel` write one partial of x's gradient per block of the split dim? It runs one program per
        block (no block loop) and x lacks the split dim."""
        decl = next(d for d in self.spec.inputs if d.name == x)
        return bool(self.split_dim) and self.split_dim not in decl.feature_dims and self.kernel(kernel).block_loop is None

    @_answered_once
    def grad_slot(self, x: str, kernel: str | None, partition: str | None = None) -> tuple[int, int]:
        """Where `kernel`'s part of x's gradient starts among the buffer's slots, as (a, b): slot a * n_blocks
        + b, n_blocks being the split dim's block count. Each writer before it took n_blocks slots (per-block
        partials) or one. `grad_slot(x, None)` is the slot count. The slots are summed after the kernels.
        A kernel gets its slot at launch (argument `<x>_slot`): partitions sharing it may place it apart."""
        writers = self.grad_writers(x, partition)
        before = writers[:writers.index(kernel)] if kernel else writers
        a = sum(self.per_block(x, k) for k in before)
        return a, len(before) - a

    @_answered_once
    def slotted(self, x: str, partition: str | None = None) -> bool:
        """Is x's gradient written in slots (partials per split block, or parts from several kernels)?"""
        a, b = self.grad_slot(x, None, partition)
        return a > 0 or b > 1

    @_answered_once
    def whole_grads(self, n_split: int, partition: str | None = None) -> frozenset[str]:
        """Inputs whose gradient one kernel writes whole: no partial per block of the split dim (the input
        has the split dim, the kernel loops over the blocks, or there is one block). With ungrouped heads the
        kernel stores it in the input's dtype (runtime.launch); the others are fp32 partials, summed after."""
        return frozenset(d.name for d in self.spec.inputs if len(w := self.grad_writers(d.name, partition)) == 1
                         and (n_split == 1 or not self.per_block(d.name, w[0])))

    @property
    def scratch(self) -> tuple[TensorDecl, ...]:
        """Per-token fp32 tiles a gradient kernel writes for later ones (passes.partition's cut)."""
        return tuple(d for k in self.kernels if k.role == "bwd_chunks" for d in k.stores)

    @property
    def hoisted(self) -> tuple[TensorDecl, ...]:
        """What the prep kernel writes (per-token scratch the other kernels read); () without one."""
        return next((k.stores for k in self.kernels if k.name == "prep"), ())

    def __str__(self) -> str:
        walks = ("summary kernel runs first when segments > 1" if self.segmentable else "single walk kernel")
        deferred = ("; with merge deferred, the walk updates the state only and the out kernel evaluates merge per "
                    "chunk from the walk's states; a coarse walk (walk_chunk) runs the walk again per coarse chunk"
                    if self.deferrable else "")
        if self.spec.reverse_states:
            walks = "one walk per direction (reverse states right to left)"
            deferred = "; the out kernel evaluates merge per chunk from both walks' states"
        head = [f"plan {self.spec.name}: split {self.split_dim or '-'}; " + walks + deferred
                + (f"; prep kernel writes {', '.join(d.name for d in self.hoisted)} for all chunks at once"
                   if self.hoisted else "")]
        fastest = min((c.us for c in self.partitions), default=0.0)
        for c in self.partitions:
            why = ("the model's fastest" if c.us == fastest else
                   f"estimated faster than {c.refines}, which it refines" if c.refines else
                   f"the fewest kernels within the model's error of the fastest, {fastest:.0f} us")
            head.append(f"  gradient partition {c}" + (f" <- default ({why})" if c.name == self.partition else ""))
        sites = [op.out for st in self.spec.stages for op in st.ops if op.kind == "decay_dot"]
        if sites:
            head.append(f"  factored decays evaluated from their exponents (passes.decay_dot): {', '.join(sites)}; "
                        "sub-chunk anchors in chunks whose decay exceeds the matmul dtype")
        return "\n".join(head + [str(k) for k in self.kernels])


def _used(ops, names) -> tuple[str, ...]:
    read = {a for op in ops for a in op.args if isinstance(a, str)}
    return tuple(n for n in names if n in read)


# each state's buffers, by role: the walk also reads the initial state and writes the final one and the history
_STATE_BUFFERS = {"walk": ("init", "final", "hist", "segw", "segd"), "summary": ("segw", "segd"), "out": ("hist",),
                  "bwd_inject": ("hist",), "bwd_scan": ("hist", "dhist", "dfinal", "dinit", "segw", "segd"),
                  "bwd_chunks": ("hist", "dhist"), "prep": ()}
_FLAGS = {"walk": ("HAS_INIT", "STORE_FINAL", "STORE_HISTORY"), "summary": ("HAS_INIT", "STORE_FINAL", "STORE_HISTORY"),
          "bwd_scan": ("HAS_DFINAL", "SUMMARY")}


def _args(spec: Spec, role: str, loads, hoisted_loads, stores, states, params, grads, injected,
          merge_flag: bool, read_states=(), decays: bool = False, solves: bool = False,
          hand_on: bool = False) -> tuple[KernelArg, ...]:
    """A kernel's signature (codegen/triton/kernels.py.j2 reads these names; runtime.launch supplies them):
    its tensors, the spec parameters it reads, the call's layout, then the constexprs. A walk with merge
    optional also runs as the fine walk of a coarse one (TileConfig.walk_chunk): each segment a coarse chunk,
    started from the coarse walk's state entering it (`<s>_coarse_ptr`, FROM_COARSE). `hand_on`: a walk that
    writes per-token values for the out kernel (passes.hand_on) does so when HAND_ON (the out kernel runs)."""
    backward = role.startswith("bwd")
    coarse = merge_flag and role == "walk"
    tensors = ([f"{d.name}_ptr" for d in loads + hoisted_loads]
               + [f"{o.name}_ptr" for o in stores]
               + [f"{o.name}_grad_ptr" for o in spec.outputs if backward]
               + [f"{x.name}_dx_ptr" for x, _ in grads if role == "bwd_chunks"]
               + [f"{s.name}_{b}_ptr" for s in states for b in _STATE_BUFFERS[role]]
               + [f"{s.name}_hist_ptr" for s in read_states]
               + [f"{s}_inj_ptr" for s, _ in injected]
               + [f"{s.name}_coarse_ptr" for s in states if coarse]
               + (["decay_flag_ptr"] if decays else [])  # one int per program (codegen/triton/decay.py.j2)
               + (["solve_ptr"] if solves else []))  # one fp32 [C, C] tile per program (codegen/triton/solve.py.j2)
    return (kernel_args("tensor", tensors) + kernel_args("param", [f"p_{p}" for p in params])
            + kernel_args("layout", ("T", "chunks_per_seg", "n_segments", "T_total", "n_bh", "cu_ptr", "chunk_off_ptr")
                          + (("coarse_off_ptr",) if coarse else ())
                          + (("POS0",) if spec.reads("pos") else ()))  # pos of a sequence's first token
            + kernel_args("slot", [f"{x.name}_slot" for x, _ in grads if role == "bwd_chunks"])
            + kernel_args("shape", ["H"] + [f"HX_{d.name}" for d in loads]
                          + [n for d in spec.dims for n in (d, f"{d}_P")])
            + kernel_args("tile", ("C", "BLOCK")) + kernel_args("option", ("IS_VARLEN", "DOT_DTYPE", "PRECISION")
                                                                + (("DECAY_MODE",) if decays else ()))
            + kernel_args("flag", _FLAGS.get(role, ()) + (("FUSE_MERGE",) if merge_flag else ())
                          + (("HAND_ON",) if hand_on else ())
                          + (("FROM_COARSE",) if coarse else ())))


def plan(spec: Spec, legality: Legality, fused: Fused, backward=None) -> Plan:
    decays = {t.state: t.decay for t in legality.transitions}
    split = legality.split_dims[0] if legality.split_dims else None
    # hoisted values live in (tokens, heads, d) scratch, d being the tile's second axis (a feature dim or C)
    hoisted = {n: TensorDecl(n, "hoisted", ("B", "T", "H") + tuple(str(d) for d in t.shape[1:]))
               for n, t in fused.hoisted}
    # per-token values one backward kernel writes and later ones read (passes.reverse_scan, passes.hand_on)
    handed = {n: TensorDecl(n, "handed", ("B", "T", "H") + tuple(str(d) for d in t.shape[1:]))
              for n, t in fused.handed}
    # the reverse scan's injected sums, by state (passes.reverse_scan)
    state_of = {g: s for s, g in (backward.state_grads if backward else ()) if g is not None}
    injected = tuple((state_of[root], x) for root, x in fused.injected)
    tiles = {s.name: s.tile for s in spec.states}
    kernels = []
    for fk in fused.kernels:
        made = {op.out for op in fk.ops}
        loads = tuple(d for d in spec.inputs if d.name in _used(fk.ops, [d.name]))
        if fk.name.startswith("bwd"):  # the op's outputs, which the backward holds (passes.hand_on.read_outputs)
            loads += tuple(o for o in spec.outputs if o.name in fused.outputs_read and o.name in _used(fk.ops, [o.name])
                           and o.name not in made)
        reads = tuple(hoisted[n] for n in _used(fk.ops, list(hoisted))) if fk.name != "prep" else ()
        reads += tuple(handed[n] for n in _used(fk.ops, list(handed)) if n not in made)
        reads += tuple(_scratch(n, t) for n, t in fk.scratch_loads)
        rename = backward.forward_name if backward and fk.name.startswith("bwd") else str
        states = tuple(StatePlan(s.name, s.dims, next_state_name(s.name),
                                 rename(d) if isinstance(d := decays.get(s.name), str) else d) for s in spec.states)
        read_states = ()
        if fk.carries is not None:  # one direction's walk or scan (passes.fusion._fuse_bidirectional)
            read_states = tuple(s for s in states if s.name not in fk.carries and s.name in _used(fk.ops, [s.name]))
            states = tuple(s for s in states if s.name in fk.carries)
        serial = fk.name in ("walk", "bwd_scan")  # what they write for later kernels is handed on (passes.hand_on)
        hands = tuple(_scratch(n, t) for n, t in fk.scratch_stores) if serial else ()
        stores = (tuple(hoisted.values()) if fk.name == "prep" else
                  tuple(_scratch(n, t) for n, t in fk.scratch_stores) if fk.scratch_stores and not serial else
                  tuple(o for o in spec.outputs if o.name in fk.roots) if fk.name in ("walk", "out") else ())
        gradient = fk.name.startswith("bwd_chunks") or bool(fk.partitions)  # passes.partition adds bwd_sums
        role = "bwd_chunks" if gradient else fk.name.removesuffix("_rev")
        segs = {"walk": "P", "summary": "P-1", "bwd_scan": "P" if legality.segmentable else "1"}.get(role, "chunks")
        params = _used(fk.ops, [p.name for p in spec.params])
        grads = state_grads = ()
        leaves = (tuple((n, t) for n, t in fused.hoisted if hoisted[n] in reads)
                  + tuple((n, t) for n, t in fused.handed if handed[n] in reads) + fk.scratch_loads)
        loop = None
        if fk.name == "prep":
            states = ()
        if gradient or fk.name == "bwd_inject":
            # a state's history and adjoint are read only where the ops do (the launcher frees the adjoint
            # history after its last reader)
            states = tuple(s for s in states if _used(fk.ops, [s.name, seed_name(s.next)]))
            mine = dict(fk.grads)
            grads = tuple((d, mine[d.name]) for d in spec.inputs if d.name in mine)
            leaves += backward.seed_types
        # prep computes whole tiles (no split blocks), a looped gradient kernel all blocks: one program per
        # (batch*head, chunk)
        if role == "bwd_scan":
            state_grads = tuple((s, g) for s, g in backward.state_grads if s in {x.name for x in states})
            leaves = leaves + backward.seed_types
            leaves += tuple((x, tiles[s]) for s, x in injected)
        types = {**value_types(spec), **dict(leaves)}
        ops = sink_transposes(fk.ops, types)
        ops = place_scalings(ops, {**types, **{op.out: op.type for op in ops}}, typical_sizes(spec, split))
        if split and gradient:
            loop = loop_over_blocks(ops, {**types, **{op.out: op.type for op in ops}}, split) if fk.loop else None
            if fk.loop and loop is None:
                raise RuntimeError(f"effc bug: gradient kernel {fk.name} was partitioned to loop over {split}'s "
                                   "blocks, but its ops cannot")
        grid = f"({f'cdiv({split}, BLOCK)' if split and fk.name != 'prep' and not loop else '1'}, B*H, {segs})"
        inject = injected if fk.name in ("bwd_scan", "bwd_inject") else ()
        args = _args(spec, role, loads, reads, stores + hands, states, params, grads, inject,
                     merge_flag=fk.name == "walk" and any(k.name == "out" for k in fused.kernels)
                     and not spec.reverse_states, read_states=read_states,
                     decays=any(per_channel(op, types) for op in ops),
                     solves=any(op.kind in O.SOLVES for op in ops), hand_on=role == "walk" and bool(hands))
        kernels.append(KernelPlan(name=fk.name, role=role, loads=loads, stores=stores, grid=grid, args=args, ops=ops,
                                  states=states, params=params, grads=grads, state_grads=state_grads,
                                  leaf_types=leaves, hoisted_loads=reads, injected=inject, block_loop=loop,
                                  reverse=fk.reverse, read_states=read_states, partitions=fk.partitions,
                                  hands=hands))
    return Plan(spec, split, tuple(kernels), seed_gradients(spec, backward) if backward else (),
                fused.partitions, fused.partition)


def _scratch(name: str, t) -> TensorDecl:
    """A per-token tile one gradient kernel writes and a later one reads: a (tokens, heads, d) buffer."""
    return TensorDecl(name, "scratch", ("B", "T", "H") + tuple(str(d) for d in t.shape[1:]))
