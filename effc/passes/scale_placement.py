"""Scaling placement: a per-row scale of a matmul operand moves to the smaller tile.

The specs and their adjoints scale tiles by per-token vectors before a matmul (the delta rule's state update
`(k * exp(bl - b)[:, None]).T @ v_new`, its adjoint `(k * exp(bl - b)[:, None]) @ dS`). A [C, 1] column
broadcast over a [C, K] tile costs a pass over C x K fp32 values, and the scaled tile is what the matmul
converts (and for a transposed operand, lays out again) for the tensor cores; the same scale can act on a
smaller tile:

- along the contraction: `(A * s).T @ Q == A.T @ (Q * s)` for s: [C, 1] scaling A's rows, Q: [C, N];
- along the result's rows: `(A * s) @ Q == (A @ Q) * s` for s: [M, 1], the result [M, N].

Each moves where the other tile has fewer elements at the typical sizes (passes.kernel_cost.typical_sizes:
a split dim's block against a whole feature dim) and the scaled tile has no other reader, so it is no longer
formed. The unscaled operand is then an input tile as loaded (exact in the matmul's dtype).
"""
from __future__ import annotations

from collections import Counter

from ..ir.nodes import Op, TileType
from .kernel_cost import size


def _column(t: TileType) -> bool:
    return t.rank == 2 and str(t.shape[1]) == "1"


def place_scalings(ops: tuple[Op, ...], types: dict, sizes: dict) -> tuple[Op, ...]:
    """`ops` with each matmul operand scaled per row moved to the smaller tile (see the module docstring)."""
    defs = {op.out: op for op in ops}
    users = Counter(a for op in ops for a in op.args if isinstance(a, str))
    kind = lambda n: defs[n].kind if n in defs else None

    def scaled(name: str):
        """(A, s) where `name` = A * s with s a [rows, 1] column and A of `name`'s type, read only here."""
        op = defs.get(name)
        if op is None or op.kind != "mul" or users[name] != 1:
            return None
        for a, s in ((op.args[0], op.args[1]), (op.args[1], op.args[0])):
            if isinstance(a, str) and isinstance(s, str) and _column(types[s]) and types[a] == op.type:
                return a, s
        return None

    def untransposed(name: str) -> str:
        """`name` through pairs of transposes read only by each other."""
        while kind(name) == "transpose" and users[name] == 1 and kind(inner := defs[name].args[0]) == "transpose" \
                and users[inner] == 1:
            name = defs[inner].args[0]
        return name

    out, dropped = [], set()
    for op in ops:
        if op.kind != "matmul":
            out.append(op)
            continue
        p, q = op.args
        tp = defs.get(p)
        # along the contraction: P = (A * s).T
        if tp is not None and tp.kind == "transpose" and users[p] == 1 and (hit := scaled(tp.args[0])):
            a, s = hit
            if size(types[q], sizes) < size(types[a], sizes):
                at, qs = f"{op.out}_a", f"{op.out}_q"
                out += [Op(at, "transpose", (a,), types[p]), Op(qs, "mul", (q, s), types[q]),
                        Op(op.out, "matmul", (at, qs), op.type)]
                dropped |= {p, tp.args[0]}
                continue
        # along the result's rows: P = A * s (through transposes that cancel)
        base = untransposed(p)
        if (hit := scaled(base)) and size(op.type, sizes) < size(types[base], sizes):
            a, s = hit
            mm = f"{op.out}_m"
            out += [Op(mm, "matmul", (a, q), op.type), Op(op.out, "mul", (mm, s), op.type)]
            name = p
            while name != base:  # the transposes between P and the scaled tile
                dropped.add(name)
                name = defs[name].args[0]
            dropped.add(base)
            continue
        out.append(op)
    return tuple(op for op in out if op.out not in dropped)
