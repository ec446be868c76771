"""AST -> IR for the softmax family: specs with a `score` stage (and optionally a `prefix` stage).

Stages and what each sees:

- `prefix` (optional): per-token values computed over each whole sequence before the scan; its
  `cumsum` runs over the sequence, not a chunk. Sees inputs, params, dims, `head`.
- `score`: one (query block, key block) tile pair. Per-token names are read on the query side,
  except inputs annotated `key`; `key(x)` / `query(x)` pick a side explicitly. A per-token scalar is
  oriented against the [C, CK] pair tile (query side a column [C, 1], key side a row [1, CK]);
  `qpos` [C, 1] and `kpos` [1, CK] are absolute positions. `mask PRED` lines select the pairs that
  exist (all must hold).
- `select` (optional): per (query, key block of `block N` tokens), values from the query side and
  pooled key blocks (`blockmean(k)`, `blockmax(k)`), then a criterion (`topk(g, N)`, `topp(g, p)`,
  `threshold(g, x)`), candidate masks, forced blocks and `shared sum|mean` (one choice per key/value head
  group): the key blocks each query walks (passes.select). Sees `qblock`, `kblock`, `qpos`.
- `merge`: per query block, after the walk over key blocks: reads `softmax(s) @ x` (x key side) and
  `logsumexp(s)`, the query block's own tiles, and (hybrids) the states; assigns every output.
- `intra` / `inter` (hybrids only): the chunked-state stages of the linear family.

Every side tile is an explicit `key(x)` / `query(x)` op in the IR, so later passes read the side of
any value off its dependencies (passes.softmax).
"""
from __future__ import annotations

import math

import sympy

from ..dsl import ast
from ..errors import Loc, SpecError, suggest
from ..ir import ops as O
from ..ir.nodes import KeySeq, ParamDecl, Selection, Spec, Stage
from .lower_stage import (
    StageLowering,
    assign_statement,
    base_visibility,
    lower_stage,
    require_assigned,
)


class _SideLowering(StageLowering):
    """Stage lowering that reads per-token leaves through explicit key()/query() ops."""

    def __init__(self, stage, visible, funcs, counter, inherited, taken, key_inputs, leaves):
        super().__init__(stage, visible, funcs, counter, inherited, taken)
        self.key_inputs = key_inputs  # inputs declared `key`
        self.leaves = leaves  # per-token leaves: input names and prefix values (SSA names)
        self.memo: dict[tuple[str, str], str] = {}
        self.masks: list[str] = []

    def side(self, kind: str, leaf: str, loc: Loc) -> str:
        if (kind, leaf) not in self.memo:
            self.memo[(kind, leaf)] = self.emit(kind, [leaf], loc)
            self.pinned.add(self.memo[(kind, leaf)])
        return self.memo[(kind, leaf)]

    def resolve(self, node: ast.Name):
        name = super().resolve(node)
        if self.stage == "select" and name in self.leaves and name not in self.key_inputs:
            return self.side("query", name, node.loc)
        if self.stage in ("score", "merge", "select") and name in self.key_inputs:  # select: a choice of tokens
            return self.side("key", name, node.loc)
        if self.stage == "score" and name in self.leaves:
            return self.side("query", name, node.loc)
        return name

    def _leaf_arg(self, node: ast.Call, subst, expected: str) -> str:
        """The per-token input or prefix value that `f(x)` (key, query, a pooling) names."""
        arg = node.args[0] if len(node.args) == 1 else None
        name = None
        if isinstance(arg, ast.Name):
            name = subst.get(arg.id) if subst and arg.id in subst else StageLowering.resolve(self, arg)
        if not isinstance(name, str) or name not in self.leaves:
            raise SpecError(f"'{node.func}(...)' takes the name of a per-token input or prefix value",
                            getattr(arg, "loc", node.loc), expected)
        return name

    def call(self, node: ast.Call, subst, depth):
        if node.func in O.POOLS and node.func not in self.funcs:
            if self.stage != "select":
                raise SpecError(f"'{node.func}(...)' pools a value over each key block: it belongs in select",
                                node.loc, f"'{node.func}(k)' in a 'select {{ ... }}' stage")
            return self.side(node.func, self._leaf_arg(node, subst, f"e.g. {node.func}(k), k declared [B, T, H, K]"),
                             node.loc)
        if node.func in ("key", "query") and node.func not in self.funcs:
            if self.stage not in ("score", "merge"):
                raise SpecError(f"'{node.func}(...)' picks a side of the score tile pair; {self.stage} has no sides"
                                + (" (it reads per-token values as queries, key inputs as keys, key blocks "
                                   "through blockmean / blockmax)" if self.stage == "select" else ""),
                                node.loc, "key(x) / query(x) inside score or merge")
            name = self._leaf_arg(node, subst, "an input declared [B, T, H] or [B, T, H, D], or a value assigned in prefix")
            return self.side(node.func, name, node.loc)
        if node.func in ("softmax", "logsumexp") and node.func not in self.funcs and self.stage != "merge":
            raise SpecError(f"'{node.func}' runs over every key of a query: it belongs in merge", node.loc,
                            f"'{node.func}(s)' in merge, with s a score assigned in score")
        return super().call(node, subst, depth)


