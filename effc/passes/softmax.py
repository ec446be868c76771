"""The softmax family: shapes, sides, legality and the schedule of a spec with a score stage.

Softmax attention is the chunked scan whose "inter" walks earlier key blocks: per query block the
state is the running (max, sum, accumulator) of online softmax, and each key block is merged into
it by a log-sum-exp rescale. This pass

1. types the prefix/score/merge stages (a score tile is [C, CK]: C queries, CK keys);
2. gives every value a *side*: C (constant over tokens: params, head), Q (one per query token:
   hoisted out of the walk over key blocks), K (one per key token: computed per key block), P (one
   per (query, key) pair), R (a reduction over every key: softmax(s) @ x, logsumexp(s));
3. proves the schedule: a reduction softmax(s) @ x / logsumexp(s) over keys admits the online-softmax
   walk (it is associative under the log-sum-exp merge); any other sum over keys of a pair value is
   rejected here, with the chunked-state schedule named when the pair value factors into a query part
   times a key part;
4. derives block sparsity from the masks (passes.blocksparse).

Nothing here knows a mechanism: only tile ops, sides and the masks' formulas.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property

import sympy

from ..errors import ArgumentError, SpecError
from ..ir import ops as O
from ..ir.nodes import CK, C, Op, Spec, Stage, TileType
from ..ir.printer import print_op
from ..policy.tiling import IsPow2, TilingSpace, padded
from .blocksparse import BlockSparsity, derive, mean_visible_blocks
from .select import SelectSchedule, analyze_select, chooses_tokens, select_leaf_types, type_select
from .cse import cse_with_aliases
from .fusion import live_ops
from .shapes import SCALAR, _broadcast, _check_targets, _fmt, leaf_types, op_type
from .token_values import TOKEN_SUFFIX

_ONE = sympy.Integer(1)


# ---- shapes ----------------------------------------------------------------------------------------
def softmax_op_type(op: Op, args: list[TileType]) -> TileType:
    k = op.kind
    if k in ("query", "key"):
        t = args[0]
        if t.rank == 0 or t.shape[0] != C:
            raise SpecError(f"'{k}(...)' takes a per-token value, got {_fmt(t)}", op.loc, "a [C] or [C, D] tile")
        if k == "query":
            return TileType((C, _ONE)) if t.rank == 1 else t
        return TileType((_ONE, CK)) if t.rank == 1 else TileType((CK,) + t.shape[1:])
    if k in O.COMPARE or k in ("and", "or"):
        return _broadcast(args[0], args[1], op)
    if k == "not":
        return args[0]
    if k == "where":
        return _broadcast(_broadcast(args[1], args[2], op), args[0], op)
    if k in ("softmax", "logsumexp"):
        if args[0].shape != (C, CK):
            raise SpecError(f"'{k}' runs over the keys of a [C, CK] score tile, got {_fmt(args[0])}", op.loc,
                            "a score: one value per (query, key) pair, e.g. q @ k.T")
        return args[0] if k == "softmax" else TileType((C,))
    return op_type(op, args)


def type_ops(ops, env: dict[str, TileType], pair_stage: bool = False) -> tuple[Op, ...]:
    out = []
    for op in ops:
        if pair_stage and op.kind in O.MASKS:
            raise SpecError(f"'{op.kind}(...)' masks a chunk's own [C, C] tile; a score tile pairs two blocks",
                            op.loc, "a mask line in score, e.g. 'mask kpos <= qpos'")
        n_args = 1 if op.kind == "expand" else len(op.args)
        t = softmax_op_type(op, [SCALAR if isinstance(a, float) else env[a] for a in op.args[:n_args]])
        if t.rank > 2:
            raise SpecError(f"this expression would have 3 or more axes ({t})", op.loc, "tiles of at most 2 axes")
        env[op.out] = t
        out.append(op.typed(t))
    return tuple(out)


def softmax_leaf_types(spec: Spec) -> dict[str, TileType]:
    env = leaf_types(spec)
    env.update({"qpos": TileType((C, _ONE)), "kpos": TileType((_ONE, CK))})
    return env


def infer_softmax_shapes(spec: Spec) -> Spec:
    env = softmax_leaf_types(spec)
    stages = {}
    for st in (spec.prefix, spec.score, spec.intra, spec.merge, spec.inter):
        stages[st.name] = Stage(st.name, type_ops(st.ops, env, st.name in ("score", "merge")))
        if st.name == "prefix":  # select reads prefix values; score never reads select values
            stages["select"] = type_select(spec, dict(env), softmax_op_type)
    _check_targets(replace(spec, merge=stages["merge"], inter=stages["inter"]), env)
    prefix = {op.out for op in stages["prefix"].ops}
    for st in ("select", "score", "intra", "merge", "inter"):  # they read prefix values as per-token tensors
        for op in stages[st].ops:
            for a in op.args:
                if isinstance(a, str) and a in prefix and _ONE in env[a].shape[1:]:
                    raise SpecError(f"a prefix value read in {st} is one per token, [C] or [C, D]; this one is "
                                    f"{_fmt(env[a])}", op.loc, "a [C] value without [:, None]: in score a "
                                    "per-token scalar is a column [C, 1] against the pair tile")
    score = {op.out: op for op in stages["score"].ops}
    for m in spec.masks:  # a predicate per (query, key) pair, or one that broadcasts to the pair tile
        q, k = (_ONE,) * (2 - env[m].rank) + env[m].shape
        if q not in (_ONE, C) or k not in (_ONE, CK):
            raise SpecError(f"a mask selects (query, key) pairs of the [C, CK] score tile, but this predicate is "
                            f"{_fmt(env[m])}", score[m].loc, "a predicate over qpos, kpos and score values, "
                            "e.g. 'mask kpos <= qpos'")
    return replace(spec, **stages)


def softmax_value_types(spec: Spec) -> dict[str, TileType]:
    env = softmax_leaf_types(spec)
    if spec.selection is not None:
        env.update(select_leaf_types())
    env.update({op.out: op.type for st in (spec.prefix, spec.select, spec.score, spec.intra, spec.merge, spec.inter)
                for op in st.ops})
    return env


# ---- sides and the schedule ------------------------------------------------------------------------
@dataclass(frozen=True)
class Reduction:
    out: str  # the value softmax(s) @ x (side R)
    x: str  # the key-side operand


@dataclass(frozen=True)
class Group:
    """One online softmax: a score, its reductions and its log-sum-exp values."""

    score: str
    reductions: tuple[Reduction, ...]
    lse: tuple[str, ...]  # logsumexp(score) values read by merge
    fold: tuple[str, str | float] | None = None  # score = base * scalar: fold scalar * log2(e) into exp2


@dataclass(frozen=True)
class SoftmaxSchedule:
    spec: Spec
    sides: dict = field(compare=False, repr=False)
    types: dict = field(compare=False, repr=False)
    c_ops: tuple[Op, ...]  # constant over tokens: once per program
    q_ops: tuple[Op, ...]  # per query block, needed by the walk
    k_ops: tuple[Op, ...]  # per key block
    p_ops: tuple[Op, ...]  # per (query block, key block)
    post_ops: tuple[Op, ...]  # the epilogue: after the walk, per query block
    groups: tuple[Group, ...]
    masks: tuple[str, ...]
    sparsity: BlockSparsity
    reasons: tuple[str, ...]
    select: SelectSchedule | None = None  # the select stage's kernels (passes.select); None: a static walk

    @property
    def leaves(self) -> tuple[str, ...]:
        """Per-token tensors the kernels read: inputs and the prefix values that select, score or merge read
        (the prefix's intermediates, e.g. the [C, 1] column of `k * rsqrt(rowsum(k * k))[:, None]`, stay in
        the PyTorch pre-pass, whose autograd differentiates them)."""
        read = {a for op in self.spec.select.ops + self.spec.score.ops + self.spec.merge.ops for a in op.args
                if isinstance(a, str)}
        return tuple(d.name for d in self.spec.inputs) + tuple(op.out for op in self.spec.prefix.ops
                                                               if op.out in read)

    @cached_property
    def operand_prefix(self) -> frozenset[str]:
        """The prefix values the kernels read only as matmul operands (through query/key reads, transposes and
        copies): the runtime hands them over in the inputs' 16-bit dtype, to which every product casts its
        operands anyway, so the walks load half the bytes (RoPE's rotated q and k); the others stay fp32."""
        ops = self.spec.select.ops + self.spec.score.ops + self.spec.merge.ops
        users: dict[str, list[Op]] = {}
        for op in ops:
            for a in op.args:
                if isinstance(a, str):
                    users.setdefault(a, []).append(op)

        def operand(x: str) -> bool:
            return bool(users.get(x)) and all(
                op.kind == "matmul" or (op.kind in ("query", "key", "transpose", "copy") and operand(op.out))
                for op in users[x])
        return frozenset(x for x in self.leaves[len(self.spec.inputs):] if operand(x))

    def __str__(self) -> str:
        lines = ["schedule: online softmax (FlashAttention-2 walk over key blocks)"]
        lines += [f"  - {r}" for r in self.reasons]
        ops = {op.out: op for op in self.spec.score.ops + self.spec.merge.ops}

        def show(x):  # key(v) rather than its SSA name
            op = ops.get(x)
            return f"{op.kind}({op.args[0]})" if op is not None and op.kind in ("key", "query") else x

        for g in self.groups:
            red = ", ".join(f"{r.out} = softmax({g.score}) @ {show(r.x)}" for r in g.reductions)
            lse = ", ".join(f"{x} = logsumexp({g.score})" for x in g.lse)
            lines.append(f"  group {g.score}: running (max, sum) per query; {'; '.join(x for x in (red, lse) if x)}")
            if g.fold:
                lines.append(f"    exp2 with log2(e) folded into the scalar factor {g.fold[1]} of {g.score}")
        lines.append("  block sparsity from the masks:")
        lines += [f"    {x}" for x in self.sparsity.describe()]
        if self.select is not None:
            lines += [f"  {x}" for x in self.select.describe()]
        for name, ops in (("once per program", self.c_ops), ("per query block", self.q_ops),
                          ("per key block", self.k_ops), ("per (query, key) block pair", self.p_ops),
                          ("epilogue, per query block", self.post_ops)):
            if ops:
                lines.append(f"  {name}:")
                lines += [f"    {print_op(op)}" for op in ops]
        return "\n".join(lines)


_JOIN_ORDER = ("C", "Q", "K", "P")


def _join(sides: list[str]) -> str:
    s = set(sides) - {"C"}
    if not s:
        return "C"
    if "L" in s:
        return "L"
    if "R" in s:
        return "R" if s <= {"Q", "R"} else "X"
    if s == {"Q"}:
        return "Q"
    if s == {"K"}:
        return "K"
    return "P"


def _factorises(x: str, ops: dict[str, Op], sides: dict[str, str]) -> bool:
    """Is the pair value x a product of a query part and a key part (f(q) @ g(k).T, times
    per-query / per-key / constant factors)?"""
    op = ops.get(x)
    if op is None:
        return False
    if op.kind == "matmul":
        return {sides.get(a, "C") for a in op.args} <= {"Q", "K", "C"}
    if op.kind in ("copy", "neg"):
        return _factorises(op.args[0], ops, sides)
    if op.kind in ("add", "sub"):  # a per-query or per-key term is itself rank one
        return all(_factorises(a, ops, sides) or (isinstance(a, float) or sides.get(a, "C") in ("Q", "K", "C"))
                   for a in op.args)
    if op.kind in ("mul", "div"):
        a, b = op.args
        sa = sides.get(a, "C") if isinstance(a, str) else "C"
        sb = sides.get(b, "C") if isinstance(b, str) else "C"
        if sa == "P" and sb != "P":
            return _factorises(a, ops, sides)
        if sb == "P" and sa != "P" and op.kind == "mul":
            return _factorises(b, ops, sides)
    return False


def analyze_softmax(spec: Spec) -> SoftmaxSchedule:
    """`spec` must be typed (infer_softmax_shapes)."""
    types = softmax_value_types(spec)
    sides: dict[str, str] = {}
    for d in spec.inputs:
        sides[d.name] = "Q"
    for op in spec.prefix.ops:
        sides[op.out] = "Q"  # a per-token tensor, like an input
    sides.update({"qpos": "Q", "kpos": "K"})
    for s in spec.states:
        sides[s.name] = "L"
    for op in spec.intra.ops + spec.inter.ops:
        sides[op.out] = "L"
    if spec.keyseq is not None and (spec.states or spec.selection is not None):
        raise NotImplementedError(f"spec '{spec.name}': a key sequence of its own ({spec.keyseq.dim}) with "
                                  + ("a state (a hybrid)" if spec.states else "a select stage")
                                  + " is not implemented; it is lowered for a plain score stage")
    if spec.states:
        raise NotImplementedError(f"spec '{spec.name}' is a hybrid (a state and a score stage): passes.hybrid "
                                  "splits it into a softmax branch and a state branch, each analysed on its own")
    spec = _without_repeats(spec)

    ops = {op.out: op for op in spec.score.ops + spec.merge.ops}
    groups: dict[str, dict] = {}
    sm_of: dict[str, str] = {}  # softmax op -> its score
    _check_prefix(spec, types)

    def side(a) -> str:
        return "C" if isinstance(a, float) else sides.get(a, "C")

    for stage in (spec.score, spec.merge):
        for op in stage.ops:
            k = op.kind
            arg_sides = [side(a) for a in op.args[:1 if k == "expand" else len(op.args)]]
            if k == "query":
                sides[op.out] = "Q"
                continue
            if k == "key":
                sides[op.out] = "K"
                continue
            if k in O.SCANS or k in ("last", "unlast"):
                raise SpecError(f"'{k}' runs along the token axis of a whole sequence; in {stage.name} a block "
                                "sees only some of the tokens", op.loc, f"'{k}' in a prefix stage")
            if k in O.MASKS:
                raise SpecError(f"'{k}(...)' masks a chunk's own [C, C] tile; a score tile pairs two blocks",
                                op.loc, "a mask line in score, e.g. 'mask kpos <= qpos'")
            if "SM" in arg_sides:
                if k == "matmul" and arg_sides[0] == "SM" and arg_sides[1] in ("K", "C"):
                    sides[op.out] = "R"
                    groups[sm_of[op.args[0]]]["reductions"].append(Reduction(op.out, op.args[1]))
                    continue
                sm = op.args[arg_sides.index("SM")]
                raise SpecError(f"softmax({sm_of[sm]}) is a distribution over every key; it can only be "
                                f"contracted with a key-side value", op.loc,
                                f"softmax({sm_of[sm]}) @ x with x a key-side tile [CK, D], e.g. softmax(s) @ v")
            if k in ("softmax", "logsumexp"):
                if arg_sides[0] not in ("P", "K"):
                    raise SpecError(f"'{k}' runs over keys, but its argument does not depend on the key block",
                                    op.loc, "a score: one value per (query, key) pair, e.g. q @ k.T")
                g = groups.setdefault(op.args[0], {"reductions": [], "lse": [], "loc": op.loc})
                if k == "softmax":
                    sides[op.out] = "SM"
                    sm_of[op.out] = op.args[0]
                else:
                    sides[op.out] = "R"
                    g["lse"].append(op.out)
                continue
            s = _join(arg_sides)
            if s == "X":
                raise SpecError("a reduction over keys (softmax(s) @ x, logsumexp(s)) is per query; it cannot be "
                                "combined with a key-side or pair value", op.loc,
                                "reductions combined with query-side values in merge")
            if stage.name == "merge" and "P" in arg_sides:
                red = _key_sum(op, types)
                p = op.args[arg_sides.index("P")]
                if red:
                    form = ("the pair value factors into a query part times a key part, so this sum over keys "
                            "admits the chunked-state (linear) schedule: write it with a state, e.g. "
                            "'state S: [K, V]', inter { S = S + k.T @ v }, merge { o = q @ S }"
                            if _factorises(p, ops, sides) else
                            "it is neither softmax nor factorisable into query and key parts")
                    what = "a pair value" if p.startswith("_") else f"'{p}'"
                    raise SpecError(f"a sum over keys of {what} without softmax: {form}", op.loc,
                                    "softmax(s) @ x or logsumexp(s) (the online-softmax schedule)")
                if op.kind in O.REDUCTIONS or op.kind == "matmul":
                    raise SpecError(f"'{p}' holds one value per (query, key) pair; merge reads pairs only through "
                                    "softmax over keys", op.loc, f"softmax({p}) @ x or logsumexp({p})")
            if stage.name == "score" and s in ("P", "Q", "K") and _reduces_block(op, types):
                raise SpecError("a sum or max over the tokens of a block: the score stage sees one query block and "
                                "one key block, so it has no meaning there", op.loc,
                                "elementwise pair expressions in score; sums over keys in merge as softmax(s) @ x")
            sides[op.out] = s

    if not groups:
        raise SpecError(f"spec '{spec.name}' has a score stage but merge reads no softmax over keys",
                        ops[spec.outputs[0].name].loc,
                        "an output built from softmax(s) @ v (and/or logsumexp(s)) in merge")
    for o in spec.outputs:
        if sides.get(o.name) in ("K", "P", "SM"):
            op = ops[o.name]
            raise SpecError(f"output '{o.name}' depends on the key block", op.loc,
                            "an output built from reductions over keys and query-side values")
    for m in spec.masks:
        if sides.get(m) in ("R", "SM"):
            raise SpecError("a mask selects (query, key) pairs from positions and tiles of score", ops[m].loc,
                            "a predicate over qpos, kpos and the score stage's values")

    group_objs = []
    for score, g in groups.items():
        group_objs.append(Group(score, tuple(g["reductions"]), tuple(g["lse"]), _fold(score, ops, sides, spec)))
    groups_t = tuple(group_objs)

    # partition the ops by side; keep only what the walk or the outputs need
    all_ops = spec.score.ops + spec.merge.ops
    loop_roots = tuple(g.score for g in groups_t) + spec.masks + tuple(r.x for g in groups_t for r in g.reductions)
    loop_live = live_ops(all_ops, loop_roots)
    reduced = {r.out for g in groups_t for r in g.reductions} | {x for g in groups_t for x in g.lse}
    post_live = live_ops(tuple(op for op in all_ops if op.out not in reduced and sides.get(op.out) != "SM"),
                         tuple(o.name for o in spec.outputs))
    loop_names = {op.out for op in loop_live}
    c_ops = tuple(op for op in all_ops if sides[op.out] == "C" and (op in loop_live or op in post_live))
    q_ops = tuple(op for op in loop_live if sides[op.out] == "Q")
    k_ops = tuple(op for op in loop_live if sides[op.out] == "K")
    p_ops = tuple(op for op in loop_live if sides[op.out] == "P")
    post_ops = tuple(op for op in post_live if sides[op.out] in ("Q", "R") and op.out not in loop_names)

    params = {p.name for p in spec.params}
    kmap = spec.keyseq.pos if spec.keyseq is not None else None
    sparsity = derive(spec.masks, {op.out: op for op in spec.score.ops}, params, kmap)
    reasons = [
        "merge reads " + ", ".join(f"softmax({g.score})" for g in groups_t) + " over keys: exp of a pair-dependent "
        "score does not factor into f(q)·g(k), so no fixed-size state carries it; the online-softmax walk is legal "
        "because (max, sum, acc) partial results over key blocks merge associatively by a log-sum-exp rescale",
        f"values per side: {len(q_ops)} query-side (hoisted out of the walk), {len(k_ops)} key-side, "
        f"{len(p_ops)} per pair, {len(post_ops)} in the fused epilogue",
        ("key blocks outside the masks' visible range are never loaded; blocks in the mask-free range skip "
         "the elementwise mask" if sparsity.skips else
         ("no mask: every key block is visible" if not spec.masks else
          "the masks are not position formulas: every key block is loaded and masked elementwise")),
    ]
    moved = [op.out for op in spec.score.ops if op.kind in ("query", "key") and op.args[0].endswith(TOKEN_SUFFIX)]
    if moved:
        reasons.append(f"{', '.join(moved)}: one token's values with transcendental or rotation work, computed once "
                       "per token in the prefix stage (passes.token_values), not in every program that loads the token")
    sched = SoftmaxSchedule(spec, sides, types, c_ops, q_ops, k_ops, p_ops, post_ops, groups_t, spec.masks,
                            sparsity, tuple(reasons))
    select = analyze_select(spec, sched.leaves)
    if select is not None:
        reasons.append(f"the walks visit only the key blocks the select stage chooses (block {select.block}, "
                       f"{select.selection.criterion[0]} {select.value}): lists built on the device by the pool, select "
                       "and transpose kernels; the masks still apply elementwise")
        sched = replace(sched, reasons=tuple(reasons), select=select)
    return sched


def _without_repeats(spec: Spec) -> Spec:
    """Score and merge with their common subexpressions merged (passes.cse), as the kernels compute them
    (fusion.live_ops): the names the schedule keeps (a score's folded factor, a reduction's key-side operand)
    are then values the kernels define, also when a spec computes one twice (`s = q @ k.T` then
    `s = q @ k.T * 2`)."""
    ops, _ = cse_with_aliases(spec.score.ops + spec.merge.ops, tuple(o.name for o in spec.outputs) + spec.masks)
    score = {op.out for op in spec.score.ops}
    return replace(spec, score=Stage("score", tuple(op for op in ops if op.out in score)),
                   merge=Stage("merge", tuple(op for op in ops if op.out not in score)))


def _key_sum(op: Op, types) -> bool:
    """Does op contract or reduce the key axis of a pair tile?"""
    if op.kind == "matmul":
        return types[op.args[0]].shape[-1] == CK if isinstance(op.args[0], str) else False
    if op.kind in O.REDUCTIONS:
        axis, how = O.REDUCTIONS[op.kind]
        return how == "sum" and types[op.args[0]].shape[axis] == CK
    return False


def _reduces_block(op: Op, types) -> bool:
    if op.kind == "matmul":
        return types[op.args[0]].shape[-1] in (C, CK)
    if op.kind in O.REDUCTIONS:
        return types[op.args[0]].shape[O.REDUCTIONS[op.kind][0]] in (C, CK)
    return False


def _fold(score: str, ops, sides, spec: Spec):
    """score = base * c with c a constant-side scalar: exp2(score * log2e) = exp2(base * (c * log2e))."""
    op = ops.get(score)
    if op is None or op.kind != "mul":
        return None
    consumers = [o for st in (spec.score, spec.merge) for o in st.ops if score in o.args]
    if any(o.kind not in ("softmax", "logsumexp") for o in consumers) or score in spec.masks:
        return None
    a, b = op.args
    for base, c in ((a, b), (b, a)):
        if isinstance(base, str) and sides.get(base) in ("P", "K") and (
                isinstance(c, float) or sides.get(c, "C") == "C"):
            return (base, c)
    return None


def _check_prefix(spec: Spec, types) -> None:
    # per token: elementwise ops, the feature axis's rotations and index (rotary embeddings of q and k once per
    # token, at `pos`), cumsums over the sequence; values without the token axis (fidx(K), a frequency per
    # feature) are intermediates, and the values the other stages read are per token
    allowed = set(O.UNARY) | set(O.BINARY) | set(O.COMPARE) | set(O.LOGIC) | set(O.ROTATIONS) | set(O.FEATURE) \
        | {"where", "copy", "expand", "cumsum", "revcumsum"}
    read = {a for st in (spec.select, spec.score, spec.merge, spec.intra) for op in st.ops for a in op.args
            if isinstance(a, str)}
    for op in spec.prefix.ops:
        if op.kind in O.REDUCTIONS and op.type.rank == 1 and O.REDUCTIONS[op.kind][0] == 1:
            continue  # over a feature axis: per token
        if op.kind not in allowed:
            raise SpecError(f"'{op.kind}' in prefix: prefix values are per token (elementwise, cumsum and "
                            "revcumsum over the sequence)", op.loc,
                            "elementwise ops, cumsum, revcumsum, rowsum/rowmax over a feature axis, rotate_half, "
                            "rotate_pairs, fidx")
        if op.out in read and (op.type.rank == 0 or op.type.shape[0] != C):
            raise SpecError(f"a prefix value read after the prefix must be per token, got {_fmt(op.type)}", op.loc,
                            "a [C] or [C, D] value (one per token)")


# ---- tiling ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SoftmaxTiles:
    """Blocks of each kernel: (query block BM, key block BN, warps, stages)."""

    fwd: tuple[int, int, int, int]
    dq: tuple[int, int, int, int]
    dkv: tuple[int, int, int, int]
    pre: tuple[int, int, int, int]
    # a choice of key blocks (passes.select): the forward and dQ walk with rows (query token, query head of a
    # key head's group), each token's chosen blocks once (`fwd_rows`, `bwd_dq_rows`); False: rows are a block
    # of one head's query tokens walking the union of their choices
    head_rows: bool = False
    reasons: tuple[str, ...] = field(default=(), compare=False)

    # the knobs of the linear family's configs (`effc bench`, `effc tune`): the forward kernel's
    @property
    def chunk(self) -> int:
        return self.fwd[0]

    @property
    def block(self) -> int:
        return self.fwd[1]

    segments = 1  # one walk per query block: the key-block walk is never segmented
    defer_merge = False  # merge is the walk's epilogue: no state history to defer it to

    @property
    def num_warps(self) -> int:
        return self.fwd[2]

    @property
    def num_stages(self) -> int:
        return self.fwd[3]

    def __str__(self) -> str:
        head = (f"fwd BM={self.fwd[0]} BN={self.fwd[1]} warps={self.fwd[2]} stages={self.fwd[3]}; "
                f"dq BM={self.dq[0]} BN={self.dq[1]}; dkv BM={self.dkv[0]} BN={self.dkv[1]}")
        if self.head_rows:
            head += "; rows (query token, query head)"
        return head + "".join(f"\n  - {r}" for r in self.reasons)


# the select kernel's score tile [BM, CB] is held to the forward's score tile budget (128 x 64 fp32 values)
_SELECT_TILE = 128 * 64


# and its chunk is at most 64 key blocks: the layouts of a wider chunk's int64 keys take shared memory past
# sm_90's 227 KB (561 KB at [16, 512], decoding's 16-row block; 180 KB at [64, 128], 98 KB at [64, 64])
_SELECT_CHUNK = 64


def select_chunk(bm: int, n_kb: int, interpreting: bool) -> int:
    """The select kernel's chunk of key blocks CB (passes.select): its [BM, CB] scores and int64 keys held
    to the forward's score tile budget and to _SELECT_CHUNK, a power of two >= 16 (a tl.dot's N), no wider
    than the key blocks (padded); small under the interpreter, so that a few blocks already span several
    chunks."""
    widest = max(16, 1 << max(0, n_kb - 1).bit_length())
    budget = 16 if interpreting else max(16, min(_SELECT_CHUNK, _SELECT_TILE // bm))
    return min(widest, budget)


# dK/dV's split of long transposed lists (passes.softmax_plan.KEY_SPLIT): about this many programs of segments
# in a launch (a few waves of a 132-SM GPU), and a segment's least units
_SPLIT_PROGRAMS = 1024
_SPLIT_UNITS = 8


def key_split(n_kb: int, n_bh: int, interpreting: bool) -> tuple[int, int]:
    """(EXTRA, SPLIT): the programs a row of B*H adds for the segments of long lists, and a segment's least
    units. EXTRA is at most the key blocks (the segments' fp32 sums then take no more memory than a row's
    fp32 key-side gradients); the kernel makes a segment 2 * units / EXTRA long or more, so that the segments
    fit, so EXTRA <= 2 splits nothing. Under the interpreter 64 extra programs at least and one unit a segment,
    so that small tests split their lists."""
    most = max(n_kb, 64) if interpreting else n_kb
    return max(1, min(most, -(-_SPLIT_PROGRAMS // n_bh))), 1 if interpreting else _SPLIT_UNITS


# the dK/dV programs to keep when one walks several query heads of a key head (softmax_plan.GROUPED_KEYS):
# ~10 waves of an H100's resident programs. Measured (H100, scripts/gqa_ab.py): 1024 programs of 4 heads
# each trained 6-10% slower than 4096 of one (softmax_attn 2x8192 with 4 key heads, InfLLM-V2 and MoBA at
# 8x2048 with one), the last of ~2.6 waves part empty; at 1x32768 1024 programs of 8 heads were no slower
_GROUP_PROGRAMS = 4096


def key_group(group: int, key_blocks: int, rows: int, interpreting: bool, fewest: int = 1) -> int:
    """The query heads one dK/dV program walks in turn (GQ, a divisor of `group`, the most a key head may
    serve): the most that keep `key_blocks * rows / GQ` programs (`rows`: sequences x query heads) at least
    _GROUP_PROGRAMS, and never fewer than `fewest` (the per-query-head copies' memory budget,
    `copies_heads`); the whole group under the interpreter."""
    least = 1 if interpreting else _GROUP_PROGRAMS
    gq = group
    while gq > 1 and (group % gq or key_blocks * rows // gq < least):
        gq -= 1
    while gq < group and (group % gq or gq < fewest):
        gq += 1
    return gq


def copies_heads(copy_bytes: int, budget: int) -> int:
    """The fewest query heads a dK/dV program must sum on chip so that the gradients' per-query-head copies
    (`copy_bytes` at one head a program, summed over heads after the kernel) take no more than `budget`
    bytes: the query's own size, so a grouped step holds at most one query-sized scratch more than an
    ungrouped one (FlashAttention-2 holds its group's copies whole, in the inputs' dtype)."""
    return max(1, -(-copy_bytes // max(budget, 1)))


def pivot_group(bm: int, sb: int, interpreting: bool) -> int:
    """The search's pivots counted per reduction PG: its [BM, SB, PG] compares held to the select tile
    budget (at BM = 128 and SB = 64, one pivot a reduction: a [BM, SB, 16] tile spilled, 1 s for DSA's select
    at 2x8192 on the H200); all 16 at once under the interpreter."""
    if interpreting:
        return 16
    fit = max(1, _SELECT_TILE // (bm * sb))
    return min(16, 1 << (fit.bit_length() - 1))


def choose_softmax_tiles(spec: Spec, dims: dict[str, int], interpreting: bool, *, chunk: int | None = None,
                         block: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                         segments: int | None = None, partition: str | None = None, group: int = 1,
                         visible: float | None = None, tuned: dict | None = None) -> SoftmaxTiles:
    """Block sizes by a simple register / shared-memory rule for Hopper (and small blocks under the
    interpreter); `chunk` (query block) and `block` (key block) override it for every kernel.
    `tuned` (the knobs of an `effc tune` entry: chunk, block, num_warps, num_stages) sets the forward
    kernel's tiles, the explicit arguments still winning; the backward kernels keep the model's (they
    read only per-token values the forward saved, so any forward tiling serves them). `partition`: 'heads'
    or 'tokens' for a choice of key blocks (SoftmaxTiles.head_rows), else the tuned entry's, else
    `default_partition`'s for the call's `group` (query heads a key head) and `visible` key blocks a query
    block reaches (`visible_blocks`)."""
    for d, v in dims.items():
        if v < 1:
            raise SpecError(f"feature dim {d}={v}: must be >= 1")
    dims = {d: padded(v) for d, v in dims.items()}  # tiles are loaded padded to a power of two >= 16, masked
    if segments not in (None, 1):
        raise SpecError(f"segments={segments}: the softmax family walks the key blocks in one program per query "
                        "block (segments=1)")
    if tuned is not None:
        bad = {k: tuned.get(k) for k in ("chunk", "block")
               if not isinstance(tuned.get(k), int) or tuned[k] < 16 or tuned[k] & (tuned[k] - 1)}
        if bad or tuned.get("segments", 1) != 1:
            raise SpecError(f"tuned tiles {tuned}: the query and key blocks must be powers of two >= 16 "
                            "(tl.dot tiles) and segments 1")
    widest = max(dims.values()) if dims else 64
    reasons = []
    if interpreting:
        bm = chunk or min(spec.chunk, 16)
        bn = block or min(bm, 16)
        reasons.append(f"interpreter: BM={bm} BN={bn} (small blocks exercise the walk and the masks)")
        t = (bm, bn, num_warps or 4, num_stages or 1)
        fwd, dq, dkv, pre = t, t, t, t
        dkv_rows = 16
    else:
        if widest <= 64:
            # dkv measured on H200 at 8x4096 (scripts/softmax_sweep.py): 64x64 blocks run fwd+bwd in 3.28 ms at
            # D=64 and 3.89 at D=60 against 3.80 and 7.39 for 64x128, whose program spills twice as much at D=60
            fwd, dq, dkv = (128, 64, 4, 3), (128, 64, 4, 2), (64, 64, 4, 2)
        elif widest <= 128:
            # measured on H100 at 2x8192, D=128 (scripts/softmax_sweep.py): the dkv walk with 64x64 blocks and
            # 4 warps beats 64x128 x 8 warps by 1.6x in fwd+bwd; dq gains from a third stage. 32-query dkv
            # steps spill far less (ptxas: ~50 B a thread against ~1.9 KB) but run 16-18% slower (8x2048)
            fwd, dq, dkv = (128, 64, 8, 3), (128, 64, 8, 3), (64, 64, 4, 2)
        else:
            # measured on H200 at D=192 (tiles padded to 256; scripts/softmax_sweep.py): 128-query forward
            # blocks at 8 warps run 2.9x the 64x32 ones (2x4096: 0.64 against 1.86 ms), dq gains from a third
            # stage, and dkv walks 128-query blocks per 64 keys (8x4096 fwd+bwd 10.4 ms against 14.9 for 32x64
            # at 3 stages, the next best of ten)
            fwd, dq, dkv = (128, 64, 8, 2), (128, 32, 8, 3), (128, 64, 8, 2)
        reasons.append(f"widest feature dim {widest}: forward BM={fwd[0]} BN={fwd[1]} keeps the query tile and the "
                       f"accumulators in registers and {fwd[3]} key/value stages in shared memory")

        def override(t):
            return (chunk or t[0], block or t[1], num_warps or t[2], num_stages or t[3])
        dkv_rows = dkv[0]
        fwd, dq, dkv, pre = override(fwd), override(dq), override(dkv), (64, 64, 4, 1)
    if tuned is not None:
        fwd = (chunk or tuned["chunk"], block or tuned["block"], num_warps or tuned["num_warps"],
               num_stages or tuned["num_stages"])
        reasons.append(f"forward BM={fwd[0]} BN={fwd[1]} warps={fwd[2]} stages={fwd[3]} from the tuning entry; "
                       "the backward kernels keep the model's tiles")
    if spec.selection is not None:  # passes.select: one query block for the lists, the key tile is the block
        sb = spec.selection.block
        if block is not None and block != sb:
            raise SpecError(f"block={block}: spec '{spec.name}' selects key blocks of {sb} tokens, and its walks' "
                            f"key tile is that block", None, f"block={sb} or none")
        # dK/dV walks each listed query block in sub-blocks of the model's query tile: a 128-row list block
        # at dK/dV's 4 warps spilled its fp32 tiles (InfLLM-V2 8x2048 on the H100: dK/dV 3.3x dQ's time)
        rows = min(dkv_rows, fwd[0])
        fwd, dq = ((fwd[0], sb) + t[2:] for t in (fwd, dq))
        dkv = (rows, sb) + dkv[2:]
        reasons.append(f"select stage: every walk's key tile is the selected block ({sb}) and its query block the "
                       f"lists' ({fwd[0]}), dK/dV's in sub-blocks of {rows}; the select kernel scores the key "
                       f"blocks {select_chunk(fwd[0], 1 << 30, interpreting)} at a time (at most)")
    chosen = partition or (tuned or {}).get("partition")
    if chosen == "heads" and gathers_tokens(spec) and not gathers_one_token(group):
        raise ArgumentError(f"partition='heads': spec '{spec.name}' chooses key tokens, whose head rows gather one "
                            f"token's keys for its group's query heads; {group} query heads a key head need "
                            f"{head_rows_tile(group)[0] // group} tokens a program (expected 9 or more query heads "
                            "a key head, or partition='tokens')")
    head_rows = (chosen or default_partition(spec, group, visible, fwd[0])) == "heads"
    if row_partitions(spec):
        group = group if spec.selection.shared else 1  # a per-head choice: each head its own group
        seen = f"{visible:.0f} visible key blocks" if visible else "unknown lengths"
        heads, tokens = partition_costs(spec, group, visible, fwd[0])
        why = (f"{chosen!r} given" if chosen else
               f"the model's for {group} query head(s) a choice and {seen}: ~{heads:.1f} against ~{tokens:.1f} "
               "for 'tokens' (block steps a query row, for uncorrelated choices)")
        reasons.append(f"partition {'heads' if head_rows else 'tokens'}: {ROW_PARTITIONS['heads' if head_rows else 'tokens']}"
                       f" ({why})")
    return SoftmaxTiles(fwd, dq, dkv, pre, head_rows, tuple(reasons))


# how a choice of key blocks partitions the query-side walks' rows among programs (SoftmaxTiles.head_rows)
ROW_PARTITIONS = {
    "heads": "rows (query token, query head of a key head's group): each token's chosen blocks walked once for "
             "the group's heads (NSA's kernel order)",
    "tokens": "rows a block of one head's query tokens, walking the union of their chosen blocks",
}


def head_rows_tile(group: int) -> tuple[int, int]:
    """(BM, warps) of a head-rows walk for `group` query heads a key head: the rows a power of two >= 16 (a
    tl.dot's M; 16 // group tokens a program below 16 heads); 4 warps up to 64 rows (a 16-row tile leaves 8
    warps idle), 8 above, as the forward's 128-row tiles take (their accumulators would spill at 4)."""
    rows = max(16, 1 << (group - 1).bit_length())
    return rows, 4 if rows <= 64 else 8


# the query block the token rows' union is counted for (the model's forward block on a GPU)
_UNION_ROWS = 128


def visible_blocks(sched: "SoftmaxSchedule", T: int, params: dict[str, float]) -> float | None:
    """The key blocks a query block reaches under the score's masks in a T-token sequence, on average: what
    the union of its tokens' choices is bounded by (about half of them under a causal mask); None without a
    choice of key blocks."""
    if not row_partitions(sched.spec):
        return None
    return mean_visible_blocks(sched.sparsity.keys, T, _UNION_ROWS, sched.spec.selection.block,
                               tuple(sorted(params.items())))


def row_partitions(spec: Spec) -> tuple[str, ...]:
    """The partitions of the query-side walks' rows a spec (typed) has: both for a choice of key blocks, and
    for a choice of a bounded number of key tokens shared by a head group (its head rows gather each query's
    chosen keys, one token a program); none otherwise."""
    sel = spec.selection
    if sel is None or (chooses_tokens(spec) and not (sel.shared and sel.slots)):
        return ()
    return tuple(ROW_PARTITIONS)


def gathers_tokens(spec: Spec) -> bool:
    """Do the head-rows walks gather each query's chosen keys (a choice of key tokens), rather than walk its
    chosen blocks?"""
    return bool(row_partitions(spec)) and chooses_tokens(spec)


# a walk step costs about what a 64-row tile's does below 64 rows (an sm_90 warpgroup MMA is 64 rows)
_STEP_ROWS = 64


def head_rows_cost(group: int, visible: float | None, slots: int | None) -> float:
    """Block steps per query row (token, head), scaled to 64-row steps, of the head-rows walk for `group`
    heads a key head: BM / G tokens a program walk at most (BM / G) x k distinct blocks (k: the choice's
    slots), no more than the `visible` key blocks, each a step of BM rows."""
    bm, _ = head_rows_tile(group)
    tokens = bm // group
    steps = min(visible or math.inf, tokens * (slots or math.inf))
    return steps * max(bm, _STEP_ROWS) / _STEP_ROWS / (tokens * group)


def token_rows_cost(visible: float | None, slots: int | None, bm: int) -> float:
    """The same for token rows: a block of `bm` query tokens of one head walks the union of their choices,
    for uncorrelated choices min(visible key blocks, bm x k) (docs/design.md: nearly every visible block)."""
    steps = min(visible or math.inf, bm * (slots or math.inf))
    return steps * max(bm, _STEP_ROWS) / _STEP_ROWS / bm


def default_partition(spec: Spec, group: int = 1, visible: float | None = None, bm: int = 128) -> str | None:
    """The model's partition for a call with `group` query heads a key head (of a shared choice; 1 for a
    per-head one) and `visible` key blocks a query block reaches (None: unknown, taken as many): the one with
    the fewer block steps per query row for uncorrelated choices (the worst case: correlated choices shrink
    the union that token rows walk, not the head rows' k), token rows on a tie (their 128-row tiles run the
    tensor cores fuller). A causal choice of 16 heads a group walks 1 step a row with head rows against
    about 1 at 8192 tokens of 64-token blocks (65 visible blocks on average), 4 at 32768 and 16 at 131072; a
    per-head choice (16 tokens a program) needs more than 1024 visible blocks (T > 131072 under causality)."""
    if not row_partitions(spec):
        return None
    heads, tokens = partition_costs(spec, group if spec.selection.shared else 1, visible, bm)
    return "heads" if heads < tokens else "tokens"


def partition_costs(spec: Spec, group: int, visible: float | None, bm: int) -> tuple[float, float]:
    """(head rows, token rows) block steps a query row of a spec with row partitions, for `group` heads a
    choice: head rows walk each token's chosen blocks (`head_rows_cost`) or gather its k chosen keys, BN a
    step, one token a program (a choice of key tokens: infinite where the group cannot fill the rows)."""
    slots = spec.selection.slots
    if not gathers_tokens(spec):
        return head_rows_cost(group, visible, slots), token_rows_cost(visible, slots, bm)
    tokens = token_rows_cost(visible, None, bm)  # the blocks holding a chosen key: every visible one
    if not gathers_one_token(group):
        return math.inf, tokens
    rows, _ = head_rows_tile(group)
    return math.ceil(slots / spec.selection.block) * max(rows, _STEP_ROWS) / _STEP_ROWS / group, tokens


def gathers_one_token(group: int) -> bool:
    """Do the head rows of `group` heads hold one token (a program's BM // G), as gathering its keys needs?"""
    rows, _ = head_rows_tile(group)
    return rows // group == 1


def softmax_tiling_space(sched: SoftmaxSchedule) -> TilingSpace:
    """The forward kernel's tiling as symbols (C: the query block BM, CK: the key block BN) with its
    constraints and the element counts of the resource model in passes.search:

    - loaded per walk step: the key-side tiles of one key block (K, V, per-key values), which the
      pipeliner stages in shared memory;
    - matmul operands: q-side x key-side score matmuls, and P [C, CK] @ x [CK, D] for each reduction;
    - live fp32 per program: the query-side tiles held across the walk, the accumulators of the
      reductions, and per softmax its score tile [C, CK] and running (max, sum). The key-side tiles
      feed tl.dot from shared memory and count there, not here."""
    types = sched.types
    feature = sorted({d for t in types.values() for d in t.shape if d not in (C, CK, _ONE)}, key=str)
    cons: list[tuple[sympy.Basic, str]] = [
        (sympy.Ge(C, 16), "the query block BM is a tl.dot dim (>= 16)"),
        (IsPow2(C), "the query block BM is a power of two"),
        (sympy.Ge(CK, 16), "the key block BN is a tl.dot dim (>= 16)"),
        (IsPow2(CK), "the key block BN is a power of two"),
    ]
    # feature dims take any size: their tiles are padded to a power of two >= 16, masked past the real size

    def elements(x) -> sympy.Expr:
        return sympy.Mul(*types[x].shape) if isinstance(x, str) and x in types else sympy.Integer(0)

    walk = sched.k_ops + sched.p_ops
    key_leaves = {op.args[0]: op.out for op in walk if op.kind == "key"}  # a leaf is loaded once per key block
    loaded = sum((elements(out) for out in key_leaves.values()), sympy.Integer(0))
    query = {op.args[0]: op.out for op in sched.q_ops if op.kind == "query"}
    dots = [sum((elements(a) for a in op.args), sympy.Integer(0))
            for op in sched.q_ops + walk if op.kind == "matmul"]
    dots += [C * CK + elements(r.x) for g in sched.groups for r in g.reductions]
    live = (sum((elements(out) for out in query.values()), sympy.Integer(0))
            + sum((elements(r.out) for g in sched.groups for r in g.reductions), sympy.Integer(0))
            + len(sched.groups) * (C * CK + 2 * C))
    return TilingSpace(None, tuple(cons), sympy.expand(live), sympy.expand(loaded), tuple(dots),
                       staged="key-side tiles per key block",
                       knobs="C = query block BM, block = key block BN of the forward kernel; P = 1 (one walk "
                             "per query block); the backward kernels keep the model's tiles")
