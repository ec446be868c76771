"""Reverse-mode differentiation of one chunk step: (inputs, entering states) -> (outputs, leaving states).

The backward of the scan is this step run over the chunks in reverse: the adjoint of each state
is carried from chunk to chunk (the transposed transition), and the adjoints of the chunk's
inputs are written out. The result is IR in the same tile ops, so every backend prints it with
the printer it already has. Gates are differentiated where they live, in log space.

Seeds: `_seed_<output>` is the incoming gradient of an output tile, `_seed_<next state>` the
adjoint of a state leaving the chunk (carried from the chunk after it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import sympy

from ..ir import ops as O
from ..ir.nodes import Op, Spec, TileType, next_state_name
from ..ir.printer import print_op
from .cse import cse_with_aliases
from .fusion import live_ops
from .shapes import SCALAR, op_type, value_types

_ONE = sympy.Integer(1)


@dataclass(frozen=True)
class Backward:
    ops: tuple[Op, ...]  # forward recomputation (only what the adjoints need) then adjoints
    seeds: tuple[tuple[str, str], ...]  # (seed value name, output or state it is the gradient of)
    input_grads: tuple[tuple[str, str | None], ...]  # input -> its adjoint value (None: no dependence)
    state_grads: tuple[tuple[str, str | None], ...]  # state -> adjoint of the state entering the chunk
    seed_types: tuple[tuple[str, TileType], ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()  # forward value -> the one computing it in `ops` (cse)

    def forward_name(self, value: str) -> str:
        """The name `ops` gives a forward value (its repeats were merged before differentiating)."""
        return dict(self.aliases).get(value, value)

    def types(self, spec: Spec) -> dict[str, TileType]:
        """Tile types of every value the backward ops read or write."""
        return {**value_types(spec), **dict(self.seed_types), **{op.out: op.type for op in self.ops}}

    def __str__(self) -> str:
        lines = ["backward (one chunk, run in reverse chunk order):",
                 "  seeds: " + ", ".join(f"{s} = d{t}" for s, t in self.seeds)]
        lines += [f"    {print_op(op)}" for op in self.ops]
        lines.append("  gradients: " + ", ".join(f"d{x} = {g or 0}" for x, g in self.input_grads + self.state_grads))
        return "\n".join(lines)


def seed_name(target: str) -> str:
    return f"_seed_{target}"


def is_seed(name: str) -> bool:
    """A value the backward reads as given: the cotangent of an output or of a next state."""
    return name.startswith("_seed_")


# ops whose result is linear in their one argument that reads a cotangent (the others forward values)
_LINEAR_UNARY = frozenset(O.SCANS) | {"rowsum", "colsum", "neg", "copy", "transpose", "expand", "bcast", "unlast",
                                      "total", "last"}


def linear_arg(op: Op, adjoint: set[str], through_matmul: bool = False) -> int | None:
    """The position of `op`'s argument that a sum can be pushed out through (op(a + b) = op(a) + op(b)), when
    that argument is the op's only one in `adjoint` (the values reading a cotangent); else None. A matmul counts
    only `through_matmul`: pushing a sum through it duplicates the matmul."""
    pos = [i for i, a in enumerate(op.args) if isinstance(a, str) and a in adjoint]
    if len(pos) != 1:
        return None
    k, args = op.kind, op.args
    if (k in _LINEAR_UNARY or (k in O.MASKS and (len(args) == 1 or args[1] == 0.0))) and pos == [0]:
        return 0
    if k == "mul" or (k == "div" and pos == [0]) or (k == "matmul" and through_matmul):
        return pos[0]
    return None


def split_once(memo: dict, value: str, split, namer):
    """`split(value)`, memoised on the value's name in `memo`, so that a DAG of shared values is walked in
    linear time, not once per path. `namer.n` numbers the ops a split emits: a value met again advances it by
    what its first split emitted, so every later name is the one an unmemoised walk gives it, and the
    generated source does not depend on the memo."""
    if value in memo:
        result, emitted = memo[value]
        namer.n += emitted
        return result
    n0 = namer.n
    result = split(value)
    memo[value] = result, namer.n - n0
    return result


class Adjoints:
    """Builds adjoint ops (typed, named `<prefix><n>`) and sums each value's adjoint in `grad`."""

    def __init__(self, types: dict[str, TileType], prefix: str = "_d"):
        self.types = dict(types)
        self.prefix = prefix
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
        arg_types = [SCALAR if isinstance(a, float) else self.types[a] for a in args[:n_args]]
        op = Op(out, kind, tuple(args))
        t = op_type(op, arg_types)
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


