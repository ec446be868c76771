"""Vector-Jacobian rules of the tile ops: one table, keyed by op kind, for every derived backward.

The linear family's chunk step (passes.autodiff) and the softmax family's score stage and epilogue
(passes.softmax_bwd) are both differentiated by `backprop` with these rules, so a derivative is written once.

    RULES[kind](e, op, gy) -> one entry per argument of `op`: None (no gradient reaches it), or a function
                              of no arguments that emits the contribution's ops through `e` and returns it

`e` is an `Adjoints` emitter, `op.out` the forward value y, `gy` the adjoint of y. A contribution has the
shape of the op's result; `Adjoints.add` sums it over the axes its argument was broadcast along (for a
softmax [C, 1] query-side column added to a [C, CK] score, a row sum over the key block: a partial sum the
walk accumulates over key blocks). Contributions are made lazily, only for the arguments a backward
differentiates: the exponent of `**` raises only when the exponent itself needs a gradient. Comparisons,
`and`/`or`/`not` and the predicate of `where` carry no gradient.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import sympy

from ..ir import ops as O
from ..ir.nodes import Op, TileType
from .shapes import SCALAR, op_type

_ONE = sympy.Integer(1)
LN2 = math.log(2.0)


class Adjoints:
    """Builds adjoint ops (typed by `type_of`, named `<prefix><n>`) and sums each value's adjoint in `grad`.
    `type_of` is the family's shape rule (passes.shapes.op_type; passes.softmax.softmax_op_type)."""

    def __init__(self, types: dict[str, TileType], prefix: str = "_d", type_of: Callable = op_type):
        self.types = dict(types)
        self.prefix = prefix
        self.type_of = type_of
        self.ops: list[Op] = []
        self.grad: dict[str, str] = {}
        self.made: dict[str, Op] = {}
        self.n = 0

    def emit(self, kind: str, *args) -> str:
        src = self.made.get(args[0]) if args and isinstance(args[0], str) else None
        if kind in ("rowsum", "colsum") and src is not None and src.kind == "expand":
            # summing away the axis an expand just inserted gives back its input
            inserted = [i for i, p in enumerate(src.args[1:]) if p == 1.0]
            if inserted == [1 if kind == "rowsum" else 0]:
                return src.args[0]
        self.n += 1
        out = f"{self.prefix}{self.n}"
        n_args = 1 if kind == "expand" else len(args)
        op = Op(out, kind, tuple(args))
        t = self.type_of(op, [SCALAR if isinstance(a, float) else self.types[a] for a in args[:n_args]])
        self.types[out] = t
        self.ops.append(op.typed(t))
        self.made[out] = op
        return out

    def shape(self, x) -> tuple:
        return () if isinstance(x, float) else self.types[x].shape

    def unbroadcast(self, g: str, target: tuple) -> str:
        """Sum a gradient over the axes its value was broadcast along in the forward op."""
        while len(self.shape(g)) > len(target):
            g = self.emit("colsum", g) if len(self.shape(g)) == 2 else self.emit("total", g)
        shape = self.shape(g)
        if len(shape) == 2:
            if target[0] == _ONE and shape[0] != _ONE:
                g = self.emit("expand", self.emit("colsum", g), 1.0, 0.0)
            if target[1] == _ONE and shape[1] != _ONE:
                g = self.emit("expand", self.emit("rowsum", g), 0.0, 1.0)
        elif len(shape) == 1 and target[0] == _ONE and shape[0] != _ONE:
            g = self.emit("expand", self.emit("total", g), 0.0)  # cannot happen from 1-D tiles; kept total
        return g

    def add(self, x, contribution: str) -> None:
        """Accumulate d(x) += contribution, brought to x's exact shape."""
        if isinstance(x, float) or x not in self.types:
            return
        target = self.shape(x)
        g = self.unbroadcast(contribution, target)
        if self.shape(g) != target:
            g = self.emit("bcast", g, x)
        self.grad[x] = self.emit("add", self.grad[x], g) if x in self.grad else g


def _unary(d: Callable) -> Callable:
    """The rule of an op whose first argument alone is differentiable: d(e, x, y, gy) -> dx."""
    return lambda e, op, g: (lambda: d(e, op.args[0], op.out, g),) + (None,) * (len(op.args) - 1)


def _binary(d0: Callable, d1: Callable) -> Callable:
    """The rule of a two-argument op: d_i(e, a, b, y, gy) -> the contribution to its i-th argument."""
    return lambda e, op, g: (lambda: d0(e, *op.args, op.out, g), lambda: d1(e, *op.args, op.out, g))


