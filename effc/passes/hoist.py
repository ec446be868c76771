"""Hoisting: in-chunk solves leave the sequential walk for a chunk-parallel `prep` kernel.

The walk visits a sequence's chunks one after another, so every op in its body sits on the critical
path, even ops that never read the carried state. Most of those are cheap elementwise work, but an
in-chunk solve (`unit_lower_inv`, the delta rule's UT transform: log2(C) fp32 [C, C] products) and
the products built from it cost more than the state update itself. This pass computes them once per
chunk, for all chunks in parallel, and the walk (and every kernel of the backward) loads them.

What moves: the values that a state-dependent op reads, that read no state themselves, and whose
computation contains a solve (delta_net: `w = t @ kb`, `u = t @ (v * beta)`), and the solves that the
backward's adjoints read (`t`: the adjoint of `t @ kb` reads it). Each is a per-token tile ([C] or
[C, d], d possibly C), stored once per chunk in a chunk-padded scratch buffer, so no kernel of the
forward or the backward inverts anything but prep. What the state-free
part needs besides them (l2-normalised q and k, decay masks) stays where it is: recomputing a few
elementwise ops is cheaper than a round trip through memory.
"""
from __future__ import annotations

from dataclasses import replace

from ..ir.nodes import C, Op, Spec, TileType
from ..ir.ops import SOLVES
from .autodiff import is_seed
from .fusion import Fused, FusedKernel, depends, needed


def _per_token(t: TileType | None) -> bool:
    """A tile with one row per token ([C] or [C, d]): it fits a (tokens, heads, d) scratch buffer."""
    return t is not None and 1 <= t.rank <= 2 and t.shape[0] == C


def _read_by_carried(spec: Spec, ops: tuple[Op, ...], forward_values: set[str]) -> set[str]:
    """The forward values that the ops reading a state or a cotangent (the backward's seeds) read, directly
    or through state-free ops of their own (the backward's transpose of `t`, say)."""
    sources = {s.name for s in spec.states} | {a for op in ops for a in op.args if isinstance(a, str) and is_seed(a)}
    carried = depends(ops, sources)
    defs = {op.out: op for op in ops}
    todo = [a for op in ops if op.out in carried for a in op.args if isinstance(a, str) and a not in carried]
    found, seen = set(), set()
    while todo:
        x = todo.pop()
        if x in seen:
            continue
        seen.add(x)
        if x in forward_values:
            found.add(x)
        elif x in defs:
            todo += [a for a in defs[x].args if isinstance(a, str)]
    return found


def hoisted_values(spec: Spec, forward: tuple[Op, ...], others=()) -> tuple[Op, ...]:
    """The ops of the forward (every op the outputs and next states need) whose values move to the
    prep kernel (see the module docstring). `others`: the op lists of the backward's kernels; the solves
    they read move too (the adjoints of a solve's products read the solve), while products of a solve
    that only the backward reads are recomputed there from it (a matmul, not log2(C) of them)."""
    solves = {op.out for op in forward if op.kind in SOLVES}
    solved = depends(forward, solves) - depends(forward, {s.name for s in spec.states})
    values = {op.out for op in forward}
    read = _read_by_carried(spec, forward, values)
    read |= solves & set().union(*(_read_by_carried(spec, ops, values) for ops in others))
    return tuple(op for op in forward if op.out in solved and op.out in read and _per_token(op.type))


def row_scans(spec: Spec, forward: tuple[Op, ...], moved: set[str]) -> tuple[Op, ...]:
    """The state-free cumulative sums of a per-token vector ([C]: the delta rules' `b = cumsum(g)`) that prep
    writes beside the hoisted values: a scan across the chunk's rows crosses the warps of a program (shared
    memory and a barrier), and the serial kernels would run it every step; read back, the chunk's last value is
    one load (codegen.triton.printer: `last` of a loaded row vector), not a reduction. Only with prep running
    anyway: a kernel of its own for them would cost the segmentable specs a launch and a pass over the gates."""
    stateful = depends(forward, {s.name for s in spec.states})
    return tuple(op for op in forward if op.kind == "cumsum" and op.out not in moved | stateful
                 and op.type is not None and op.type.rank == 1 and op.type.shape[0] == C)


def hoist(spec: Spec, fused: Fused) -> Fused:
    """Fused kernels -> the same kernels reading the hoisted values, after a `prep` kernel that writes them."""
    if spec.reverse_states:  # two walks share the state-free work; hoisting it is not implemented for them
        return fused
    forward = next(k for k in fused.kernels if k.name == "walk").ops  # every op the outputs and next states need
    moved = hoisted_values(spec, forward, [k.ops for k in fused.kernels if k.name.startswith("bwd")])
    if not moved:
        return fused
    moved += row_scans(spec, forward, {op.out for op in moved})
    names = tuple(op.out for op in moved)
    prep = FusedKernel("prep", ("intra",), needed(forward, names), names)
    kernels = [prep]
    for k in fused.kernels:
        ops = tuple(op for op in k.ops if op.out not in names)
        kernels.append(replace(k, ops=needed(ops, k.roots)))
    return Fused(tuple(kernels), hoisted=tuple((op.out, op.type) for op in moved))
