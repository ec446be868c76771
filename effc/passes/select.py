"""The select stage: block-sparse attention whose blocks the spec chooses (issue 22, first slice: top-k).

Design note
-----------
A `select { ... }` stage computes, for each query token i and each key block b of `block N` tokens, a
score g(i, b) from query-side values and pooled key blocks (`blockmean(k)`, `blockmax(k)`: the mean or
max of a per-token value over the block's tokens that exist), then chooses the blocks i walks:

    chosen(i, b) = b in the first k of the order  (forced(i, b) first, then g(i, b) descending)
                   over the blocks that are forced or candidates (every `mask` line holds)

- `force` lines (any one suffices) choose a block outright: it takes a slot of the k before any scored
  block (MoBA's +inf gate on the query's own block). Candidates scored -inf or nan are never chosen.
- Ties, forced blocks included, go to the lower block index: a documented, deterministic order that
  the generated kernel, the oracle and any naive reference can reproduce (a stable descending sort).
- The choice is per query token. The walk of a query block visits the union of its queries' chosen
  blocks, in increasing order, and each step ANDs "is this block chosen by query i" into the elementwise
  mask (beside the score stage's masks): per-token selection stays exact inside a block-level walk.
- Gradients do not flow through the choice (a discrete top-k): the score of the select stage only
  decides which pairs exist, exactly as a mask does.

Lowering (passes.softmax_plan, codegen.triton.select_emit), all on the device, deterministic, no atomics:

    pool       per (key block, b*h): each pooled tile the select stage reads        -> [BH, NKB, D] fp32
    select     per (query block, b*h): scores [BM, NBP] over every key block, k rounds of arg-max
               -> `sel` [tokens, H, KP] (block indices, -1 pads), the query block's union as an ordered
               list `qlist` [BH, NQB, NBP] + count `qcnt`, and its row of the block map `qmap` [BH, NQB, NKB]
    transpose  per (key block, b*h): the column of `qmap` compacted: the query blocks that walk it
               (`klist` [BH, NKB, NQBP] + `kcnt`): the dK/dV walk's list
    walks      forward and dQ iterate their query block's `qlist`; dK/dV its key block's `klist`

The walk's key tile is the selected block (BN = block) and every kernel shares one query block BM (the
union's granularity).

Where later slices fit: `topp` / `threshold` are further criteria of the select kernel (a normalisation
and a cumulative sum over the sorted scores, or a comparison) and raise NotImplementedError here until
then; NSA's compressed branch reads a pooled tile computed by the spec (a second key sequence) where
this slice pools in the pool kernel; a group-shared choice (GQA: NSA, InfLLM-V2) sums g over the heads
of a group before the arg-max; sparse decode runs the select kernel on the new queries only and walks
`qlist` against the cache.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sympy

from ..errors import SpecError
from ..ir import ops as O
from ..ir.nodes import CK, NB, C, Op, Selection, Spec, Stage, TileType
from ..ir.printer import print_op
from .fusion import live_ops
from .shapes import _fmt

_ONE = sympy.Integer(1)
# what a select value may be computed with: elementwise ops, products over feature dims, sides and pools
_ALLOWED = (set(O.UNARY) | set(O.BINARY) | set(O.COMPARE) | set(O.LOGIC)
            | {"where", "copy", "expand", "matmul", "transpose", "query"} | set(O.POOLS))
# criteria the select kernel computes (the others parse, and are refused below)
LOWERED = ("topk",)


def select_leaf_types() -> dict[str, TileType]:
    return {"qblock": TileType((C, _ONE)), "kblock": TileType((_ONE, NB)), "qpos": TileType((C, _ONE))}


def type_select(spec: Spec, env: dict[str, TileType], op_type: Callable) -> Stage:
    """The select stage's ops typed: `op_type` types the ops the score stage shares (passes.softmax);
    pools give a tile per key block, [NB, D] (a row [1, NB] for a scalar)."""
    if not spec.select.ops and spec.selection is None:
        return spec.select
    sel = spec.selection
    if spec.states:
        raise NotImplementedError(f"spec '{spec.name}': a select stage in a hybrid (a state and a score stage) is "
                                  "not lowered yet")
    kind, value = sel.criterion
    if kind not in LOWERED:
        raise NotImplementedError(f"select criterion '{kind}({sel.score}, {value:g})' (at {sel.loc}) is parsed "
                                  f"but not lowered yet; lowered: {', '.join(LOWERED)}")
    env.update(select_leaf_types())
    out = []
    for op in spec.select.ops:
        if op.kind not in _ALLOWED:
            what = ("a sum or max over tokens or blocks" if op.kind in O.REDUCTIONS or op.kind in O.SCANS
                    else f"'{op.kind}'")
            raise SpecError(f"{what} in select: select values are one per (query, key block)", op.loc,
                            "elementwise ops, products over feature dims (q @ blockmean(k).T), comparisons")
        n_args = 1 if op.kind == "expand" else len(op.args)
        args = [TileType(()) if isinstance(a, float) else env[a] for a in op.args[:n_args]]
        if op.kind in O.POOLS:
            t = args[0]
            if t.rank == 0 or t.shape[0] != C:
                raise SpecError(f"'{op.kind}(...)' pools a per-token value, got {_fmt(t)}", op.loc,
                                "a [C] or [C, D] value")
            typ = TileType((_ONE, NB)) if t.rank == 1 else TileType((NB,) + t.shape[1:])
        else:
            typ = op_type(op, args)
        if op.kind == "matmul" and args[0].shape[-1] in (C, CK, NB):
            raise SpecError("a product that sums over tokens or blocks in select: select values are one per "
                            "(query, key block)", op.loc, "a product over a feature dim, e.g. q @ blockmean(k).T")
        if typ.rank > 2:
            raise SpecError(f"this expression would have 3 or more axes ({typ})", op.loc, "tiles of at most 2 axes")
        env[op.out] = typ
        out.append(op.typed(typ))
    ops = {op.out: op for op in out}
    score_t = env[sel.score]
    if score_t.rank != 2 or score_t.shape[1] != NB or score_t.shape[0] not in (C, _ONE):
        loc = ops[sel.score].loc if sel.score in ops and not sel.score.startswith("_") else sel.loc
        raise SpecError(f"the score of {kind} is one value per (query, key block), [C, NB]; this one is "
                        f"{_fmt(score_t)}", loc, "e.g. q @ blockmean(k).T")
    for p in sel.candidates + sel.forced:
        t = env[p]
        q, b = (_ONE,) * (2 - t.rank) + t.shape
        if q not in (_ONE, C) or b not in (_ONE, NB):
            raise SpecError(f"a select predicate chooses (query, key block) pairs, but this one is {_fmt(t)}",
                            ops[p].loc, "a predicate over qblock, kblock, qpos and select values")
    return Stage("select", tuple(out))


@dataclass(frozen=True)
class Pool:
    out: str  # the select value: the pooled tile
    kind: str  # mean | max
    leaf: str  # the per-token value pooled


@dataclass(frozen=True)
class SelectSchedule:
    """What the select kernels compute: `ops` (live for the score and the predicates), the pools the pool
    kernel writes, the per-token leaves read on the query side, and the selection's rule."""

    selection: Selection
    ops: tuple[Op, ...]
    pools: tuple[Pool, ...]
    query_leaves: tuple[str, ...]

    @property
    def block(self) -> int:
        return self.selection.block

    @property
    def k(self) -> int:
        return self.selection.k

    def describe(self) -> list[str]:
        sel = self.selection
        lines = [f"select: per query, the key blocks of {sel.block} tokens: forced ({', '.join(sel.forced) or 'none'})"
                 f" first, then {sel.score} descending over the candidates ({', '.join(sel.candidates) or 'every block'}),"
                 f" the first {sel.k} (ties: the lower block index)"]
        lines += [f"  pool {p.out} = block{p.kind}({p.leaf})" for p in self.pools]
        lines += [f"  {print_op(op)}" for op in self.ops if op.kind not in O.POOLS]
        return lines


def analyze_select(spec: Spec, leaves: tuple[str, ...]) -> SelectSchedule | None:
    """`spec` typed. None when it has no select stage."""
    sel = spec.selection
    if sel is None:
        return None
    ops = live_ops(spec.select.ops, (sel.score,) + sel.candidates + sel.forced)
    pools = tuple(Pool(op.out, O.POOLS[op.kind], op.args[0]) for op in ops if op.kind in O.POOLS)
    read = {op.args[0] for op in ops if op.kind == "query"}
    read |= {a for op in ops if op.kind not in O.POOLS for a in op.args if isinstance(a, str) and a in leaves}
    return SelectSchedule(sel, ops, pools, tuple(x for x in leaves if x in read))
