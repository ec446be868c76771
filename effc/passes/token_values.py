"""Per-token score values computed once per token (the softmax family).

A score stage's value that depends on one side's token only (its query or key tile, its position, numbers,
params and per-feature constants) is recomputed by every program that loads that token's block: a key-side
value once per query block that walks the key block, a query-side value once per key block in dK/dV. For
cheap values (a scale) that is free beside the block's matmuls; for transcendental or rotation work it is not:
RoPE written in the score (`kr = k * cos(kpos.T * theta) + rotate_half(k) * sin(kpos.T * theta)`) evaluates
2 x BN x D sines and cosines per key tile in every query block's program, as much SFU time as the tile's
products (docs/benchmarks.md, RoPE). This pass moves such values into the prefix stage, which a generated
kernel computes once per token (passes.softmax_plan.prefix_lowered), and the score reads them back through
query(...) and key(...), as a spec written with a prefix stage would:

    score: kr = <token-local work on key(k), kpos.T, constants>     ->   prefix: kr__tok = <the same on k, pos>
                                                                         score:  kr = key(kr__tok)

What moves: the values of one side whose computation (within that side) contains an op of EXPENSIVE kinds
and that a pair or the other side reads: the frontier. The constants they read are copied into the prefix.
Left alone: specs with a select stage (decoding a select stage with a prefix is not lowered) or keys over a
key sequence of their own (kpos is not a token's position there), and values of rank > 2.
"""
from __future__ import annotations

from dataclasses import replace

from ..ir import ops as O
from ..ir.nodes import CK, C, Op, Spec, Stage
from .fusion import needed

# op kinds worth a pass over the tokens: special-function units and feature shuffles, not arithmetic
EXPENSIVE = frozenset({"exp", "exp2", "log", "log2", "sigmoid", "logsigmoid", "softplus", "tanh", "silu", "sin",
                       "cos", "pow"}) | frozenset(O.ROTATIONS)
_SIDES = {"q": (C, "query"), "k": (CK, "key")}  # a side's token axis and its read
TOKEN_SUFFIX = "__tok"  # the moved values' prefix names (passes.softmax says which moved)


def hoist_token_values(spec: Spec, retype) -> Spec:
    """`spec` typed (passes.softmax); returns it unchanged or, with values moved into the prefix stage,
    rewritten and typed again by `retype` (the shape pass)."""
    if spec.selection is not None or spec.keyseq is not None or not spec.score.ops:
        return spec
    ops = list(spec.score.ops)
    moved: dict[str, tuple[str, list[Op]]] = {}  # frontier value -> (side, prefix ops computing it)
    for side in ("q", "k"):
        moved.update(_frontier(spec, ops, side))
    if not moved:
        return spec
    prefix = list(spec.prefix.ops)
    have = {op.out for op in prefix}
    for _, new in moved.values():
        for op in new:
            if op.out not in have:
                prefix.append(op)
                have.add(op.out)
    score = []
    for op in ops:
        if op.out in moved:
            side = moved[op.out][0]
            score.append(Op(op.out, _SIDES[side][1], (op.out + TOKEN_SUFFIX,), loc=op.loc))
        else:
            score.append(_untyped(op))
    roots = tuple(spec.masks) + tuple(a for op in spec.merge.ops + spec.select.ops for a in op.args if isinstance(a, str))
    score = needed(tuple(score), roots)  # the values only the moved ones read are gone
    out = replace(spec, prefix=Stage("prefix", tuple(_untyped(op) for op in prefix)),
                  score=Stage("score", tuple(score)), merge=Stage("merge", tuple(_untyped(op) for op in spec.merge.ops)),
                  select=Stage("select", tuple(_untyped(op) for op in spec.select.ops)))
    return retype(out)


def _untyped(op: Op) -> Op:
    return replace(op, type=None)


def _frontier(spec: Spec, ops: list[Op], side: str) -> dict:
    """The values of `side` to move: {name: (side, prefix ops)}."""
    axis, load = _SIDES[side]
    by_out = {op.out: op for op in ops}
    params = {p.name for p in spec.params}
    local: dict[str, bool] = {}  # token-local on this side -> has expensive work in its cone

    def constant(x) -> bool:  # no token axis: numbers, params, dims, per-feature values
        if not isinstance(x, str):
            return True
        if x in params or x in spec.dims:
            return True
        op = by_out.get(x)
        return op is not None and op.type is not None and C not in op.type.shape and CK not in op.type.shape

    for op in ops:
        t = op.type
        if t is None or t.rank == 0 or t.rank > 2 or t.shape[0] != axis or (t.rank == 2 and t.shape[1] in (C, CK)):
            continue
        if op.kind == load:
            local[op.out] = False
            continue
        if side == "k" and op.kind == "transpose" and op.args == ("kpos",):
            local[op.out] = False
            continue
        n_args = 1 if op.kind == "expand" else len(op.args)
        args = op.args[:n_args]
        if all(a in local or constant(a) or (side == "q" and a == "qpos") for a in args):
            local[op.out] = op.kind in EXPENSIVE or any(local.get(a, False) for a in args if isinstance(a, str))
    users: dict[str, list[Op]] = {}
    for op in ops + list(spec.merge.ops):
        for a in op.args:
            if isinstance(a, str):
                users.setdefault(a, []).append(op)
    frontier = [x for x, work in local.items() if work and any(u.out not in local for u in users.get(x, []))]
    out = {}
    for x in frontier:
        out[x] = (side, _prefix_ops(x, by_out, side))
    return out


def _prefix_ops(x: str, by_out: dict, side: str) -> list[Op]:
    """The prefix ops computing frontier value `x` per token: its cone on this side (loads read the input
    itself; the position is the prefix's `pos` as a column) and the per-feature constants it reads, each
    renamed with a suffix (prefix names are the spec's too)."""
    load = _SIDES[side][1]
    order: list[Op] = []
    seen: set[str] = set()

    def name(a):
        if not isinstance(a, str):
            return a
        if a == "qpos":
            return "pos" + TOKEN_SUFFIX
        return a + TOKEN_SUFFIX if a in by_out else a  # a param or a dim keeps its name

    def visit(a):
        if not isinstance(a, str) or a in seen:
            return
        seen.add(a)
        if a == "qpos":
            order.append(Op("pos" + TOKEN_SUFFIX, "expand", ("pos", 0.0, 1.0)))
            return
        op = by_out.get(a)
        if op is None:
            return
        if op.kind == load:
            order.append(Op(a + TOKEN_SUFFIX, "copy", (op.args[0],), loc=op.loc))
            return
        if op.kind == "transpose" and op.args == ("kpos",):
            order.append(Op(a + TOKEN_SUFFIX, "expand", ("pos", 0.0, 1.0), loc=op.loc))
            return
        n_args = 1 if op.kind == "expand" else len(op.args)
        for b in op.args[:n_args]:
            visit(b)
        order.append(Op(a + TOKEN_SUFFIX, op.kind, tuple(name(b) for b in op.args[:n_args]) + op.args[n_args:], loc=op.loc))

    visit(x)
    return order
