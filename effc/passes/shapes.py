"""Shape inference: give every op its tile type, or point at the op whose shapes do not fit."""
from __future__ import annotations

from dataclasses import replace

import sympy

from ..errors import SpecError
from ..ir import ops as O
from ..ir.nodes import C, Op, Spec, Stage, TileType, dim, next_state_name

_ONE = sympy.Integer(1)
SCALAR = TileType(())


def leaf_types(spec: Spec) -> dict[str, TileType]:
    env = {d.name: d.tile for d in spec.inputs + spec.states}
    env.update({p.name: SCALAR for p in spec.params})
    env.update({n: SCALAR for n in spec.dims})
    env.update({"idx": TileType((C,)), "pos": TileType((C,)), "head": SCALAR, "inf": SCALAR, "H": SCALAR})
    return env


_SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**"}


def _fmt(t: TileType) -> str:
    return "scalar" if t.rank == 0 else f"{t}"


def _broadcast(a: TileType, b: TileType, op: Op) -> TileType:
    n = max(a.rank, b.rank)
    sa = (_ONE,) * (n - a.rank) + a.shape
    sb = (_ONE,) * (n - b.rank) + b.shape
    out = []
    for x, y in zip(sa, sb):
        if x == y or y == _ONE:
            out.append(x)
        elif x == _ONE:
            out.append(y)
        else:
            raise SpecError(f"cannot broadcast {_fmt(a)} with {_fmt(b)} in '{_SYMBOLS.get(op.kind, op.kind)}'",
                            op.loc,
                            "shapes equal or 1 per axis, aligned from the right (add [:, None] to make a column)")
    return TileType(tuple(out))


def op_type(op: Op, args: list[TileType]) -> TileType:
    k = op.kind
    if k in O.UNARY or k == "copy":
        return args[0]
    if k in O.BINARY:
        if k == "pow" and args[1].rank != 0:
            raise SpecError("the exponent of '**' must be a scalar", op.loc, "x ** 2, x ** 0.5, ...")
        return _broadcast(args[0], args[1], op)
    if k == "matmul":
        a, b = args
        if a.rank != 2 or b.rank != 2:
            raise SpecError(f"'@' needs two 2-D tiles, got {_fmt(a)} @ {_fmt(b)}", op.loc,
                            "[m, k] @ [k, n] (make a vector 2-D with [:, None] or [None, :])")
        if a.shape[1] != b.shape[0]:
            raise SpecError(f"'@' inner dims differ: {a} @ {b}", op.loc, f"[m, {a.shape[1]}] @ [{a.shape[1]}, n]")
        return TileType((a.shape[0], b.shape[1]))
    if k in O.DECAY:
        return TileType((C, C)) if k == "decay_dot" else args[1]
    if k == "transpose":
        if args[0].rank != 2:
            raise SpecError(f"'.T' needs a 2-D tile, got {_fmt(args[0])}", op.loc, "a 2-D tile")
        return TileType(args[0].shape[::-1])
    if k in O.MASKS or k in O.SOLVES:
        if args[0].shape != (C, C):
            raise SpecError(f"'{k}' masks a [C, C] score tile, got {_fmt(args[0])}", op.loc, "a [C, C] tile")
        if len(args) > 1 and args[1].rank:
            raise SpecError(f"the fill value of '{k}' must be a scalar", op.loc, "e.g. -inf")
        return args[0]
    if k in O.SCANS or k == "last":
        if args[0].rank == 0 or args[0].shape[0] != C:
            raise SpecError(f"'{k}' runs along the token axis, but its argument has shape {_fmt(args[0])}",
                            op.loc, "a tile whose first axis is C (a per-token value)")
        return args[0] if k != "last" else TileType(args[0].shape[1:])
    if k in O.REDUCTIONS:
        axis = O.REDUCTIONS[k][0]
        if args[0].rank != 2:
            raise SpecError(f"'{k}' reduces a 2-D tile, got {_fmt(args[0])}", op.loc, "a 2-D tile")
        return TileType(tuple(d for i, d in enumerate(args[0].shape) if i != axis))
    if k == "expand":
        pattern = op.args[1:]
        kept = sum(1 for p in pattern if p == 0.0)
        if kept != args[0].rank:
            raise SpecError(f"subscript keeps {kept} axes of a {args[0].rank}-D value", op.loc,
                            f"one ':' per axis of {_fmt(args[0])}")
        it = iter(args[0].shape)
        return TileType(tuple(_ONE if p == 1.0 else next(it) for p in pattern))
    if k in O.ROTATIONS:
        return _rotation_type(op, args[0])
    if k == "fidx":  # the lowering checked that its argument names a feature dim
        return TileType((dim(op.args[0]),))
    if k == "level":
        return _broadcast(args[0], args[1], op)
    if k == "gather":
        return _gather_type(op, *args)
    if k == "scatter":
        return args[2]
    if k in ("gtz", "sign"):
        return args[0]
    if k == "ge":
        return _broadcast(args[0], args[1], op)
    if k == "unlast":
        return TileType((C,) + args[0].shape)
    if k in ("total", "maxall"):
        return SCALAR
    if k == "bcast":
        return args[1]
    if k in O.COMPARE + O.LOGIC + O.SOFTMAX:  # typed by passes.softmax, for specs with a score stage
        raise SpecError(f"'{k}' belongs to the softmax family: it needs a 'score {{ ... }}' stage", op.loc,
                        "tile operations of the chunked-state family (see the README's language table)")
    raise SpecError(f"no shape rule for '{k}'", op.loc)


