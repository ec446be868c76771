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

from collections import Counter
from dataclasses import replace

from ..ir.nodes import C, Op, Spec, TileType, next_state_name
from ..ir.ops import SOLVES
from .autodiff import seed_name
from .fusion import Fused, FusedKernel, live_ops, needed


def _depends(ops: tuple[Op, ...], sources: set[str]) -> set[str]:
    """The values that read (transitively) any of `sources`."""
    reached = set(sources)
    for op in ops:
        if any(isinstance(a, str) and a in reached for a in op.args):
            reached.add(op.out)
    return reached


def _per_token(t: TileType | None) -> bool:
    """A tile with one row per token ([C] or [C, d]): it fits a (tokens, heads, d) scratch buffer."""
    return t is not None and 1 <= t.rank <= 2 and t.shape[0] == C


def hoisted_values(spec: Spec, forward: tuple[Op, ...]) -> tuple[Op, ...]:
    """The ops of the forward (every op the outputs and next states need) whose values move to the
    prep kernel (see the module docstring)."""
    stateful = _depends(forward, {s.name for s in spec.states})
    solved = _depends(forward, {op.out for op in forward if op.kind in SOLVES}) - stateful
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


# -- the reverse scan ------------------------------------------------------------------------------
#
# The backward's reverse scan carries each state's adjoint from the last chunk to the first. Its update
# is a sum: terms that read the carried adjoint (for the delta rule, -w^T (kn dS)) and terms that read
# only the output cotangents and the chunk (-w^T causal(qn kn^T)^T dO + qn^T dO): most of the matmuls.
# For plans whose walk cannot be segmented (those with an `out` kernel), `bwd_inject` computes the
# second group for every chunk in parallel, and the scan adds it: the serial chain keeps what it must.


def _sum_terms(root: str, defs: dict[str, Op], uses: Counter) -> list | None:
    """The terms of `root` when it is a tree of adds (an inner add used only by the tree), else None."""
    if root not in defs or defs[root].kind != "add":
        return None
    terms = []
    for a in defs[root].args:
        inner = isinstance(a, str) and a in defs and defs[a].kind == "add" and uses[a] == 1
        terms += _sum_terms(a, defs, uses) if inner else [a]
    return terms


def _chain(name: str, terms: list[str], t: TileType) -> list[Op]:
    """`name` = the sum of `terms`, as a chain of adds (a copy for one term)."""
    if len(terms) == 1:
        return [Op(name, "copy", (terms[0],), t)]
    ops, acc = [], terms[0]
    for i, x in enumerate(terms[1:]):
        out = name if i == len(terms) - 2 else f"{name}_{i}"
        ops.append(Op(out, "add", (acc, x), t))
        acc = out
    return ops


def injection_name(root: str) -> str:
    return f"_inj{root}"


def split_reverse_scan(spec: Spec, fused: Fused) -> Fused:
    """bwd_scan -> bwd_inject (the carried-free terms of each state adjoint, per chunk, in parallel) +
    bwd_scan (the carried terms, plus the injected sum). A state whose adjoint is not a plain sum of
    same-shaped terms, or whose carried-free terms hold no matmul, stays as it was."""
    names = [k.name for k in fused.kernels]
    if "summary" in names or "bwd_scan" not in names:  # a segmentable spec's scan is cheap: left whole
        return fused
    scan = fused.kernels[names.index("bwd_scan")]
    state_tiles = {seed_name(next_state_name(s.name)): s.tile for s in spec.states}
    carried = _depends(scan.ops, set(state_tiles))
    defs = {op.out: op for op in scan.ops}
    uses = Counter(a for op in scan.ops for a in op.args if isinstance(a, str))
    costly = _depends(scan.ops, {op.out for op in scan.ops if op.kind == "matmul"})
    inject, rewritten, injected = [], {}, []
    for root in scan.roots:
        terms = _sum_terms(root, defs, uses)
        if terms is None or any(not isinstance(x, str) for x in terms):
            continue
        t = defs[root].type
        if any((defs[x].type if x in defs else state_tiles.get(x)) != t for x in terms):
            continue  # an add that broadcasts: the terms cannot be regrouped
        free = [x for x in terms if x not in carried]
        kept = [x for x in terms if x in carried]
        if not kept or not any(x in costly for x in free):
            continue
        x_name = injection_name(root)
        inject += _chain(x_name, free, t)
        kept_sum = kept[0] if len(kept) == 1 else f"_kept{root}"
        rewritten[root] = (_chain(kept_sum, kept, t) if len(kept) > 1 else []) + [Op(root, "add", (kept_sum, x_name), t)]
        injected.append((root, x_name, t))
    if not injected:
        return fused
    scan_ops = [op for op in scan.ops if op.out not in rewritten] + [op for r in rewritten.values() for op in r]
    scan_ops = needed(tuple(scan_ops), scan.roots)
    free_roots = tuple(x for _, x, _ in injected)
    inject_ops = needed(tuple(scan.ops) + tuple(inject), free_roots)
    kernels = list(fused.kernels)
    kernels[names.index("bwd_scan")] = replace(scan, ops=scan_ops)
    kernels.insert(names.index("bwd_scan"), FusedKernel("bwd_inject", scan.stages, inject_ops, free_roots))
    return replace(fused, kernels=tuple(kernels), injected=tuple((r, x) for r, x, _ in injected))
