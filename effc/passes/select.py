"""The select stage: block-sparse attention whose blocks the spec chooses (issue 22: top-k, top-p,
threshold, group-shared choice).

Design note
-----------
A `select { ... }` stage computes, for each query token i and each key block b of `block N` tokens, a
score g(i, b) from query-side values and pooled key blocks (`blockmean(k)`, `blockmax(k)`: the mean or
max of a per-token value over the block's tokens that exist), then chooses the blocks i walks:

    order(i)     = the blocks that are forced or candidates (every `mask` line holds, not forced), forced
                   first, then candidates by g(i, b) descending; ties: the lower block index
    topk(g, k)   : the first k of the order
    topp(g, p)   : forced blocks, then the shortest prefix of the candidates whose mass reaches p, the
                   mass being softmax(g) over the candidates only (forced blocks are chosen outright and
                   take no share); at least one candidate when there is one; p = 1: every candidate
    threshold(g, x): forced blocks and every candidate with g >= x
    ..., kmax    : topp / threshold capped: the first kmax of what they choose, in the order (forced
                   first). The cap bounds each query's list of blocks, which the kernels size: without
                   one the bound is the number of key blocks (a call-time size), and the walks' per-token
                   check costs O(that) per step, so long sequences want a cap
    shared sum|mean: one choice per key/value head group (GQA: NSA, InfLLM-V2), on g summed (or
                   averaged) over the group's query heads; every query head of the group walks the same
                   blocks. The group is the heads sharing a key head (H / the key inputs' heads); without
                   grouped heads each head is its own group. Masks and force lines must then be the same for
                   every head (positions and block indices only): a compile-time check

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
    select     per (query block, b*h): the key blocks CB at a time (CB a constexpr of the tiling policy,
               passes.softmax.select_chunk), each block's score packed with its index into one int64 key
               (score bits made monotone, then the reversed index: distinct keys, ties to the lower block).
               Pass 1 keeps a running list of the KTOP best keys per query ([BM, KP]): each round moves the
               chunk's best key into the list's weakest slot while it beats it (at most KTOP rounds a
               chunk, fewer once the list is good); topp also keeps a running max and sum of its masses.
               The per-query cut-off key: topk and capped threshold (non-taken blocks keyed out) the
               list's weakest; capped topp the last key of the sorted list's prefix holding mass p. Pass 2
               scores each chunk again and writes the blocks whose key reaches the cut-off. An uncapped
               threshold needs no list (one pass of a comparison); an uncapped topp holds one tile
               [BM, NBP] over every key block and sorts it (its prefix has no bound). Shared: the group's
               first head's program sums the group's scores and stores the group's choice once (the others
               return; every list has a row per group of GROUP heads, GROUP = 1 unless shared)
               -> `sel` [tokens, H / GROUP, KP] (block indices, -1 pads), the query block's union as an
               ordered list `qlist` [B.H / GROUP, NQB, NKB] + count `qcnt`, and its row of the block map
               `qmap` [B.H / GROUP, NQB, NKB] (uint8: how many of the query block's tokens took the key block)
    transpose  per (key block, head group): the column of `qmap` compacted: the query blocks that walk it
               (`klist` [B.H / GROUP, NKB, NQBP] + `kcnt`): the dK/dV walk's list; `ktok` the tokens that took it
    walks      forward and dQ iterate their query block's `qlist`; dK/dV its key block's `klist`, a long
               list split over programs with a second launch summing the segments in order
               (passes.softmax_plan.KEY_SPLIT)

The walk's key tile is the selected block (BN = block) and every kernel shares one query block BM (the
union's granularity).

A choice of key tokens (`per_token`: the score is [C, CK], a key input read bare, DSA's lightning indexer):
the same rule over tokens, ties to the lower position; topk and threshold are lowered. No pool kernel; the
select kernel searches each query's cut-off t on the score's monotone bits, 4 a round over 8 rounds (16
pivot counts over every key, a [BM, SB, 16] compare per key block of SB keys), keeping the count above t; a last
pass writes `tmask` [tokens, H / GROUP, NKB, NW] (a bit per chosen (query, key) pair, NW = block / 32 words)
and the union of blocks holding one. The walks load their block's words for the elementwise mask.

Head rows (passes.softmax.ROW_PARTITIONS, the `partition` of a call): the walks can instead take a few
query tokens with the query heads sharing a key head as a program's rows, walking each token's chosen
blocks from `sel` once for the group, or gathering its chosen keys from `tidx` (a bounded, shared choice of
key tokens, which the select kernel then also writes); dK/dV then gathers the tokens that took its key
block. Decoding runs the select kernel on the new queries against the cache and the forward walk's DECODE
variant (docs/design.md).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sympy

from ..errors import SpecError
from ..ir import ops as O
from ..ir.nodes import CK, NB, C, Op, Selection, Spec, Stage, TileType
from ..ir.printer import print_op
from .blocksparse import I0, I1, I, J, Range, _and, _or, formula_range, predicate_formula
from .blocksparse import _fmt as _show
from .fusion import live_ops, needed
from .shapes import _fmt

_ONE = sympy.Integer(1)
# what a select value may be computed with: elementwise ops, products over feature dims, sides and pools
_ALLOWED = (set(O.UNARY) | set(O.BINARY) | set(O.COMPARE) | set(O.LOGIC)
            | {"where", "copy", "expand", "matmul", "transpose", "query", "key"} | set(O.POOLS))
# criteria the select kernel computes (ir.ops.CRITERIA: every one parsed)
LOWERED = ("topk", "topp", "threshold")
# criteria of a choice per key token (a [C, CK] score): topp's mass over thousands of tokens has no search yet
LOWERED_PER_TOKEN = ("topk", "threshold")


def select_leaf_types() -> dict[str, TileType]:
    return {"qblock": TileType((C, _ONE)), "kblock": TileType((_ONE, NB)), "qpos": TileType((C, _ONE)),
            "kpos": TileType((_ONE, CK))}


def type_select(spec: Spec, env: dict[str, TileType], op_type: Callable) -> Stage:
    """The select stage's ops typed: `op_type` types the ops the score stage shares (passes.softmax);
    pools give a tile per key block, [NB, D] (a row [1, NB] for a scalar)."""
    if not spec.select.ops and spec.selection is None:
        return spec.select
    sel = spec.selection
    kind = sel.criterion[0]
    if kind not in LOWERED:
        raise NotImplementedError(f"select criterion '{sel.describe_rule()}' (at {sel.loc}) is parsed "
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
    if score_t.rank != 2 or score_t.shape[1] not in (NB, CK) or score_t.shape[0] not in (C, _ONE):
        loc = ops[sel.score].loc if sel.score in ops and not sel.score.startswith("_") else sel.loc
        raise SpecError(f"the score of {kind} is one value per (query, key block), [C, NB], or per (query, key "
                        f"token), [C, CK]; this one is {_fmt(score_t)}", loc, "e.g. q @ blockmean(k).T or qi @ ki.T")
    unit = score_t.shape[1]
    if unit == CK and kind not in LOWERED_PER_TOKEN:
        raise NotImplementedError(f"select criterion '{sel.describe_rule()}' (at {sel.loc}) over key tokens is not "
                                  f"lowered yet; lowered per token: {', '.join(LOWERED_PER_TOKEN)}")
    for p in sel.candidates + sel.forced:
        t = env[p]
        q, b = (_ONE,) * (2 - t.rank) + t.shape
        if q not in (_ONE, C) or b not in (_ONE, unit):
            what = "key block" if unit == NB else "key token"
            raise SpecError(f"a select predicate chooses (query, {what}) pairs, but this one is {_fmt(t)}",
                            ops[p].loc, "a predicate over qblock, kblock, qpos and select values" if unit == NB
                            else "a predicate over qpos, kpos and select values (this score is per key token)")
    if sel.shared:
        _same_for_every_head(sel, out)
    return Stage("select", tuple(out))


# what makes a select value differ between the query heads of a group
_PER_HEAD = {"query"} | set(O.POOLS)


def _same_for_every_head(sel: Selection, ops: list[Op]) -> None:
    """A shared choice has one candidate set per head group: its masks and force lines may not read
    per-head values (query-side tensors, pooled keys, `head`)."""
    by_out = {op.out: op for op in ops}
    for p in sel.candidates + sel.forced:
        for op in needed(tuple(ops), (p,)):
            if op.kind in _PER_HEAD or "head" in op.args:
                what = "the head index" if "head" in op.args else "a per-head value"
                raise SpecError(f"a mask or force line of a shared select reads {what}: the group's query heads "
                                "choose together, so their candidates must be the same", by_out[p].loc,
                                "masks over qpos, qblock and kblock (select's scores may read anything)")


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
    key_leaves: tuple[str, ...] = ()  # read per key token (a choice of key tokens: `key(x)`)
    per_token: bool = False  # the score is per (query, key token): the choice is of tokens, walked by block
    keys: Range = Range.everything()  # a choice of key tokens: the keys a query block may choose (its masks
    # and force lines as position formulas, passes.blocksparse); the select kernel scans no others
    blocks: Range = Range.everything()  # a choice of key blocks: the blocks kb a query block whose tokens lie
    # in blocks [qb0, qb1] may choose (masks and force lines over qblock and kblock); no others are scored
    summed_query: bool = False  # a shared choice whose score is linear in the query-side values (`linear_in_heads`):
    # the group's score is the score of the group's summed query tiles, one product instead of one a head

    @property
    def block(self) -> int:
        return self.selection.block

    @property
    def k(self) -> int:
        return self.selection.k

    @property
    def value(self) -> str:
        """The criterion's value as written: k, p or x, or a param's name."""
        v = self.selection.criterion[1]
        return v if isinstance(v, str) else f"{v:g}"

    @property
    def kind(self) -> str:
        return self.selection.criterion[0]

    @property
    def streamed(self) -> bool:
        """The select kernel scores the key blocks a chunk at a time, keeping a running top-k of (score,
        block) keys: every criterion but an uncapped topp, whose prefix of the order has no bound (it holds
        one tile over every key block and sorts it)."""
        return not (self.kind == "topp" and self.selection.limit is None) and not self.per_token

    @property
    def params(self) -> tuple[str, ...]:
        """The params the criterion reads (topp's p, threshold's x)."""
        value = self.selection.criterion[1]
        return (value,) if isinstance(value, str) else ()

    def describe(self) -> list[str]:
        sel = self.selection
        value = self.value
        rule = {"topk": f"the first {value}",
                "topp": f"the shortest prefix of the candidates holding a mass {value} of softmax({sel.score})",
                "threshold": f"the candidates scoring >= {value}"}[self.kind]
        if sel.limit is not None:
            rule += f", at most {sel.limit} blocks in all"
        who = f"per query head group (the {sel.shared} of {sel.score} over its heads)" if sel.shared else "per query"
        unit, walked = ("key tokens", f", walked in the key blocks of {sel.block} tokens that hold one") \
            if self.per_token else (f"the key blocks of {sel.block} tokens", "")
        if self.per_token:
            rule = rule.replace("blocks", "tokens")
        lines = [f"select: {who}, {unit}: forced ({', '.join(sel.forced) or 'none'})"
                 f" first, then {sel.score} descending over the candidates ({', '.join(sel.candidates) or 'every one'}),"
                 f" {rule} (ties: the lower {'position' if self.per_token else 'block index'}){walked}"]
        if self.per_token:
            lines.append(f"  keys scanned for a query block [i0, i1]: j in [{_show(self.keys.lo)}, {_show(self.keys.hi)}]")
        elif self.blocks != Range.everything():
            lines.append(f"  key blocks scored for query blocks [qb0, qb1]: kb in [{_show(self.blocks.lo)}, "
                         f"{_show(self.blocks.hi)}]")
        if self.summed_query:
            lines.append(f"  {sel.score} is linear in the query side: the group's query tiles summed, scored once")
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
    read |= {a for op in ops if op.kind not in set(O.POOLS) | {"key"} for a in op.args
             if isinstance(a, str) and a in leaves}
    keyed = {op.args[0] for op in ops if op.kind == "key"}
    tokens = chooses_tokens(spec)
    params = {p.name for p in spec.params}
    key_inputs = {d.name for d in spec.inputs if "key" in d.annotations}
    return SelectSchedule(sel, ops, pools, tuple(x for x in leaves if x in read),
                          tuple(x for x in leaves if x in keyed), tokens,
                          _choosable(sel, ops, params, _KEYS) if tokens else Range.everything(),
                          Range.everything() if tokens else _choosable(sel, ops, params, _BLOCKS),
                          bool(sel.shared) and not tokens and linear_in_heads(sel.score, ops, set(leaves), key_inputs))


# block indices as symbols: kb the key block, qb a query token's block, over [qb0, qb1] for a query block
KB, QB = sympy.Symbol("kb", integer=True), sympy.Symbol("qb", integer=True)
QB0, QB1 = sympy.Symbol("qb0", integer=True), sympy.Symbol("qb1", integer=True)
# what a choice ranges over: (the predicates' position-like leaves, the chosen unit, the query's, its range)
_KEYS = ({"qpos": I, "kpos": J}, J, I, I0, I1)  # key tokens j for a query block's tokens [i0, i1]
_BLOCKS = ({"qblock": QB, "kblock": KB}, KB, QB, QB0, QB1)  # key blocks kb for its tokens' blocks [qb0, qb1]


def _choosable(sel: Selection, ops: tuple[Op, ...], params: set[str], unit: tuple) -> Range:
    """The keys (key blocks) a query block may choose: those every mask line keeps, or one force line does
    (a predicate over anything but the unit's position-like leaves, numbers and params: every one)."""
    by_out = {op.out: op for op in ops}
    leaves, var, other, lo, hi = unit

    def kept(p: str) -> Range:
        return formula_range(predicate_formula(p, by_out, params, leaves), var, other, lo, hi)
    allowed = _and([kept(m) for m in sel.candidates]) if sel.candidates else Range.everything()
    return _or([allowed] + [kept(f) for f in sel.forced])


# ops through which a value stays linear in a per-head argument when every other argument is the same for
# each head of the group: f(sum of x_h) = sum of f(x_h)
_LINEAR = {"copy": (0,), "expand": (0,), "transpose": (0,), "neg": (0,), "mul": (0, 1), "div": (0,),
           "matmul": (0, 1), "add": "all", "sub": "all"}


def linear_in_heads(score: str, ops: tuple[Op, ...], leaves: set[str], key_inputs: set[str]) -> bool:
    """Is the select score linear in the values that differ between a group's query heads (query-side
    tiles of `leaves`), everything else being the same for the group (pools of key inputs, block indices,
    params, numbers)? Then the sum of the heads' scores is the score of the summed query tiles."""
    by_out = {op.out: op for op in ops}
    memo: dict[str, str] = {}

    def kind(x) -> str:  # "same" for the group, "linear" in the per-head tiles, or "other"
        if not isinstance(x, str):
            return "same"
        if x in memo:
            return memo[x]
        op = by_out.get(x)
        if x == "head":
            out = "other"
        elif op is None:  # a leaf (a key input's is the group's), qblock, kblock, qpos, params
            out = "linear" if x in leaves and x not in key_inputs else "same"
        elif op.kind in O.POOLS:
            out = "same" if op.args[0] in key_inputs else "other"
        elif op.kind == "query":
            out = "linear"
        else:
            args = [kind(a) for a in op.args[:1 if op.kind == "expand" else len(op.args)]]
            rule = _LINEAR.get(op.kind)
            if all(a == "same" for a in args):
                out = "same"
            elif rule == "all":
                out = "linear" if all(a == "linear" for a in args) else "other"
            elif rule is not None and sum(a == "linear" for a in args) == 1 and "other" not in args:
                out = "linear" if args.index("linear") in rule else "other"
            else:
                out = "other"
        memo[x] = out
        return out

    return kind(score) == "linear"


def chooses_tokens(spec: Spec) -> bool:
    """`spec` typed: is its select score per (query, key token), [C, CK], a choice of tokens (not blocks)?"""
    sel = spec.selection
    return sel is not None and any(op.out == sel.score and op.type.shape[1] == CK for op in spec.select.ops)