def _is_predicate(value, ops) -> bool:
    """Is `value` a 1.0 / 0.0 tile made by a comparison or logic op in `ops` (through plain copies)?"""
    defs = {op.out: op for op in ops}
    while isinstance(value, str) and value in defs and defs[value].kind == "copy":
        value = defs[value].args[0]
    return isinstance(value, str) and value in defs and defs[value].kind in O.COMPARE + O.LOGIC


def _lower(stage: ast.Stage | None, name: str, visible, funcs, counter, inherited, taken, key_inputs, leaves,
           targets=()) -> tuple[Stage, dict[str, str], list[str]]:
    if stage is None:
        return Stage(name, ()), dict(inherited), []
    low = _SideLowering(name, visible, funcs, counter, inherited, taken, key_inputs, leaves)
    assigned: dict[str, Loc] = {}
    for a in stage.body:
        if isinstance(a, ast.Mask):
            if name != "score":
                raise SpecError(f"'mask' in {name}: masks select the (query, key) pairs of a score stage", a.loc,
                                "a 'mask PREDICATE' line inside 'score { ... }'")
            value = low.statement(a.predicate)
            if not _is_predicate(value, low.ops):  # a plain tile (`mask q`) would keep every nonzero entry
                raise SpecError("a mask must be a predicate: a comparison or logic ('and', 'or', 'not') over "
                                "positions and score values", a.predicate.loc,
                                "e.g. 'mask kpos <= qpos', or 'mask x > 0' for a tile x of 1.0 / 0.0 values")
            low.masks.append(value)
            continue
        assign_statement(low, a, visible, targets, assigned, {}, a.target)
    require_assigned(stage, targets, assigned)
    return Stage(name, tuple(low.ops)), low.current, low.masks


def _criterion_value(low: _SideLowering, criterion: ast.Criterion, params: dict) -> float | str:
    """topk's k (a literal: it sizes the kernels' lists), topp's p or threshold's x (a literal or a param,
    whose default, when it is a number, is checked here and whose call-time value at call time)."""
    kind, where = criterion.kind, criterion.value.loc
    value = low.statement(criterion.value)
    if isinstance(value, str) and value in params and kind != "topk":
        default = params[value]
        if kind == "topp" and default.is_number and not 0 < float(default) <= 1:
            raise SpecError(f"topp keeps a mass of {float(default):g} (param {value}'s default)", where,
                            O.CRITERIA["topp"])
        return value
    if not isinstance(value, float):
        raise SpecError(f"the second argument of {kind} must be a number" + ("" if kind == "topk" else " or a param"),
                        where, O.CRITERIA[kind])
    if kind == "topk" and (value < 1 or value != int(value)):
        raise SpecError(f"topk keeps {value:g} blocks", where, O.CRITERIA["topk"])
    if kind == "topp" and not 0 < value <= 1:
        raise SpecError(f"topp keeps a mass of {value:g}", where, O.CRITERIA["topp"])
    if kind == "threshold" and math.isnan(value):
        raise SpecError("threshold nan keeps nothing", where, O.CRITERIA["threshold"])
    return value