def _vjp(op: Op, gy: str, a: Adjoints, differentiable) -> None:
    """Add op's contributions to the adjoints of its (differentiable) arguments."""
    k, args, y = op.kind, op.args, op.out
    x = args[0]
    need = [isinstance(v, str) and differentiable(v) for v in args]
    if k == "copy":
        a.add(x, gy)
    elif k == "neg":
        a.add(x, a.emit("neg", gy))
    elif k == "exp":
        a.add(x, a.emit("mul", gy, y))
    elif k == "exp2":
        a.add(x, a.emit("mul", a.emit("mul", gy, y), math.log(2.0)))
    elif k == "log":
        a.add(x, a.emit("div", gy, x))
    elif k == "log2":
        a.add(x, a.emit("div", gy, a.emit("mul", x, math.log(2.0))))
    elif k == "sigmoid":
        a.add(x, a.emit("mul", a.emit("mul", gy, y), a.emit("sub", 1.0, y)))
    elif k == "logsigmoid":
        a.add(x, a.emit("mul", gy, a.emit("sigmoid", a.emit("neg", x))))
    elif k == "softplus":
        a.add(x, a.emit("mul", gy, a.emit("sigmoid", x)))
    elif k == "tanh":
        a.add(x, a.emit("mul", gy, a.emit("sub", 1.0, a.emit("mul", y, y))))
    elif k == "relu":
        a.add(x, a.emit("mul", gy, a.emit("gtz", x)))
    elif k == "abs":
        a.add(x, a.emit("mul", gy, a.emit("sign", x)))
    elif k == "sqrt":
        a.add(x, a.emit("div", a.emit("mul", gy, 0.5), y))
    elif k == "rsqrt":
        a.add(x, a.emit("mul", a.emit("mul", gy, -0.5), a.emit("mul", y, a.emit("mul", y, y))))
    elif k == "silu":
        s = a.emit("sigmoid", x)
        a.add(x, a.emit("mul", gy, a.emit("mul", s, a.emit("add", 1.0, a.emit("mul", x, a.emit("sub", 1.0, s))))))
    elif k in ("add", "sub"):
        if need[0]:
            a.add(args[0], gy)
        if need[1]:
            a.add(args[1], gy if k == "add" else a.emit("neg", gy))
    elif k == "mul":
        if need[0]:
            a.add(args[0], a.emit("mul", gy, args[1]))
        if need[1]:
            a.add(args[1], a.emit("mul", gy, args[0]))
    elif k == "div":
        if need[0]:
            a.add(args[0], a.emit("div", gy, args[1]))
        if need[1]:
            a.add(args[1], a.emit("neg", a.emit("div", a.emit("mul", gy, y), args[1])))
    elif k in ("maximum", "minimum"):
        first = a.emit("ge", args[0], args[1]) if k == "maximum" else a.emit("ge", args[1], args[0])
        if need[0]:
            a.add(args[0], a.emit("mul", gy, first))
        if need[1]:
            a.add(args[1], a.emit("mul", gy, a.emit("sub", 1.0, first)))
    elif k == "pow":
        if need[1]:
            raise NotImplementedError("autodiff: gradient through the exponent of '**'")
        c = args[1]
        a.add(x, a.emit("mul", a.emit("mul", gy, c), a.emit("pow", x, c - 1.0) if isinstance(c, float)
                        else a.emit("pow", x, a.emit("sub", c, 1.0))))
    elif k == "matmul":
        if need[0]:
            a.add(args[0], a.emit("matmul", gy, a.emit("transpose", args[1])))
        if need[1]:
            a.add(args[1], a.emit("matmul", a.emit("transpose", args[0]), gy))
    elif k == "transpose":
        a.add(x, a.emit("transpose", gy))
    elif k in O.MASKS:
        a.add(x, a.emit(k, gy, 0.0))
    elif k == "unit_lower_inv":  # Y = (I + L)^-1: dL = -Y^T dY Y^T on the strict lower part
        yt = a.emit("transpose", y)
        a.add(x, a.emit("neg", a.emit("strict", a.emit("matmul", a.emit("matmul", yt, gy), yt), 0.0)))
    elif k == "cumsum":
        a.add(x, a.emit("revcumsum", gy))
    elif k == "revcumsum":
        a.add(x, a.emit("cumsum", gy))
    elif k == "last":
        a.add(x, a.emit("unlast", gy))
    elif k in O.REDUCTIONS:
        axis, how = O.REDUCTIONS[k]
        g = a.emit("expand", gy, *((0.0, 1.0) if axis == 1 else (1.0, 0.0)))
        if how == "max":  # the gradient goes to the maximal entries
            g = a.emit("mul", g, a.emit("ge", x, a.emit("expand", y, *((0.0, 1.0) if axis == 1 else (1.0, 0.0)))))
        a.add(x, a.emit("bcast", g, x))
    elif k == "maxall":  # the gradient goes to the maximal entries
        a.add(x, a.emit("mul", a.emit("bcast", gy, x), a.emit("ge", x, y)))
    elif k == "expand":
        g = gy
        for axis in reversed([i for i, p in enumerate(args[1:]) if p == 1.0]):
            g = a.emit("rowsum" if axis == 1 else "colsum", g) if len(a.shape(g)) == 2 else a.emit("total", g)
        a.add(x, g)
    else:
        raise NotImplementedError(f"autodiff: no derivative rule for tile op '{k}'")


