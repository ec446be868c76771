"""Handing on: a serial kernel writes the per-token values that the kernels after it would compute again.

The walk forms the delta rules' `v - w S` to update the state, and the out kernel formed it again from the
walk's history (a matmul and the loads of w and u); the adjoint scan forms `dv = kn dS' + causal(qn kn^T)^T dO`
(whole there since passes.reverse_scan cuts it), and every block of V of `bwd_sums` formed it again (two
matmuls and the loads of k, q and the adjoint). A value a serial kernel holds whole (a [C, d] tile, d the
split dim: each of its blocks forms its own columns) that a later kernel computes with matmul work is written
by the serial kernel, per token in the matmul operand dtype, and read instead of computed, as fla's `fwd_h`
hands `v_new` to `chunk_fwd_o` and its `dhu` hands `dv` on. A gradient kernel forming the same sum under a
name of its own reads it too; a value that is a cheap op of handed ones (`-dv` beside `dv`) is recomputed
where read, not written too.
"""
from __future__ import annotations

from dataclasses import replace

from ..ir import ops as O
from ..ir.nodes import Op, TileType, names_read
from .fusion import Fused, FusedKernel, needed
from .reverse_scan import whole_per_token

def _heavy_cone(name: str, defs: dict[str, Op], memo: dict[str, bool]) -> bool:
    """Does computing `name` from the kernel's loads take a heavy op?"""
    if name not in memo:
        op = defs.get(name)
        memo[name] = op is not None and (op.kind in O.HEAVY or any(
            _heavy_cone(a, defs, memo) for a in op.args if isinstance(a, str)))
    return memo[name]


def _loads_for(k: FusedKernel, offered: dict[str, TileType]) -> tuple[tuple[Op, ...], set[str]]:
    """Kernel `k` reading what it can of `offered` instead of computing it: (its ops, the values it loads)."""
    defs = {op.out: op for op in k.ops}
    memo: dict[str, bool] = {}
    dropped = {n for n in offered if n in defs and _heavy_cone(n, defs, memo)}

    def plan(dropped: set[str]) -> tuple[tuple[Op, ...], set[str]]:
        ops = needed(tuple(op for op in k.ops if op.out not in dropped), k.roots)
        return ops, (names_read(ops) | set(k.roots)) & dropped

    ops, loaded = plan(dropped)
    for op in reversed(k.ops):  # the latest first: `-dv` is recomputed from `dv`, not the other way round
        if op.out in loaded and op.kind not in O.HEAVY and all(  # from loaded values and cheap ones alone
                a in loaded or not _heavy_cone(a, defs, memo) for a in op.args if isinstance(a, str)):
            ops, loaded = plan(dropped - {op.out})
            dropped = dropped - {op.out}
    return ops, loaded


def _same_values(scan: FusedKernel, inject: FusedKernel | None, offered: dict) -> dict[tuple, str]:
    """The offered values by what they compute, (kind, arguments), a bwd_inject term read as the value it
    copies: a gradient kernel that forms the same sum under a name of its own (passes.grad_terms' `_t<n>`)
    reads the scan's."""
    copies = {op.out: op.args[0] for op in (inject.ops if inject else ()) if op.kind == "copy"}
    key = lambda op: (op.kind, tuple(copies.get(a, a) if isinstance(a, str) else a for a in op.args))
    return {key(op): op.out for op in scan.ops if op.out in offered}


def _renamed(k: FusedKernel, same: dict[tuple, str]) -> FusedKernel:
    """Kernel `k` with each value that computes what an offered one does under the offered one's name."""
    names = {op.out: same[key] for op in k.ops if (key := (op.kind, op.args)) in same and same[key] != op.out}
    if not names:
        return k
    r = lambda a: names.get(a, a) if isinstance(a, str) else a
    ops, made = [], set()
    for op in k.ops:  # a kernel forming the value under both names keeps one
        if r(op.out) not in made:
            made.add(r(op.out))
            ops.append(Op(r(op.out), op.kind, tuple(r(a) for a in op.args), op.type))
    ops = tuple(ops)
    return replace(k, ops=ops, roots=tuple(map(r, k.roots)), grads=tuple((x, r(g)) for x, g in k.grads))


def _hand(fused: Fused, writer: FusedKernel, offered: dict[str, TileType], reads, same=None) -> Fused:
    """`writer` writing what the kernels `reads` picks would compute of `offered`, and they reading it."""
    handed: dict[str, TileType] = {}
    kernels = []
    for k in fused.kernels:
        if reads(k):
            k = _renamed(k, same) if same else k
            ops, loaded = _loads_for(k, offered)
            if loaded:
                handed.update({n: offered[n] for n in sorted(loaded, key=list(offered).index)})
                k = replace(k, ops=ops)
        kernels.append(k)
    if not handed:
        return fused
    kernels = [replace(k, scratch_stores=k.scratch_stores + tuple(handed.items())) if k.name == writer.name else k
               for k in kernels]
    return replace(fused, kernels=tuple(kernels), handed=fused.handed + tuple(handed.items()))


def read_outputs(fused: Fused, outputs: dict[str, TileType]) -> Fused:
    """The chunk-parallel backward kernels reading the op's outputs (`outputs`, name -> tile type), which the
    backward holds (autograd keeps them), where they would compute them again with matmul work (mLSTM's
    normaliser adjoint reads `o`: `P v` and `q C` in bwd_inject and in each block of bwd_sums). Lists the
    outputs read in `Fused.outputs_read`."""
    read: set[str] = set()
    kernels = []
    for k in fused.kernels:
        if k.name == "bwd_inject" or k.name.startswith("bwd_chunks_"):
            ops, loaded = _loads_for(k, outputs)
            if loaded:
                read |= loaded
                k = replace(k, ops=ops)
        kernels.append(k)
    if not read:
        return fused
    return replace(fused, kernels=tuple(kernels), outputs_read=tuple(n for n in outputs if n in read))


def hand_on(fused: Fused, split: str | None) -> Fused:
    """Fused kernels -> the same with the serial kernels writing the per-token values later kernels read
    instead of computing (module docstring): the walk for the out kernel (the state update's values only: the
    walk skips merge where out runs), the adjoint scan for the gradient kernels. Unchanged for the
    bidirectional specs (two walks, two scans)."""
    by_name = {k.name: k for k in fused.kernels}
    walk, out = by_name.get("walk"), by_name.get("out")
    if walk is not None and out is not None and "walk_rev" not in by_name:
        nexts = tuple(r for r in walk.roots if r not in out.roots)
        offered = {op.out: op.type for op in needed(walk.ops, nexts) if whole_per_token(op.type, split)}
        fused = _hand(fused, walk, offered, lambda k: k.name == "out")
    scans = [k for k in fused.kernels if k.name.startswith("bwd_scan")]
    if len(scans) == 1:
        scan = scans[0]
        offered = {op.out: op.type for op in scan.ops if whole_per_token(op.type, split)}
        same = _same_values(scan, next((k for k in fused.kernels if k.name == "bwd_inject"), None), offered)
        fused = _hand(fused, scan, offered, lambda k: k.name.startswith("bwd_chunks_"), same)
    return fused