def _criterion_limit(low: _SideLowering, criterion: ast.Criterion) -> int | None:
    """The cap kmax of topp / threshold (the most blocks a query keeps: it bounds the kernels' lists)."""
    if criterion.limit is None:
        return None
    if criterion.kind == "topk":
        raise SpecError("topk takes two arguments: its k is already the number of blocks kept", criterion.limit.loc,
                        "topk(score, N)")
    value = low.statement(criterion.limit)
    if not isinstance(value, float) or value < 1 or value != int(value):
        shown = f"{value:g}" if isinstance(value, float) else f"'{value}'"
        raise SpecError(f"the cap of {criterion.kind} must be an integer >= 1 (the most blocks a query keeps), got "
                        f"{shown}", criterion.limit.loc, f"{criterion.kind}(score, value, kmax), e.g. kmax = 16")
    return int(value)


def _lower_select(stage: ast.Stage, visible, funcs, counter, inherited, taken, key_inputs, leaves, params
                  ) -> tuple[Stage, Selection]:
    """The select stage: its assignments as ops, and the Selection its statements define."""
    low = _SideLowering("select", visible, funcs, counter, inherited, taken, key_inputs, leaves)
    block: ast.BlockSize | None = None
    shared: ast.Shared | None = None
    criterion: ast.Criterion | None = None
    candidates, forced = [], []
    for a in stage.body:
        if isinstance(a, ast.BlockSize):
            if block is not None:
                raise SpecError("the key block is declared twice in select", a.loc,
                                f"one 'block N' line (first at {block.loc})")
            if a.size < 16 or a.size & (a.size - 1):
                raise SpecError(f"block {a.size} is not a power of two >= 16", a.loc,
                                "16, 32, 64 or 128: the walk's key tile is the selected block")
            block = a
        elif isinstance(a, ast.Shared):
            if shared is not None:
                raise SpecError("'shared' is declared twice in select", a.loc, f"one 'shared' line (first at {shared.loc})")
            if a.how not in ("sum", "mean"):
                raise SpecError(f"shared {a.how}: a group's score is the sum or the mean of its query heads' scores",
                                a.loc, "'shared sum' or 'shared mean'")
            shared = a
        elif isinstance(a, (ast.Mask, ast.Force)):
            value = low.statement(a.predicate)
            if not _is_predicate(value, low.ops):
                what = "mask" if isinstance(a, ast.Mask) else "force"
                raise SpecError(f"a {what} line must be a predicate: a comparison or logic ('and', 'or', 'not') "
                                "over qblock, kblock, qpos and select values", a.predicate.loc,
                                f"e.g. '{what} kblock <= qblock'")
            (candidates if isinstance(a, ast.Mask) else forced).append(value)
        elif isinstance(a, ast.Criterion):
            if a.kind not in O.CRITERIA:
                raise SpecError(f"unknown select criterion '{a.kind}'" + suggest(a.kind, O.CRITERIA), a.loc,
                                "topk(score, N), topp(score, p) or threshold(score, x)")
            if criterion is not None:
                raise SpecError("select has two criteria", a.loc, f"one criterion (first at {criterion.loc})")
            criterion = a
        else:
            assign_statement(low, a, visible, (), {}, {}, a.target)
    if block is None:
        raise SpecError("a select stage needs its key block", stage.loc, "a 'block N' line, e.g. 'block 64'")
    if criterion is None:
        raise SpecError("a select stage needs a criterion", stage.loc,
                        "topk(score, N), topp(score, p) or threshold(score, x)")
    score = low.statement(criterion.score)
    if not isinstance(score, str):
        raise SpecError(f"the score of {criterion.kind} is a number: every block would tie", criterion.score.loc,
                        "a value per (query, key block), e.g. q @ blockmean(k).T")
    value = _criterion_value(low, criterion, params)
    limit = _criterion_limit(low, criterion)
    low.pinned.add(score)
    selection = Selection(block.size, score, (criterion.kind, value), tuple(candidates), tuple(forced),
                          criterion.loc, limit, shared.how if shared else None)
    return Stage("select", tuple(low.ops)), selection