def _gather_type(op: Op, x: TileType, i: TileType) -> TileType:
    """gather(x, i): x a per-token [C, D] tile, i the column each token picks: a scalar, a [C] vector, or a
    [C, n] tile (one column per entry). The result has i's shape with its first axis C."""
    if x.rank != 2 or x.shape[0] != C:
        raise SpecError(f"gather picks columns of a per-token [C, D] tile, got {_fmt(x)}", op.loc,
                        "an input of shape [B, T, H, D] (e.g. per-level weights [B, T, H, L]) or a [C, D] value")
    if i.rank == 0:
        return TileType((C,))
    if i.rank == 1 and i.shape[0] == C:
        return i
    if i.rank == 2 and i.shape[0] in (C, _ONE):
        return TileType((C, i.shape[1]))
    raise SpecError(f"the index of gather has shape {_fmt(i)}", op.loc,
                    "a scalar, a [C] vector or a [C, n] tile: one column per token (and entry)")


def _rotation_type(op: Op, t: TileType) -> TileType:
    """A rotation pairs the features of a tile's last axis: that axis must be a feature dim (its evenness is
    checked against the dims' sizes at call time, runtime.checks)."""
    last = t.shape[-1] if t.rank else None
    if last is None or not isinstance(last, sympy.Symbol) or last.name in ("C", "CK"):
        raise SpecError(f"'{op.kind}' rotates the features of a tile's last axis, but its argument is "
                        f"{_fmt(t)}", op.loc, "a [C, D] tile or a [D] vector with D a feature dim, "
                        "e.g. rotate_half(q) for q: [B, T, H, K]")
    return t


def infer_shapes(spec: Spec) -> Spec:
    env = leaf_types(spec)
    stages = []
    for stage in spec.stages:
        ops = []
        for op in stage.ops:
            n_args = 1 if op.kind == "expand" else len(op.args)
            args = [SCALAR if isinstance(a, float) else env[a] for a in op.args[:n_args]]
            t = op_type(op, args)
            if t.rank > 2:
                raise SpecError(f"this expression would have 3 or more axes ({t})", op.loc, "tiles of at most 2 axes")
            env[op.out] = t
            ops.append(op.typed(t))
        stages.append(Stage(stage.name, tuple(ops)))
    _check_targets(spec, env)
    return replace(spec, intra=stages[0], merge=stages[1], inter=stages[2])


def _check_targets(spec: Spec, env) -> None:
    for o in spec.outputs:
        want, got = o.tile, env[o.name]
        if got != want:
            op = next(op for op in spec.merge.ops if op.out == o.name)
            raise SpecError(f"output '{o.name}' has tile shape {_fmt(got)}, declared {want}", op.loc,
                            f"a {want} value (one row per token)")
    for s in spec.states:
        want, got = s.tile, env[next_state_name(s.name)]
        if got != want:
            op = next(op for op in spec.inter.ops if op.out == next_state_name(s.name))
            raise SpecError(f"state '{s.name}' is updated with shape {_fmt(got)}, declared {want}", op.loc,
                            f"a {want} value")


def reduces_tokens(op: Op, types: dict[str, TileType]) -> bool:
    """Does `op` sum or max over the token axis? Then padded tokens must be masked out of it."""
    if op.kind in ("decay_mm", "decay_mm_t"):
        return True
    if op.kind == "matmul":
        return types[op.args[0]].shape[1] == C
    if op.kind in O.REDUCTIONS:
        return types[op.args[0]].shape[O.REDUCTIONS[op.kind][0]] == C
    if op.kind in ("total", "maxall"):
        return types[op.args[0]].rank > 0 and types[op.args[0]].shape[0] == C
    return op.kind == "revcumsum"


def value_types(spec: Spec) -> dict[str, TileType]:
    """Every name's tile type in a shape-checked spec."""
    env = leaf_types(spec)
    env.update({op.out: op.type for st in spec.stages for op in st.ops})
    return env


__all__ = ["infer_shapes", "value_types", "leaf_types", "dim"]
