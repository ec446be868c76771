"""Common-subexpression elimination over one kernel's ops.

A spec says what it means, not what is cheapest: delta_net's merge and inter both write `u - w @ S`,
and the reverse-mode derivation recomputes forward values per adjoint. Every op is a pure function of
its arguments (positions and the chunk's valid length are the same for the whole chunk step), so an op
with the same kind and arguments as an earlier one reuses that value. Ops that define a root (an output,
a next state, a gradient) keep their own name: the plan stores those by name.
"""
from __future__ import annotations

from dataclasses import replace

from ..ir.nodes import Op


def cse(ops: tuple[Op, ...], roots: tuple[str, ...]) -> tuple[Op, ...]:
    return cse_with_aliases(ops, roots)[0]


def cse_with_aliases(ops: tuple[Op, ...], roots: tuple[str, ...]) -> tuple[tuple[Op, ...], dict[str, str]]:
    """(the ops without repeats, each dropped value -> the value that holds it)."""
    first: dict[tuple, str] = {}  # (kind, args) -> the value that already holds it
    alias: dict[str, str] = {}
    out = []
    for op in ops:
        op = replace(op, args=tuple(alias.get(a, a) if isinstance(a, str) else a for a in op.args))
        key = (op.kind, op.args)
        if key in first and op.out not in roots:
            alias[op.out] = first[key]
            continue
        first.setdefault(key, op.out)
        out.append(op)
    return tuple(out), alias
