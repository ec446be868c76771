"""No kernel transposes a matmul's result: `(a @ b).T` is computed as `b.T @ a.T`.

Triton 3.4 to 3.7.0 miscompile `tl.trans` of a Hopper wgmma accumulator that feeds another `tl.dot`
(the transposed tile takes a linear layout that the shared-memory copy for the next wgmma gets wrong):
gradients come out wrong, or the kernel reads outside shared memory and the CUDA context is lost
(fla-org/flash-linear-attention#640, #984; effc's delta_net dk at D=64). A transpose of a value that a
matmul in the same kernel computed is therefore rewritten as the transposed computation: a matmul with
its operands swapped and transposed, elementwise ops on transposed operands, a mask mirrored. Transposes
of values no matmul computed (loaded tiles and what is made from them elementwise) stay, and so do
transposes that reach no matmul (stored or reduced): the bug needs an accumulator layout feeding a dot. Where the chain reaches an op that does not commute with a transpose (a scan, a
solve) the transpose stays at that op. The rewrite does not change a value, only how it is computed;
ops whose only readers were the rewritten transposes are dropped.
"""
from __future__ import annotations

from ..ir import ops as O
from ..ir.nodes import Op, TileType

# elementwise ops whose transpose is the op on transposed operands. Those that can leave the finite range
# on padded tokens (exp, log, div, ...) are masked by row in the printers, which a transpose would turn
# into a column mask: they are not sunk through.
_COMMUTES = set(O.BINARY) - {"div", "pow"} | {"neg", "abs", "relu", "sigmoid", "tanh", "silu", "logsigmoid",
                                                "softplus", "copy", "bcast", "gtz", "sign", "ge"}
# keep j <= i -> keep i <= j, and back
MIRRORED = {"causal": "anticausal", "strict": "antistrict", "anticausal": "causal", "antistrict": "strict"}


def sink_transposes(ops: tuple[Op, ...], types: dict[str, TileType]) -> tuple[Op, ...]:
    """`ops` with every transpose of a matmul-derived value replaced by the transposed computation."""
    types = {**types, **{op.out: op.type for op in ops}}
    by_name = {op.out: op for op in ops}
    from_matmul: set[str] = set()
    for op in ops:
        if op.kind == "matmul" or (op.kind != "transpose" and any(a in from_matmul for a in op.args)):
            from_matmul.add(op.out)
    made: dict[str, str] = {}  # value -> the name of its transpose
    extra: dict[str, list[Op]] = {}  # value -> the ops that compute its transpose, placed right after it
    front: list[Op] = []  # transposes of values no op defines (loaded tiles, seeds): first

    def transposed(x):
        """The name (or constant) holding x^T."""
        if isinstance(x, float) or types[x].rank < 2:
            return x  # scalars and per-token vectors broadcast the same way from either side (via expand)
        if x in made:
            return made[x]
        op = by_name.get(x)
        if op is not None and op.kind == "transpose":
            made[x] = op.args[0]
            return op.args[0]
        out = f"{x}_T"
        t = TileType(tuple(reversed(types[x].shape)))
        if op is None:
            front.append(Op(out, "transpose", (x,), t))
        else:
            if op.kind == "expand" and len(op.args) == 3:  # x[:, None].T is x[None, :]
                new = Op(out, "expand", (op.args[0],) + op.args[:0:-1], t, op.loc)
            elif x not in from_matmul or not _sinkable(op, types):
                new = Op(out, "transpose", (x,), t, op.loc)
            elif op.kind == "matmul":
                new = Op(out, "matmul", (transposed(op.args[1]), transposed(op.args[0])), t, op.loc)
            elif op.kind in MIRRORED:
                new = Op(out, MIRRORED[op.kind], (transposed(op.args[0]),) + op.args[1:], t, op.loc)
            else:
                new = Op(out, op.kind, tuple(transposed(a) for a in op.args), t, op.loc)
            extra.setdefault(x, []).append(new)
        types[out] = t
        made[x] = out
        return out

    feeds_matmul = _feeding_matmuls(ops)
    rewritten = [Op(op.out, "copy", (transposed(op.args[0]),), op.type, op.loc)
                 if op.kind == "transpose" and op.args[0] in from_matmul and op.out in feeds_matmul else op
                 for op in ops]
    ordered = list(front)
    for op in rewritten:
        ordered.append(op)
        ordered += extra.pop(op.out, [])
    return _drop_orphans(ordered, ops)


def _feeding_matmuls(ops: tuple[Op, ...]) -> set[str]:
    """Values that reach a matmul operand, directly or through ops other than matmuls."""
    feeds: set[str] = set()
    for op in reversed(ops):
        if op.kind == "matmul" or op.out in feeds:
            feeds.update(a for a in op.args if isinstance(a, str))
    return feeds


def _sinkable(op: Op, types) -> bool:
    if op.kind == "matmul" or op.kind in MIRRORED:
        return True
    return op.kind in _COMMUTES and all(isinstance(a, float) or types[a].rank in (0, 2) or
                                        types[a].shape == types[op.out].shape for a in op.args)


def _drop_orphans(ops: list[Op], before: tuple[Op, ...]) -> tuple[Op, ...]:
    """Drops the ops that had readers before the rewrite and have none after it (iteratively)."""
    had = {a for op in before for a in op.args if isinstance(a, str)}
    while True:
        read = {a for op in ops for a in op.args if isinstance(a, str)}
        dead = {op.out for op in ops if op.out in had and op.out not in read}
        if not dead:
            return tuple(ops)
        ops = [op for op in ops if op.out not in dead]