def differentiate(spec: Spec) -> Backward:
    """`spec` must be shape-checked. Differentiates outputs and leaving states w.r.t. inputs and entering states."""
    types = value_types(spec)
    # one value per distinct expression, so each adjoint is summed before it flows back through its producer
    # (delta rules write `u - w @ S` in merge and inter: two copies would backpropagate through `w @ S` twice)
    roots = tuple(o.name for o in spec.outputs) + tuple(next_state_name(s.name) for s in spec.states)
    forward, aliases = cse_with_aliases(spec.intra.ops + spec.merge.ops + spec.inter.ops, roots)
    leaves = {d.name for d in spec.inputs + spec.states}

    # a value needs an adjoint only if it depends on an input or a state
    depends: set[str] = set(leaves)
    for op in forward:
        if any(isinstance(x, str) and x in depends for x in op.args):
            depends.add(op.out)

    a = Adjoints(types)
    seeds = []
    for o in spec.outputs:
        seeds.append((seed_name(o.name), o.name))
    for s in spec.states:
        seeds.append((seed_name(next_state_name(s.name)), s.name))
    for seed, target in seeds:
        a.types[seed] = types[target]
    for o in spec.outputs:
        a.grad[o.name] = seed_name(o.name)
    for s in spec.states:
        a.grad[next_state_name(s.name)] = seed_name(next_state_name(s.name))

    for op in reversed(forward):
        gy = a.grad.get(op.out)
        if gy is None or op.out not in depends:
            continue
        _vjp(op, gy, a, lambda v: v in depends)

    input_grads = tuple((d.name, a.grad.get(d.name)) for d in spec.inputs)
    state_grads = tuple((s.name, a.grad.get(s.name)) for s in spec.states)
    roots = tuple(g for _, g in input_grads + state_grads if g is not None)
    adjoint = live_ops(tuple(a.ops), roots)
    needed = {x for op in adjoint for x in op.args if isinstance(x, str)}
    recompute = live_ops(forward, tuple(v for v in needed if v in {op.out for op in forward}))
    return Backward(recompute + adjoint, tuple(seeds), input_grads, state_grads,
                    tuple((seed, a.types[seed]) for seed, _ in seeds), tuple(aliases.items()))