def lower_softmax(sdef: ast.SpecDef, inputs, outputs, states, params, chunk, funcs, stages) -> Spec:
    """The second half of passes.lower.lower for specs with a score (or prefix) stage."""
    if "score" not in stages and "select" in stages:
        raise SpecError("a select stage chooses the key blocks of a score stage, but there is none",
                        stages["select"].loc, "a 'score { s = ... }' block")
    if "score" not in stages:
        raise SpecError("a prefix stage computes per-token values for a score stage, but there is none",
                        stages["prefix"].loc, "a 'score { s = ... }' block")
    for st in ("intra", "inter"):
        if st in stages and not states:
            raise SpecError(f"an {st} stage needs a declared state (a hybrid of a state and a softmax branch)",
                            stages[st].loc, "a 'state S: [K, V]' line, or no intra/inter stage")
    key_inputs = {d.name for d in inputs if "key" in d.annotations}
    leaves = {d.name for d in inputs}
    feature_dims = {n for d in inputs + outputs + states for n in d.feature_dims}

    base = base_visibility(inputs, outputs, params, feature_dims)
    base["pos"] = ("hidden:pos is a token's position in its sequence, visible in prefix (per token); the score "
                   "tile uses qpos (queries) and kpos (keys)")
    pair_hidden = {b: f"hidden:{b} is a position in the score tile pair; it is visible in score" for b in O.PAIR_BUILTINS}
    state_hidden = {s.name: "hidden:states are read in merge and updated in inter" for s in states}
    counter = [0]
    taken: set[str] = set()

    # prefix: per-token, whole sequence
    vis = {**base, **pair_hidden, **state_hidden, "pos": "builtin",
           "idx": "hidden:prefix runs over whole sequences; idx (the position in a chunk) has no meaning there; "
                  "pos is the token's position in its sequence"}
    prefix, prefix_names, _ = _lower(stages.get("prefix"), "prefix", vis, funcs, counter, {}, taken, set(), set())
    leaves |= {v for k, v in prefix_names.items()}

    select_hidden = {b: f"hidden:{b} is a block index of the select stage; it is visible in select"
                     for b in O.SELECT_BUILTINS}
    select, selection = Stage("select", ()), None
    if "select" in stages:  # per (query, key block): the blocks the walk visits
        vis = {**base, **state_hidden, **{b: "builtin" for b in O.SELECT_BUILTINS}, "qpos": "builtin",
               "kpos": "builtin",
               "idx": "hidden:idx is a position inside a chunk; select uses qpos, qblock and kblock"}
        select, selection = _lower_select(stages["select"], vis, funcs, counter, dict(prefix_names), taken,
                                          key_inputs, leaves, params)
    hide_select = {op.out: "hidden:select values are per (query, key block); they choose the blocks the walk "
                   "visits" for op in select.ops if not op.out.startswith("_")}

    # score: one (query block, key block) pair
    vis = {**base, **state_hidden, **select_hidden, **hide_select, **{b: "builtin" for b in O.PAIR_BUILTINS},
           "idx": "hidden:idx is a position inside a chunk; the score tile uses qpos and kpos"}
    score, score_names, masks = _lower(stages["score"], "score", vis, funcs, counter, prefix_names, taken,
                                       key_inputs, leaves)

    # intra (hybrids): the linear family's chunk-local stage; sees prefix values, not scores
    roles = {d.name: d.role for d in inputs + outputs + states}
    intra_vis = {**base, **pair_hidden, **{s.name: "hidden:intra sees only the chunk's own tokens; read states in "
                                           "merge or inter" for s in states}}
    score_only = {k: v for k, v in score_names.items() if k not in prefix_names or prefix_names[k] != v}
    intra_vis.update({k: "hidden:score values are (query, key) pairs; merge reads them through softmax"
                      for k in score_only})
    inherited = {k: v for k, v in prefix_names.items()}
    intra, intra_names = lower_stage(stages.get("intra"), "intra", intra_vis, funcs, counter, {}, roles, inherited,
                                      taken) if "intra" in stages else (Stage("intra", ()), dict(inherited))

    # merge: after the walk over key blocks
    merge_vis = {**base, **pair_hidden, **select_hidden, **hide_select, **{s.name: "state" for s in states}}
    merge_vis.update({op.out: "local" for op in score.ops + intra.ops + prefix.ops})
    merge, _, _ = _lower(stages["merge"], "merge", merge_vis, funcs, counter, {**score_names, **intra_names}, taken,
                         key_inputs, leaves, targets=tuple(o.name for o in outputs))

    inter = Stage("inter", ())
    if states:
        after = {**base, **pair_hidden, **{s.name: "state" for s in states}}
        after.update({op.out: "local" for op in intra.ops + prefix.ops})
        inter, _ = lower_stage(stages.get("inter"), "inter", after, funcs, counter, {s.name: s for s in states},
                                roles, intra_names, taken)
    keyseq = _key_sequence(sdef, inputs, outputs, states, params, prefix, select, score, merge)
    return Spec(sdef.name, inputs, outputs, states,
                tuple(ParamDecl(p.name, params[p.name], p.loc) for p in sdef.params), chunk, intra, merge, inter,
                prefix=prefix, score=score, masks=tuple(masks), select=select, selection=selection, keyseq=keyseq)


