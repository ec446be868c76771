"""Derivatives of score modifiers and epilogues: one vector-Jacobian rule per tile op, in one table.

The softmax family's backward (passes.softmax_bwd) differentiates three pieces of a spec with these
rules: the pair ops of the score stage (a tanh cap, a bias on the distance qpos - kpos, a difference of
per-token gates, a position-dependent scale and shift, masks as `where`), the query- and key-side ops
they read, and the epilogue of merge (an output gate). The rules are written over IR ops and emit IR ops, so every
backend prints the backward with the printer it already has.

    RULES[kind](b, op, gy) -> one contribution per argument (None: no gradient to that argument)

`b` is a `Builder`; `op.out` is the forward value y, `gy` the adjoint of y. A contribution has the
shape of the op's result; `Builder.accumulate` sums it over the axes its argument was broadcast along
(for a [C, 1] query-side column added to a [C, CK] score that is a row sum over the key block: a
partial sum that the walk accumulates over key blocks). Comparisons, `and`/`or`/`not` and the
predicate of `where` carry no gradient. The same rules (minus `where`, `key`, `query` and the
comparisons) are the linear family's in passes.autodiff, and are meant to merge with them.
"""
from __future__ import annotations

import math
from typing import Callable

import sympy

from ..ir import ops as O
from ..ir.nodes import Op, TileType
from .shapes import SCALAR

_ONE = sympy.Integer(1)
LN2 = math.log(2.0)


class Builder:
    """Emits typed IR ops for the adjoints; `type_of` is the shape rule (passes.softmax.softmax_op_type)."""

    def __init__(self, types: dict[str, TileType], type_of: Callable, prefix: str = "_g"):
        self.types = dict(types)
        self.type_of = type_of
        self.ops: list[Op] = []
        self.prefix = prefix
        self.n = 0

    def emit(self, kind: str, *args) -> str:
        self.n += 1
        out = f"{self.prefix}{self.n}"
        n_args = 1 if kind == "expand" else len(args)
        op = Op(out, kind, tuple(args))
        t = self.type_of(op, [SCALAR if isinstance(a, float) else self.types[a] for a in args[:n_args]])
        self.types[out] = t
        self.ops.append(op.typed(t))
        return out

    def shape(self, x) -> tuple:
        return () if isinstance(x, float) else self.types[x].shape

    def fit(self, g: str, target: tuple) -> str:
        """Sum g over the axes along which a value of shape `target` was broadcast to g's shape."""
        shape = self.shape(g)
        if len(shape) > len(target):  # a lower-rank value broadcast from the right
            if len(shape) == 2 and len(target) == 1:
                if target[0] == shape[1] and shape[0] != _ONE:
                    return self.emit("colsum", g)
                if shape[0] == _ONE and target[0] == shape[1]:
                    return self.emit("colsum", g)
            if len(shape) == 2 and len(target) == 0:
                return self.emit("total", g)
            if len(shape) == 1 and len(target) == 0:
                return self.emit("total", g)
        if len(shape) == 2 and len(target) == 2:
            if target[0] == _ONE and shape[0] != _ONE:
                g = self.emit("expand", self.emit("colsum", g), 1.0, 0.0)
            if target[1] == _ONE and self.shape(g)[1] != _ONE:
                g = self.emit("expand", self.emit("rowsum", g), 0.0, 1.0)
        return g

    def accumulate(self, grads: dict[str, str], x, g: str) -> None:
        """grads[x] += g, brought to x's shape."""
        if isinstance(x, float):
            return
        g = self.fit(g, self.shape(x))
        if self.shape(g) != self.shape(x):
            g = self.emit("bcast", g, x)
        grads[x] = self.emit("add", grads[x], g) if x in grads else g


def _sum_new_axes(b: Builder, op: Op, g: str) -> str:
    for axis in reversed([i for i, p in enumerate(op.args[1:]) if p == 1.0]):
        g = b.emit("rowsum" if axis == 1 else "colsum", g) if len(b.shape(g)) == 2 else b.emit("total", g)
    return g


def _reduce_back(b: Builder, op: Op, g: str):
    axis, how = O.REDUCTIONS[op.kind]
    pattern = (0.0, 1.0) if axis == 1 else (1.0, 0.0)
    e = b.emit("expand", g, *pattern)
    if how == "max":  # to the maximal entries
        e = b.emit("mul", e, b.emit("ge", op.args[0], b.emit("expand", op.out, *pattern)))
    return (b.emit("bcast", e, op.args[0]),)


def _zero(op: Op):
    return (None,) * len(op.args)


def _silu(b, op, g):
    s = b.emit("sigmoid", op.args[0])
    return (b.emit("mul", g, b.emit("mul", s, b.emit("add", 1.0, b.emit("mul", op.args[0], b.emit("sub", 1.0, s))))),)


