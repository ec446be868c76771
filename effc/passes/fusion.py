"""Fusion: which stages share a kernel, and which ops each kernel keeps.

- `walk`: intra + merge + inter fused; one program per (split block, batch*head, segment)
  walks its chunks in order, keeps the state on chip and writes outputs as it goes.
- `out`: intra + merge for every chunk in parallel, from the state entering each chunk that the walk
  wrote (the "state pass + output pass" schedule). When the tile config defers merge
  (`TileConfig.defer_merge`), the walk skips its merge-only ops (a compile-time flag) and keeps only the
  state update; otherwise `out` does not run and the walk is the fused single pass.
- `summary` (only for segmentable specs): intra + inter from a zero state over one segment,
  accumulating the product of the decays; the walk folds these summaries in to start each
  segment from the right state. Merge is dead here and dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.nodes import Op, Spec, TileType, next_state_name
from ..ir.printer import print_op
from .cse import cse
from .legality import Legality


@dataclass(frozen=True)
class FusedKernel:
    name: str
    stages: tuple[str, ...]
    ops: tuple[Op, ...]
    roots: tuple[str, ...]
    grads: tuple[tuple[str, str], ...] = ()  # backward: (input, the value holding its gradient, or its part here)
    # a walk or scan: the states it carries (None: every state), and whether they are reverse states (the walk
    # runs the chunks right to left, the adjoint scan left to right)
    carries: tuple[str, ...] | None = None
    reverse: bool = False
    # a gradient kernel (passes.partition): one program per chunk looping over the split dim's blocks, the
    # per-token fp32 tiles it writes for later kernels and reads from earlier ones, the partitions launching it
    loop: bool = False
    scratch_stores: tuple[tuple[str, TileType], ...] = ()
    scratch_loads: tuple[tuple[str, TileType], ...] = ()
    partitions: tuple[str, ...] = ()

    def __str__(self) -> str:
        body = "\n".join(f"    {print_op(op)}" for op in self.ops)
        grads = "".join(f"; d{x} += {g}" for x, g in self.grads)
        order = " (reverse states)" if self.reverse else ""
        how = (" looping over the split blocks" if self.loop else "") + (
            f"; in partition {', '.join(self.partitions)}" if self.partitions else "")
        scratch = "".join(f"; {verb} {', '.join(n for n, _ in xs)}" for verb, xs in
                          (("reads", self.scratch_loads), ("writes", self.scratch_stores)) if xs)
        return (f"  kernel {self.name} [{' + '.join(self.stages)}]{order} -> {', '.join(self.roots)}{grads}"
                f"{how}{scratch}\n{body}")


@dataclass(frozen=True)
class Fused:
    kernels: tuple[FusedKernel, ...]
    hoisted: tuple[tuple[str, TileType], ...] = ()  # values the prep kernel writes and the others read (passes.hoist)
    injected: tuple[tuple[str, str], ...] = ()  # (state adjoint root, the bwd_inject value the scan adds to it)
    # per-token values a backward kernel writes (its `scratch_stores`) and later ones read instead of computing
    # them (passes.reverse_scan's per-token injections, passes.hand_on)
    handed: tuple[tuple[str, TileType], ...] = ()
    outputs_read: tuple[str, ...] = ()  # the op's outputs the backward's kernels load (passes.hand_on.read_outputs)
    partitions: tuple = ()  # the gradient kernels' schedules (passes.partition.PartitionChoice), each with its cost
    partition: str | None = None  # the one the model estimates fastest: the default

    def __str__(self) -> str:
        moved = f"\n  hoisted: {', '.join(f'{n}{t}' for n, t in self.hoisted)}" if self.hoisted else ""
        moved += f"\n  handed on: {', '.join(f'{n}{t}' for n, t in self.handed)}" if self.handed else ""
        parts = "".join(f"\n  partition {c}" + (" (default)" if c.name == self.partition else "")
                        for c in self.partitions)
        return "fused:" + moved + parts + "\n" + "\n".join(str(k) for k in self.kernels)


def live_ops(ops: tuple[Op, ...], roots: tuple[str, ...]) -> tuple[Op, ...]:
    """The ops that `roots` need, in their original order, each computed once (common subexpressions
    merged by passes.cse, then dead code dropped)."""
    return needed(cse(ops, roots), roots)


def needed(ops: tuple[Op, ...], roots: tuple[str, ...]) -> tuple[Op, ...]:
    need = set(roots)
    keep = []
    for op in reversed(ops):
        if op.out in need:
            keep.append(op)
            need.update(a for a in op.args if isinstance(a, str))
    return tuple(reversed(keep))


def topological(ops_by_name: dict[str, Op], roots) -> tuple[Op, ...]:
    """The ops making `roots` out of `ops_by_name`, each after the ops it reads."""
    order, seen = [], set()

    def visit(name):
        if name in seen or name not in ops_by_name:
            return
        seen.add(name)
        for a in ops_by_name[name].args:
            if isinstance(a, str):
                visit(a)
        order.append(ops_by_name[name])

    for r in roots:
        visit(r)
    return tuple(order)


def depends(ops: tuple[Op, ...], sources: set[str]) -> set[str]:
    """The values that read (transitively) any of `sources`."""
    reached = set(sources)
    for op in ops:
        if any(isinstance(a, str) and a in reached for a in op.args):
            reached.add(op.out)
    return reached


def seed_gradients(spec: Spec, backward) -> tuple[tuple[str, str], ...]:
    """(input, output) pairs where the input's gradient is the output's cotangent itself, tile for tile (a
    hybrid's softmax-branch result added into merge): the runtime passes the cotangent on, no kernel."""
    targets = dict(backward.seeds)
    outs = {o.name: o for o in spec.outputs}
    decls = {d.name: d for d in spec.inputs}
    return tuple((x, targets[g]) for x, g in backward.input_grads
                 if g in targets and targets[g] in outs and decls[x].dims == outs[targets[g]].dims)


def fuse(spec: Spec, legality: Legality, backward=None) -> Fused:
    """`backward` (passes.autodiff.Backward) adds the reverse walk: recomputation and adjoints fused,
    the state adjoint carried on chip from the last chunk to the first."""
    if spec.reverse_states:
        return _fuse_bidirectional(spec, backward)
    all_ops = spec.intra.ops + spec.merge.ops + spec.inter.ops
    nexts = tuple(next_state_name(s.name) for s in spec.states)
    outs = tuple(o.name for o in spec.outputs)
    kernels = [FusedKernel("walk", ("intra", "merge", "inter"), live_ops(all_ops, outs + nexts), outs + nexts)]
    if spec.states:
        kernels.append(FusedKernel("out", ("intra", "merge"), live_ops(all_ops, outs), outs))
    if legality.segmentable:
        computed = {op.out for op in all_ops}  # a decay may also be a param, an input or a constant
        decays = tuple(t.decay for t in legality.transitions if t.decay in computed)
        roots = nexts + decays
        kernels.insert(0, FusedKernel("summary", ("intra", "inter"), live_ops(spec.intra.ops + spec.inter.ops, roots),
                                      roots))
    if backward is not None:
        # the reverse scan carries only the state adjoints (and keeps each chunk's for the next kernel);
        # then every chunk's input gradients are independent and run in parallel
        state_roots = tuple(g for _, g in backward.state_grads if g is not None)
        kernels.append(FusedKernel("bwd_scan", ("inter", "merge"), live_ops(backward.ops, state_roots), state_roots))
        # one kernel per input gradient: all adjoints of a chunk at once spill registers (measured on
        # sm_90: ~6 KB of spills per program), each gradient alone keeps far fewer tiles live;
        # passes.grad_terms then dissolves the kernels whose gradient's terms the others already compute
        kernels += _gradient_kernels(spec, backward, dict(seed_gradients(spec, backward)))
    return Fused(tuple(kernels))


def _gradient_kernels(spec: Spec, backward, copied: dict) -> list[FusedKernel]:
    """One kernel per input gradient (the parts of an input in power-of-two parts together, passes.dim_parts:
    they share every value over the other dims, which a kernel per part would compute twice)."""
    from .dim_parts import caller_input
    groups: dict[str, list] = {}
    for x, g in backward.input_grads:
        if g is not None and x not in copied:
            groups.setdefault(caller_input(spec, x), []).append((x, g))
    return [FusedKernel(f"bwd_chunks_{name}", ("inter", "merge", "intra"),
                        live_ops(backward.ops, tuple(g for _, g in pairs)), tuple(g for _, g in pairs), tuple(pairs))
            for name, pairs in groups.items()]


def _fuse_bidirectional(spec: Spec, backward=None) -> Fused:
    """A spec with reverse states: one walk per direction, each carrying its own states and writing the
    value entering every chunk (`walk` left to right, `walk_rev` right to left), then `out` evaluates merge
    for every chunk from both histories. The backward mirrors it: `bwd_scan` carries the forward states'
    adjoints right to left, `bwd_scan_rev` the reverse states' left to right (each reads the other
    direction's states from the history), then the input gradients of every chunk in parallel."""
    all_ops = spec.intra.ops + spec.merge.ops + spec.inter.ops
    outs = tuple(o.name for o in spec.outputs)
    directions = [(name, rev, tuple(s.name for s in spec.states if s.reverse == rev))
                  for name, rev in (("", False), ("_rev", True))]
    kernels = []
    for suffix, rev, states in directions:
        if states:
            nexts = tuple(next_state_name(s) for s in states)
            kernels.append(FusedKernel("walk" + suffix, ("intra", "inter"), live_ops(all_ops, nexts), nexts,
                                       carries=states, reverse=rev))
    kernels.append(FusedKernel("out", ("intra", "merge"), live_ops(all_ops, outs), outs))
    if backward is not None:
        grads = dict(backward.state_grads)
        for suffix, rev, states in directions:
            roots = tuple(grads[s] for s in states if grads.get(s) is not None)
            if states:  # the adjoint runs against its state's walk: a reverse state's from the first chunk
                kernels.append(FusedKernel("bwd_scan" + suffix, ("inter", "merge"), live_ops(backward.ops, roots),
                                           roots, carries=states, reverse=rev))
        kernels += _gradient_kernels(spec, backward, {})
    return Fused(tuple(kernels))
