"""Hoisting: in-chunk solves leave the sequential walk for a chunk-parallel `prep` kernel.

The walk visits a sequence's chunks one after another, so every op in its body sits on the critical
path, even ops that never read the carried state. Most of those are cheap elementwise work, but an
in-chunk solve (`unit_lower_inv`, the delta rule's UT transform: log2(C) fp32 [C, C] products) and
the products built from it cost more than the state update itself. This pass computes them once per
chunk, for all chunks in parallel, and the walk (and every kernel of the backward) loads them.

What moves: the values that a state-dependent op reads, that read no state themselves, and whose
computation contains a solve (delta_net: `w = t @ kb`, `u = t @ (v * beta)`). Each is a per-token
tile ([C] or [C, d]), stored once per chunk in a chunk-padded scratch buffer. What the state-free
part needs besides them (l2-normalised q and k, decay masks) stays where it is: recomputing a few
elementwise ops is cheaper than a round trip through memory.
"""
from __future__ import annotations

from dataclasses import replace

from ..ir.nodes import C, Op, Spec, TileType, next_state_name
from ..ir.ops import SOLVES
from .fusion import Fused, FusedKernel, depends, live_ops, needed


def _per_token(t: TileType | None) -> bool:
    """A tile with one row per token ([C] or [C, d]): it fits a (tokens, heads, d) scratch buffer."""
    return t is not None and 1 <= t.rank <= 2 and t.shape[0] == C


def hoisted_values(spec: Spec, forward: tuple[Op, ...]) -> tuple[Op, ...]:
    """The ops of the forward (every op the outputs and next states need) whose values move to the
    prep kernel (see the module docstring)."""
    stateful = depends(forward, {s.name for s in spec.states})
    solved = depends(forward, {op.out for op in forward if op.kind in SOLVES}) - stateful
    read = {a for op in forward if op.out in stateful for a in op.args if isinstance(a, str)}
    return tuple(op for op in forward if op.out in solved and op.out in read and _per_token(op.type))


def hoist(spec: Spec, fused: Fused) -> Fused:
    """Fused kernels -> the same kernels reading the hoisted values, after a `prep` kernel that writes them."""
    roots = tuple(o.name for o in spec.outputs) + tuple(next_state_name(s.name) for s in spec.states)
    forward = live_ops(spec.intra.ops + spec.merge.ops + spec.inter.ops, roots)
    moved = hoisted_values(spec, forward)
    if not moved:
        return fused
    names = tuple(op.out for op in moved)
    prep = FusedKernel("prep", ("intra",), needed(forward, names), names)
    kernels = [prep]
    for k in fused.kernels:
        ops = tuple(op for op in k.ops if op.out not in names)
        kernels.append(replace(k, ops=needed(ops, k.roots)))
    return Fused(tuple(kernels), hoisted=tuple((op.out, op.type) for op in moved))
