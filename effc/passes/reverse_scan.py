"""Splitting the reverse scan: what reads no carried adjoint leaves the serial loop.

The backward's reverse scan carries each state's adjoint from the last chunk to the first. Its update
is a sum: terms that read the carried adjoint (for the delta rule, -w^T (kn dS)) and terms that read
only the output cotangents and the chunk (-w^T causal(qn kn^T)^T dO + qn^T dO): most of the matmuls.
For a walk that cannot be segmented (a general transition), `bwd_inject` computes the second group
for every chunk in parallel, and the scan adds it: the serial chain keeps what it must. A segmentable
spec's scan is cheap (its transition is diagonal) and is left whole.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

from ..ir.nodes import Op, Spec, TileType, next_state_name
from .autodiff import seed_name
from .fusion import Fused, FusedKernel, depends, needed


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
    carried = depends(scan.ops, set(state_tiles))
    defs = {op.out: op for op in scan.ops}
    uses = Counter(a for op in scan.ops for a in op.args if isinstance(a, str))
    costly = depends(scan.ops, {op.out for op in scan.ops if op.kind == "matmul"})
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
        injected.append((root, x_name))
    if not injected:
        return fused
    scan_ops = [op for op in scan.ops if op.out not in rewritten] + [op for r in rewritten.values() for op in r]
    scan_ops = needed(tuple(scan_ops), scan.roots)
    free_roots = tuple(x for _, x in injected)
    inject_ops = needed(tuple(scan.ops) + tuple(inject), free_roots)
    kernels = list(fused.kernels)
    kernels[names.index("bwd_scan")] = replace(scan, ops=scan_ops)
    kernels.insert(names.index("bwd_scan"), FusedKernel("bwd_inject", scan.stages, inject_ops, free_roots))
    return replace(fused, kernels=tuple(kernels), injected=tuple(injected))