def _minmax(e, op, g):
    a, b = op.args
    first = e.emit("ge", a, b) if op.kind == "maximum" else e.emit("ge", b, a)  # where the first argument wins
    return lambda: e.emit("mul", g, first), lambda: e.emit("mul", g, e.emit("sub", 1.0, first))


def _pow(e, op, g):
    x, c = op.args

    def dc():  # a param exponent is a constant; only one that depends on an input would need this
        raise NotImplementedError(f"autodiff: gradient through the exponent of '**' ({op.loc})")
    return (lambda: e.emit("mul", e.emit("mul", g, c), e.emit("pow", x, c - 1.0) if isinstance(c, float)
                           else e.emit("pow", x, e.emit("sub", c, 1.0))), dc)


def _expand(e, op, g):
    """An expand inserts size-1 axes: its adjoint sums them away."""
    def dx():
        d = g
        for axis in reversed([i for i, p in enumerate(op.args[1:]) if p == 1.0]):
            d = e.emit("rowsum" if axis == 1 else "colsum", d) if len(e.shape(d)) == 2 else e.emit("total", d)
        return d
    return (dx,) + (None,) * (len(op.args) - 1)


def _reduction(e, op, g):
    def dx():
        x, (axis, how) = op.args[0], O.REDUCTIONS[op.kind]
        pattern = (0.0, 1.0) if axis == 1 else (1.0, 0.0)
        d = e.emit("expand", g, *pattern)
        if how == "max":  # the gradient goes to the maximal entries
            d = e.emit("mul", d, e.emit("ge", x, e.emit("expand", op.out, *pattern)))
        return e.emit("bcast", d, x)
    return (dx,)


def _silu(e, x, y, g):
    s = e.emit("sigmoid", x)
    return e.emit("mul", g, e.emit("mul", s, e.emit("add", 1.0, e.emit("mul", x, e.emit("sub", 1.0, s)))))


def _unit_lower_inv(e, x, y, g):  # Y = (I + L)^-1: dL = -Y^T dY Y^T on the strict lower part
    yt = e.emit("transpose", y)
    return e.emit("neg", e.emit("strict", e.emit("matmul", e.emit("matmul", yt, g), yt), 0.0))


def _decay_dot(e, op, g):
    """P = decay_dot(x, y, eq, ek): dx = sum_j dP_ij y_j e^(eq_i + ek_j) is a decay_mm, dy its transposed
    twin; an exponent's adjoint is its factor's times that factor (d eq_ik = x_ik dx_ik)."""
    x, y, eq, ek, diag, centre = op.args
    memo = {}

    def dx():
        if "x" not in memo:
            memo["x"] = e.emit("decay_mm", g, y, eq, ek, diag, centre)
        return memo["x"]

    def dy():
        if "y" not in memo:
            memo["y"] = e.emit("decay_mm_t", e.emit("transpose", g), x, eq, ek, diag, centre)
        return memo["y"]
    # the centre only scales the factors' ranges (the result does not depend on it): no gradient
    return dx, dy, lambda: e.emit("mul", x, dx()), lambda: e.emit("mul", y, dy()), None, None


def _no_gradient(e, op, g):
    return (None,) * len(op.args)


