"""The spec AST: what both front ends (.attn text and @attention_spec) produce.

Locations are carried for error messages and excluded from equality, so the two
front ends give equal trees for the same spec.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import Loc

_NOLOC = Loc("<unknown>", 0, 0)


def _loc():
    return field(default=_NOLOC, compare=False, repr=False)


# ---- expressions ----------------------------------------------------------------
@dataclass(frozen=True)
class Number:
    value: float
    loc: Loc = _loc()


# what each `name: [shape] annotation` promises about a declared tensor
ANNOTATIONS = {
    "logdecay": "a log-space decay, <= 0 (padding value 0 is the identity)",
    "positive": "a positive value",
    "unit": "a value in (0, 1)",
    "unitnorm": "a vector of L2 norm 1 per token (needs a feature dim)",
    "key": "read on the key side by score and softmax reductions (softmax family)",
    "gram": "a symmetric positive semi-definite state, a sum of outer products (needs a square shape [K, K])",
    "levels": "N states, one per level: `state A: [K, V] levels N` (states only; see docs/design.md, level states)",
    "reverse": "a state scanned right to left: merge reads the chunks after the current one, inter folds the "
               "chunk into the state entering from its right (states only)",
}


@dataclass(frozen=True)
class Name:
    id: str
    loc: Loc = _loc()


@dataclass(frozen=True)
class BinOp:
    op: str  # add sub mul div matmul pow; lt le gt ge eq ne and or (1.0 / 0.0 values)
    left: "Expr"
    right: "Expr"
    loc: Loc = _loc()


@dataclass(frozen=True)
class Neg:
    operand: "Expr"
    loc: Loc = _loc()


@dataclass(frozen=True)
class Transpose:
    operand: "Expr"
    loc: Loc = _loc()


@dataclass(frozen=True)
class Subscript:
    """x[:, None]: each index is ':' (keep axis) or 'None' (new axis of size 1)."""

    operand: "Expr"
    indices: tuple[str, ...]
    loc: Loc = _loc()


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple["Expr", ...]
    loc: Loc = _loc()


Expr = Number | Name | BinOp | Neg | Transpose | Subscript | Call


# ---- declarations -----------------------------------------------------------------
@dataclass(frozen=True)
class Decl:
    kind: str  # input output state
    name: str
    shape: tuple[str, ...]
    annotations: tuple[str, ...] = ()
    loc: Loc = _loc()
    # `state A: [K, V] levels N`: N states A_0 .. A_{N-1}, one per level (passes.lower expands them)
    levels: int | None = None


@dataclass(frozen=True)
class Param:
    name: str
    default: Expr
    loc: Loc = _loc()


@dataclass(frozen=True)
class Assign:
    target: str
    value: Expr
    loc: Loc = _loc()


@dataclass(frozen=True)
class Mask:
    """`mask pred` in a score stage: the (query, key) pairs where pred is false do not exist."""

    predicate: "Expr"
    loc: Loc = _loc()


@dataclass(frozen=True)
class Force:
    """`force pred` in a select stage: the (query, key block) pairs always selected."""

    predicate: "Expr"
    loc: Loc = _loc()


@dataclass(frozen=True)
class BlockSize:
    """`block N` in a select stage: the key block, the unit of pooling and selection."""

    size: int
    loc: Loc = _loc()


@dataclass(frozen=True)
class Shared:
    """`shared sum` / `shared mean` in a select stage: one choice per key/value head group (GQA), made on
    the sum or mean of the score over the group's query heads."""

    how: str
    loc: Loc = _loc()


@dataclass(frozen=True)
class Criterion:
    """`topk(g, N)` / `topp(g, p[, kmax])` / `threshold(g, x[, kmax])` in a select stage: which blocks a query
    keeps; `limit` the optional cap on the blocks chosen (kmax)."""

    kind: str
    score: "Expr"
    value: "Expr"
    loc: Loc = _loc()
    limit: "Expr | None" = None


@dataclass(frozen=True)
class Stage:
    name: str  # intra inter merge score prefix select
    body: tuple[Assign | Mask | Force | BlockSize | Shared | Criterion, ...]
    loc: Loc = _loc()


@dataclass(frozen=True)
class SpecDef:
    name: str
    decls: tuple[Decl, ...]
    params: tuple[Param, ...]
    chunk: int | None
    stages: tuple[Stage, ...]
    extends: str | None = None
    loc: Loc = _loc()
    chunk_loc: Loc = _loc()  # the 'chunk N' line, for errors (the spec's own loc when absent)
    extends_loc: Loc = _loc()  # the name after 'extends', for errors
    keypos: tuple["KeyPos", ...] = ()  # softmax family: positions of a key sequence's keys
    branches: tuple["Branch", ...] = ()  # softmax family: walks merged in `merge` (passes.branches)


@dataclass(frozen=True)
class Branch:
    """`branch name { output ...; keypos ...; select {...} score {...} merge {...} }`: one softmax walk of a
    spec with several; its merge writes its outputs, which the spec's own merge combines (NSA's branches)."""

    name: str
    outputs: tuple[Decl, ...]
    keypos: tuple["KeyPos", ...]
    stages: tuple[Stage, ...]
    loc: Loc = _loc()


@dataclass(frozen=True)
class KeyPos:
    """`keypos S = expr`: the key at index S (the name of the dim, read as the index) of a key sequence of
    its own sits at position expr on the query's token axis (softmax family)."""

    dim: str
    expr: "Expr"
    loc: Loc = _loc()


@dataclass(frozen=True)
class FuncDef:
    """`def name(args) = expr`: a macro, inlined where it is called."""

    name: str
    params: tuple[str, ...]
    body: Expr
    loc: Loc = _loc()


@dataclass(frozen=True)
class Module:
    """One parsed file, its imports already resolved into `funcs` and `specs`."""

    funcs: tuple[FuncDef, ...]
    specs: tuple[SpecDef, ...]
    file: str = field(default="<string>", compare=False)
    local: tuple[str, ...] = field(default=(), compare=False)  # specs defined in this file itself

    def family(self, name: str | None = None) -> str | None:
        """'linear' (a chunked state), 'softmax' (a score stage), 'hybrid' (both) or 'branched' (several
        softmax walks merged: passes.branches), for spec `name` (or the file's only spec) and the specs it
        extends; None when the name picks no spec. The lowering reads it to choose its stage rules; the IR
        then carries it (Spec.family)."""
        specs = {s.name: s for s in self.specs}
        local = self.local or tuple(specs)
        s = specs.get(name) if name else (specs.get(local[0]) if len(local) == 1 else None)
        if s is None:
            return None
        score = state = False
        seen = set()
        while s is not None and s.name not in seen:
            if s.branches:  # (or a spec it extends: passes.branches refuses that with the reason)
                return "branched"
            seen.add(s.name)
            score |= any(st.name in ("score", "prefix", "select") for st in s.stages)
            state |= any(d.kind == "state" for d in s.decls)
            s = specs.get(s.extends) if s.extends else None
        return ("hybrid" if state else "softmax") if score else "linear"

