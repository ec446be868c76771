"""Looping over the split dim's blocks inside one gradient kernel (passes.partition decides where).

The split dim (V) is one that no forward op contracts or reduces (passes.legality), so in a chunk's
backward the values without it never read a value with it except through a sum over it: the
adjoints of the K-side values (`dq = dO @ S^T`, the normaliser's `rowsum(dO * o)`) contract V.
A gradient kernel can then compute the K-side values once (`before`), loop over the blocks of V
(`body`, accumulating each op that sums over V: `sums`), and finish the K-side adjoints once
(`after`), writing whole gradients where one program per block writes partials that are summed
after the kernels. Adjoints are linear in the cotangents, so the sum of the blocks' partial
results equals the result computed from the summed contractions.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.nodes import Op, TileType
from ..ir.printer import print_op

_SUMS = {"matmul", "rowsum", "colsum", "total"}  # ops that may sum over the split dim


@dataclass(frozen=True)
class BlockLoop:
    before: tuple[Op, ...]  # no split dim, read no sum over it: once per chunk, before the loop
    body: tuple[Op, ...]  # per block of the split dim; the ops named in `sums` accumulate
    sums: tuple[str, ...]  # body values that sum over the split dim: zero before the loop, added per block
    after: tuple[Op, ...]  # read the sums: once per chunk, after the loop

    def __str__(self) -> str:
        lines = ["before the loop:"] + [f"  {print_op(op)}" for op in self.before]
        lines += ["per block of the split dim:"]
        lines += [f"  {print_op(op)}" + ("   (accumulated)" if op.out in self.sums else "") for op in self.body]
        lines += ["after the loop:"] + [f"  {print_op(op)}" for op in self.after]
        return "\n".join(lines)


def _has(t: TileType, dim: str) -> bool:
    return any(getattr(d, "name", None) == dim for d in t.shape)  # a dim symbol (sympy's str() is slow)


def _sums_over(op: Op, types: dict, dim: str) -> bool:
    """Does `op`, whose argument has `dim` and whose result does not, sum over `dim`?"""
    if op.kind == "matmul":
        return str(types[op.args[0]].shape[1]) == dim
    if op.kind in ("rowsum", "colsum"):
        return str(types[op.args[0]].shape[1 if op.kind == "rowsum" else 0]) == dim
    return op.kind == "total"


def loop_over_blocks(ops: tuple[Op, ...], types: dict[str, TileType], dim: str) -> BlockLoop | None:
    """The kernel's ops in three parts around a loop over the blocks of `dim`; None when some value without
    `dim` that the loop would need reads a sum over it, or a reduction over `dim` is not a sum."""
    defined = {op.out for op in ops}
    side = {}  # value -> "before" | "body" | "sum" | "after"
    for name, t in types.items():
        if name not in defined:
            side[name] = "body" if _has(t, dim) else "before"
    for op in ops:
        reads = {side.get(a, "before") for a in op.args if isinstance(a, str)}
        if _has(types[op.out], dim):
            if reads & {"sum", "after"}:
                return None
            side[op.out] = "body"
        elif "body" in reads:
            if reads & {"sum", "after"} or op.kind not in _SUMS or not _sums_over(op, types, dim):
                return None
            side[op.out] = "sum"
        else:
            side[op.out] = "after" if reads & {"sum", "after"} else "before"
    # a K-side value only the after-part reads (or a gradient no op reads) is computed there: it need not
    # stay live across the loop
    users: dict[str, list[str]] = {}
    for u in ops:
        for a in u.args:
            if isinstance(a, str):
                users.setdefault(a, []).append(u.out)
    for op in reversed(ops):
        readers = {side[u] for u in users.get(op.out, ())}
        if side[op.out] == "before" and readers <= {"after"}:
            side[op.out] = "after"
    part = lambda *names: tuple(op for op in ops if side[op.out] in names)
    return BlockLoop(part("before"), part("body", "sum"), tuple(op.out for op in ops if side[op.out] == "sum"),
                     part("after"))
