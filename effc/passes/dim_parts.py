"""Feature dims split into power-of-two parts: a 96-wide K runs as tiles of 64 and 32, not one of 128.

A feature dim that is not a power of two is loaded in tiles of the next one, its padded columns masked
(docs/design.md, "Feature dims and padding"); every matmul over it then does the padded dim's work: 96
costs 128. This pass rewrites a typed chunked-scan spec so that each dim D of `dims` becomes two dims
D__0 + D__1 (D__0 the largest power of two below D, chosen at call time by `part_sizes`), by op kind:

- elementwise ops, expand, transpose, scans and last: once per part;
- a reduction over D (rowsum, colmax, maxall, ...): the parts' reductions combined, a sum of sums or a
  max of maxima;
- a matmul or decay_dot contracting D: the sum of the parts' products;
- a matmul or decay_mm producing D on one axis: once per part of the operand that carries it;
- inputs, outputs and states with a D axis: one declaration per part (the op slices the caller's
  tensors at the parts' offsets and joins the results, runtime.dim_parts).

Every value with a D axis is split, so each op sees either whole values or parts. Constructs that pair
columns across the parts (rotations, fidx, gather) or a tile with a split dim on two axes (a square state)
cannot be split: `split_dims` raises `NotSplittable` naming the op, and the call keeps the padded tiles.
The result is untyped IR; the pipeline types it again (`Compilation.of_ir`).
"""
from __future__ import annotations

from dataclasses import replace

from ..ir import ops as O
from ..ir.nodes import Op, Spec, Stage, TensorDecl, TileType, dim, next_state_name

PARTS = 2
_ELEMENTWISE = frozenset(O.UNARY + O.BINARY + O.COMPARE + O.LOGIC + ("copy", "where", "gtz", "sign", "ge", "level"))
_PER_PART = frozenset(O.SCANS + ("expand", "transpose", "last", "unlast"))
_COMBINE = {"sum": "add", "max": "maximum"}
_WHOLE = {"maxall": "max", "total": "sum"}
_UNSPLITTABLE = frozenset(O.ROTATIONS + O.FEATURE + ("gather", "scatter") + O.SOFTMAX + tuple(O.POOLS))


class NotSplittable(Exception):
    """The spec cannot run a dim in parts; the message names the construct."""


def part_sizes(n: int) -> tuple[int, int] | None:
    """(D__0, D__1) for a dim of n features when two parts pad less than one tile: 96 -> (64, 32),
    192 -> (128, 64), 80 -> (64, 16); None for powers of two and dims where the parts gain nothing
    (60: 32 + 28 pads to 64 as well)."""
    from ..policy.tiling import padded
    first = 1 << (int(n).bit_length() - 1)
    if first == n or first < 16:
        return None
    return (first, n - first) if first + padded(n - first) < padded(n) else None


def part_name(name: str, i: int) -> str:
    return f"{name}__{i}"


def part_of(spec: Spec, decl: TensorDecl) -> tuple[str, str, tuple[str, ...]] | None:
    """For a declaration of a split spec that is a part of a caller's tensor: (that tensor's name, the part's
    dim, every part of its caller dim, in order); None for a declaration that is no part."""
    for _, parts in spec.parts:
        for i, p in enumerate(parts):
            suffix = part_name("", i)
            if p in decl.dims and decl.name.endswith(suffix):
                return decl.name[:-len(suffix)], p, parts
    return None


def caller_input(spec: Spec, name: str) -> str:
    """The caller's input that input `name` of a split spec is a part of (itself when it is no part)."""
    decl = spec.decl(name)
    hit = part_of(spec, decl) if decl is not None else None
    return hit[0] if hit else name