def _pow(b, op, g):
    x, c = op.args
    if isinstance(c, str) and c in b.types and b.types[c].rank:
        raise NotImplementedError("score_grad: gradient through a tile-valued exponent of '**'")
    cm1 = c - 1.0 if isinstance(c, float) else b.emit("sub", c, 1.0)
    return (b.emit("mul", b.emit("mul", g, c), b.emit("pow", x, cm1)), None)


def _minmax(b, op, g):
    x, y = op.args
    first = b.emit("ge", x, y) if op.kind == "maximum" else b.emit("ge", y, x)
    return (b.emit("mul", g, first), b.emit("mul", g, b.emit("sub", 1.0, first)))


# One rule per tile op: (builder, forward op, adjoint of its result) -> a contribution per argument.
RULES: dict[str, Callable] = {
    # plumbing
    "copy": lambda b, op, g: (g,),
    "query": lambda b, op, g: (b.emit("rowsum", g) if b.shape(op.args[0]) != b.shape(op.out) else g,),  # [C,1]->[C]
    "key": lambda b, op, g: (b.emit("colsum", g) if b.shape(op.args[0])[1:] != b.shape(op.out)[1:]
                             or len(b.shape(op.args[0])) == 1 else g,),  # [1,CK]->[CK]
    "transpose": lambda b, op, g: (b.emit("transpose", g),),
    "expand": lambda b, op, g: (_sum_new_axes(b, op, g),),
    # arithmetic
    "neg": lambda b, op, g: (b.emit("neg", g),),
    "add": lambda b, op, g: (g, g),
    "sub": lambda b, op, g: (g, b.emit("neg", g)),
    "mul": lambda b, op, g: (b.emit("mul", g, op.args[1]), b.emit("mul", g, op.args[0])),
    "div": lambda b, op, g: (b.emit("div", g, op.args[1]), b.emit("neg", b.emit("div", b.emit("mul", g, op.out),
                                                                                     op.args[1]))),
    "pow": _pow,
    "maximum": _minmax,
    "minimum": _minmax,
    "matmul": lambda b, op, g: (b.emit("matmul", g, b.emit("transpose", op.args[1])),
                                b.emit("matmul", b.emit("transpose", op.args[0]), g)),
    # score modifiers
    "exp": lambda b, op, g: (b.emit("mul", g, op.out),),
    "exp2": lambda b, op, g: (b.emit("mul", b.emit("mul", g, op.out), LN2),),
    "log": lambda b, op, g: (b.emit("div", g, op.args[0]),),
    "log2": lambda b, op, g: (b.emit("div", g, b.emit("mul", op.args[0], LN2)),),
    "tanh": lambda b, op, g: (b.emit("mul", g, b.emit("sub", 1.0, b.emit("mul", op.out, op.out))),),  # a tanh cap
    "sigmoid": lambda b, op, g: (b.emit("mul", b.emit("mul", g, op.out), b.emit("sub", 1.0, op.out)),),  # gates
    "logsigmoid": lambda b, op, g: (b.emit("mul", g, b.emit("sigmoid", b.emit("neg", op.args[0]))),),
    "softplus": lambda b, op, g: (b.emit("mul", g, b.emit("sigmoid", op.args[0])),),
    "silu": _silu,
    "relu": lambda b, op, g: (b.emit("mul", g, b.emit("gtz", op.args[0])),),
    "abs": lambda b, op, g: (b.emit("mul", g, b.emit("sign", op.args[0])),),
    "sqrt": lambda b, op, g: (b.emit("div", b.emit("mul", g, 0.5), op.out),),
    "rsqrt": lambda b, op, g: (b.emit("mul", b.emit("mul", g, -0.5),
                                      b.emit("mul", op.out, b.emit("mul", op.out, op.out))),),
    # masks and predicates: the predicate has no gradient; the selected branch gets the adjoint
    "where": lambda b, op, g: (None, b.emit("where", op.args[0], g, 0.0), b.emit("where", op.args[0], 0.0, g)),
    **{k: (lambda b, op, g: _zero(op)) for k in O.COMPARE + O.LOGIC},
    # per-token reductions over a feature axis (query or key side)
    **{k: _reduce_back for k in O.REDUCTIONS},
}


def backprop(b: Builder, ops, grads: dict[str, str], wants: Callable[[str], bool]) -> None:
    """Reverse mode over `ops` (in forward order): for each op whose result has an adjoint in `grads`,
    add its contributions to the arguments for which `wants(arg)` holds."""
    for op in reversed(tuple(ops)):
        g = grads.get(op.out)
        if g is None:
            continue
        rule = RULES.get(op.kind)
        if rule is None:
            raise NotImplementedError(f"score_grad: no derivative rule for tile op '{op.kind}'")
        n_args = 1 if op.kind == "expand" else len(op.args)
        contributions = rule(b, op, g)
        for x, c in zip(op.args[:n_args], contributions):
            if c is not None and isinstance(x, str) and wants(x):
                b.accumulate(grads, x, c)