def _key_sequence(sdef: ast.SpecDef, inputs, outputs, states, params, prefix: Stage, select: Stage, score: Stage,
                  merge: Stage) -> KeySeq | None:
    """The key sequence of the score: T (the query's tokens: None) or one of its own, S, that every key-side
    read shares (its key inputs are declared [B, S, H, ...] key), with the keys' positions on the query's
    token axis from `keypos S = ...`. Mixing two key sequences in one score has no meaning yet (a merged walk
    over both is not designed): a located error at the key-side read of the second."""
    seq_of = {d.name: d.seq for d in inputs}
    own = {d.seq for d in inputs if d.seq != "T"}
    if inputs and inputs[0].seq != "T":
        raise SpecError(f"the first input '{inputs[0].name}' sets the query tokens and the outputs' T; this one is "
                        f"over the key sequence {inputs[0].seq}", inputs[0].loc, "the queries declared first, "
                        "e.g. 'input q: [B, T, H, K]'")
    features = {n for d in inputs + outputs + states for n in d.feature_dims}
    for d in inputs:
        if d.seq != "T" and d.seq in features:
            raise SpecError(f"'{d.name}' has sequence dim {d.seq}, which is also a feature dim", d.loc,
                            "a name of its own for the key sequence, e.g. [B, S, H, K]")
    first: dict[str, object] = {}  # sequence -> the first key-side read of it
    for op in score.ops + merge.ops:
        if op.kind not in ("key", "query") or not isinstance(op.args[0], str):
            continue
        seq = seq_of.get(op.args[0], "T")  # a prefix value is per query token
        if op.kind == "query":
            if seq != "T":
                raise SpecError(f"query({op.args[0]}): '{op.args[0]}' is over the key sequence {seq}, not the "
                                "query's tokens", op.loc, f"key({op.args[0]}), or a [B, T, H, ...] input")
            continue
        if first and seq not in first:
            (other, where), = first.items()
            raise SpecError(f"the score reads keys of two sequences: key({op.args[0]}) is over {seq}, but the key "
                            f"read at {where.loc} is over {other}", op.loc, "every key-side input of one score over "
                            "one key sequence (a merge of two walks is not implemented)")
        first.setdefault(seq, op)
    for st in (prefix, select):
        for op in st.ops:
            bad = next((a for a in op.args if isinstance(a, str) and seq_of.get(a, "T") != "T"), None)
            if bad is not None:
                raise SpecError(f"'{bad}' is over the key sequence {seq_of[bad]}, but {st.name} runs over the query's "
                                "tokens", op.loc, f"'{bad}' read in score or merge (on the key side)")
    if own and set(first) == {"T"}:
        d = next(d for d in inputs if d.seq != "T")
        raise SpecError(f"input '{d.name}' is over the key sequence {d.seq}, but the score's keys are the query's "
                        "tokens", d.loc, "every key-side input of one score over one key sequence")
    seq = next(iter(first), "T") if first else (next(iter(own)) if own else "T")
    for kp in sdef.keypos:
        if kp.dim != seq or seq == "T":
            raise SpecError(f"keypos {kp.dim}: the score's keys are over " + (
                "the query's tokens T, whose positions are their indices" if seq == "T" else seq), kp.loc,
                f"keypos {seq} = ..." if seq != "T" else "no keypos line")
    if seq == "T":
        return None
    decl = next((k for k in sdef.keypos if k.dim == seq), None)
    pos = _affine_positions(decl, params) if decl is not None else None
    if pos is None:
        reader = next((op for op in score.ops + merge.ops if "kpos" in op.args), None)
        if reader is not None:
            raise SpecError(f"kpos of the key sequence {seq} is not declared", reader.loc,
                            f"a line 'keypos {seq} = ...' giving each key's position on the query's token axis, "
                            f"e.g. 'keypos {seq} = ({seq} + 1) * 32 - 1'")
    loc = next(d.loc for d in inputs if d.seq == seq)
    return KeySeq(seq, pos, decl.loc if decl is not None else loc)