def split_dims(spec: Spec, dims: tuple[str, ...]) -> Spec:
    """`spec` (typed) with each dim of `dims` as PARTS dims; NotSplittable where a construct pairs them."""
    if spec.family != "linear":
        raise NotSplittable(f"a {spec.family} spec (the chunked-scan family only)")
    syms = {dim(d): d for d in dims}
    taken = {n for st in spec.stages for op in st.ops
             for n in (op.out,) + tuple(a for a in op.args if isinstance(a, str))}
    taken |= {d.name for d in spec.inputs + spec.outputs + spec.states + spec.params} | set(spec.dims)
    if any(part_name(n, i) in taken for n in taken for i in range(PARTS)):
        raise NotSplittable("a name of the spec ends like a part's ('__0')")
    parted: dict[str, str] = {}  # value -> the split dim it carries

    def axis(t: TileType) -> tuple[int, str] | None:
        hits = [(i, syms[s]) for i, s in enumerate(t.shape) if s in syms]
        if len(hits) > 1:
            raise NotSplittable(f"a tile {t} with split dims on two axes")
        return hits[0] if hits else None

    def decls(ds: tuple[TensorDecl, ...]) -> tuple[TensorDecl, ...]:
        out = []
        for d in ds:
            hit = axis(d.tile)
            if hit is None:
                out.append(d)
                continue
            parted[d.name] = hit[1]
            out += [replace(d, name=part_name(d.name, i), dims=tuple(part_name(x, i) if x == hit[1] else x
                                                                        for x in d.dims)) for i in range(PARTS)]
        return tuple(out)

    inputs, outputs, states = decls(spec.inputs), decls(spec.outputs), decls(spec.states)
    for s in spec.states:  # the leaving value is split as the state is
        if s.name in parted:
            parted[next_state_name(s.name)] = parted[s.name]
    stages = [Stage(st.name, tuple(o for op in st.ops for o in _rewrite(op, parted, axis))) for st in spec.stages]
    subs = {dim(d): sum((dim(part_name(d, i)) for i in range(PARTS)), start=0) for d in dims}
    params = tuple(replace(p, default=p.default.subs(subs)) for p in spec.params)
    return replace(spec, inputs=inputs, outputs=outputs, states=states, params=params,
                   intra=stages[0], merge=stages[1], inter=stages[2],
                   parts=spec.parts + tuple((d, tuple(part_name(d, i) for i in range(PARTS))) for d in dims))


def _part(parted: dict, a, i: int):
    return part_name(a, i) if isinstance(a, str) and a in parted else a


def _combine(op: Op, how: str, terms: list[Op]) -> list[Op]:
    """`terms` (one op per part, named apart), folded into op.out with add or maximum."""
    named = [replace(t, out=f"{op.out}__t{i}") for i, t in enumerate(terms)]
    acc, ops = named[0].out, list(named)
    for i, t in enumerate(named[1:], 1):
        out = op.out if i == len(named) - 1 else f"{op.out}__s{i}"
        ops.append(Op(out, _COMBINE[how], (acc, t.out), loc=op.loc))
        acc = out
    return ops


def _rewrite(op: Op, parted: dict, axis) -> list[Op]:
    """The ops that compute `op` over parts; records op.out in `parted` when its result is split."""
    args = [a for a in op.args if isinstance(a, str)]
    split_args = {parted[a] for a in args if a in parted}
    out_axis = axis(op.type)
    if op.kind in _UNSPLITTABLE and (split_args or out_axis is not None):
        raise NotSplittable(f"'{op.kind}' pairs features across a split dim's parts")
    if not split_args:
        if out_axis is not None:
            raise NotSplittable(f"'{op.kind}' makes a split dim from whole values")
        return [op]
    if len(split_args) > 1:
        raise NotSplittable(f"'{op.kind}' reads two split dims")
    per_part = [replace(op, out=part_name(op.out, i), args=tuple(_part(parted, a, i) for a in op.args), type=None)
                for i in range(PARTS)]
    if out_axis is not None and (op.kind in _ELEMENTWISE | _PER_PART or op.kind in O.REDUCTIONS
                                 or op.kind in ("bcast", "decay_mm", "decay_mm_t")):
        parted[op.out] = out_axis[1]
        return per_part
    whole = [replace(p, out=op.out) for p in per_part]
    if op.kind in O.REDUCTIONS:  # the split axis is the one reduced
        return _combine(op, O.REDUCTIONS[op.kind][1], whole)
    if op.kind in _WHOLE:
        return _combine(op, _WHOLE[op.kind], whole)
    if op.kind in ("matmul", "decay_dot"):
        if op.kind == "matmul" and out_axis is not None:  # [D, n] or [m, D]: one factor carries the dim
            a, b = op.args
            if (a in parted) == (b in parted):
                raise NotSplittable("a matmul whose both factors carry a split dim")
            parted[op.out] = out_axis[1]
            return per_part
        return _combine(op, "sum", whole)  # the contracted axis is the split one
    raise NotSplittable(f"'{op.kind}' over a split dim")