RULES: dict[str, Callable] = {
    # plumbing
    "copy": _unary(lambda e, x, y, g: g),
    "transpose": _unary(lambda e, x, y, g: e.emit("transpose", g)),
    "expand": _expand,
    "last": _unary(lambda e, x, y, g: e.emit("unlast", g)),
    # the softmax family's block tiles of a per-token value: query [C] -> [C, 1], key [C] -> [1, CK]
    "query": _unary(lambda e, x, y, g: e.emit("rowsum", g) if e.shape(x) != e.shape(y) else g),
    "key": _unary(lambda e, x, y, g: e.emit("colsum", g) if e.shape(x)[1:] != e.shape(y)[1:]
                  or len(e.shape(x)) == 1 else g),
    # arithmetic
    "neg": _unary(lambda e, x, y, g: e.emit("neg", g)),
    "add": _binary(lambda e, a, b, y, g: g, lambda e, a, b, y, g: g),
    "sub": _binary(lambda e, a, b, y, g: g, lambda e, a, b, y, g: e.emit("neg", g)),
    "mul": _binary(lambda e, a, b, y, g: e.emit("mul", g, b), lambda e, a, b, y, g: e.emit("mul", g, a)),
    "div": _binary(lambda e, a, b, y, g: e.emit("div", g, b),
                   lambda e, a, b, y, g: e.emit("neg", e.emit("div", e.emit("mul", g, y), b))),
    "pow": _pow,
    "maximum": _minmax,
    "minimum": _minmax,
    "matmul": _binary(lambda e, a, b, y, g: e.emit("matmul", g, e.emit("transpose", b)),
                      lambda e, a, b, y, g: e.emit("matmul", e.emit("transpose", a), g)),
    # elementwise functions (score modifiers, gates, feature maps)
    "exp": _unary(lambda e, x, y, g: e.emit("mul", g, y)),
    "exp2": _unary(lambda e, x, y, g: e.emit("mul", e.emit("mul", g, y), LN2)),
    "log": _unary(lambda e, x, y, g: e.emit("div", g, x)),
    "log2": _unary(lambda e, x, y, g: e.emit("div", g, e.emit("mul", x, LN2))),
    "sigmoid": _unary(lambda e, x, y, g: e.emit("mul", e.emit("mul", g, y), e.emit("sub", 1.0, y))),
    "logsigmoid": _unary(lambda e, x, y, g: e.emit("mul", g, e.emit("sigmoid", e.emit("neg", x)))),
    "softplus": _unary(lambda e, x, y, g: e.emit("mul", g, e.emit("sigmoid", x))),
    "tanh": _unary(lambda e, x, y, g: e.emit("mul", g, e.emit("sub", 1.0, e.emit("mul", y, y)))),
    "relu": _unary(lambda e, x, y, g: e.emit("mul", g, e.emit("gtz", x))),
    "abs": _unary(lambda e, x, y, g: e.emit("mul", g, e.emit("sign", x))),
    "sqrt": _unary(lambda e, x, y, g: e.emit("div", e.emit("mul", g, 0.5), y)),
    "rsqrt": _unary(lambda e, x, y, g: e.emit("mul", e.emit("mul", g, -0.5), e.emit("mul", y, e.emit("mul", y, y)))),
    "silu": _unary(_silu),
    "sin": _unary(lambda e, x, y, g: e.emit("mul", g, e.emit("cos", x))),
    "cos": _unary(lambda e, x, y, g: e.emit("neg", e.emit("mul", g, e.emit("sin", x)))),
    # x @ R with R an antisymmetric signed permutation: the adjoint g @ R^T = -(g @ R)
    **{r: _unary(lambda e, x, y, g, r=r: e.emit("neg", e.emit(r, g))) for r in O.ROTATIONS},
    "fidx": _no_gradient,  # an index of a dim: a constant
    # a pair's Fenwick level is an integer of positions; gather sends the adjoint back to the picked columns
    "level": _no_gradient,
    "gather": lambda e, op, g: (lambda: e.emit("scatter", g, op.args[1], op.args[0]), None),
    # masks keep the adjoint where they keep the value (the fill is a constant); the chunk's transforms
    **{m: _unary(lambda e, x, y, g, m=m: e.emit(m, g, 0.0)) for m in O.MASKS},
    "unit_lower_inv": _unary(_unit_lower_inv),
    "decay_dot": _decay_dot,
    "cumsum": _unary(lambda e, x, y, g: e.emit("revcumsum", g)),
    "revcumsum": _unary(lambda e, x, y, g: e.emit("cumsum", g)),
    # reductions: the adjoint broadcast back (to the maximal entries for a max)
    **{r: _reduction for r in O.REDUCTIONS},
    "maxall": _unary(lambda e, x, y, g: e.emit("mul", e.emit("bcast", g, x), e.emit("ge", x, y))),
    # predicates carry no gradient; `where` gives the adjoint to the branch it selected
    "where": lambda e, op, g: (None, lambda: e.emit("where", op.args[0], g, 0.0),
                               lambda: e.emit("where", op.args[0], 0.0, g)),
    **{k: _no_gradient for k in O.COMPARE + O.LOGIC},
}

# op kinds with no rule: softmax / logsumexp are differentiated by the softmax schedule itself
# (passes.softmax_bwd: P recomputed, ds = P * (dP - D)); the others are made by the backward and
# never differentiated again; the select stage's pools only decide which pairs exist (passes.select)
NO_RULE = frozenset({"softmax", "logsumexp"} | set(O.POOLS) | set(O.INTERNAL) - set(RULES))


def backprop(e: Adjoints, ops, wants: Callable[[str], bool]) -> None:
    """Reverse mode over `ops` (in forward order): for each op whose result has an adjoint in `e.grad`, add
    its contributions to `e.grad` of the arguments for which `wants(arg)` holds."""
    for op in reversed(tuple(ops)):
        g = e.grad.get(op.out)
        if g is None:
            continue
        rule = RULES.get(op.kind)
        if rule is None:
            raise NotImplementedError(f"autodiff: no derivative rule for tile op '{op.kind}' ({op.loc})")
        for x, contribution in zip(op.args, rule(e, op, g)):
            if contribution is not None and isinstance(x, str) and wants(x):
                e.add(x, contribution())