def _affine_positions(decl: ast.KeyPos, params) -> tuple:
    """`keypos S = expr` as (a, c) with expr = a * S + c: numbers and params (runtime symbols p_<param>)."""
    s = sympy.Symbol("_s", integer=True)

    def rec(e):
        if isinstance(e, ast.Number):
            return sympy.nsimplify(e.value)
        if isinstance(e, ast.Name):
            if e.id == decl.dim:
                return s
            if e.id in params:
                return sympy.Symbol(f"p_{e.id}", real=True)
            raise SpecError(f"unknown name '{e.id}' in keypos {decl.dim}", e.loc,
                            f"numbers, params and {decl.dim} (the key's index)" + suggest(e.id, list(params)))
        if isinstance(e, ast.Neg):
            return -rec(e.operand)
        if isinstance(e, ast.BinOp) and e.op in ("add", "sub", "mul", "div"):
            a, b = rec(e.left), rec(e.right)
            return {"add": a + b, "sub": a - b, "mul": a * b, "div": a / b}[e.op]
        raise SpecError(f"keypos {decl.dim} must be arithmetic (+ - * /) over numbers, params and {decl.dim}",
                        getattr(e, "loc", decl.loc), f"e.g. keypos {decl.dim} = ({decl.dim} + 1) * 32 - 1")

    x = sympy.expand(rec(decl.expr))
    a = x.coeff(s)
    c = sympy.expand(x - a * s)
    if s in a.free_symbols or s in c.free_symbols:
        raise SpecError(f"keypos {decl.dim} must be affine in the key index: a * {decl.dim} + c", decl.expr.loc,
                        f"e.g. keypos {decl.dim} = ({decl.dim} + 1) * 32 - 1")
    if a.is_number and a <= 0:
        raise SpecError(f"keypos {decl.dim} must increase with the key index (its factor is {a})", decl.expr.loc,
                        "keys in the order of their positions, e.g. block ends (S + 1) * 32 - 1")
    return (a, c)

