"""IR values: small, immutable, structurally comparable. Locations never take part in equality."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import sympy

from ..errors import Loc

_NOLOC = Loc("<unknown>", 0, 0)
C = sympy.Symbol("C", positive=True, integer=True)  # the chunk length (softmax family: the query block)
CK = sympy.Symbol("CK", positive=True, integer=True)  # softmax family: the key block
NB = sympy.Symbol("NB", positive=True, integer=True)  # select stage: the key blocks of a sequence


def dim(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, positive=True, integer=True)


@dataclass(frozen=True)
class TileType:
    """Shape of one chunk-level tile (fp32 in the math; storage dtypes live in the plan)."""

    shape: tuple[sympy.Expr, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        return "[" + ", ".join(str(d) for d in self.shape) + "]"


@dataclass(frozen=True)
class Op:
    """`out = kind(args...)`. An arg is a value name (str) or a float constant."""

    out: str
    kind: str
    args: tuple[str | float, ...]
    type: TileType | None = None
    loc: Loc = field(default=_NOLOC, compare=False, repr=False)

    def typed(self, t: TileType) -> "Op":
        return replace(self, type=t)


@dataclass(frozen=True)
class Stage:
    name: str
    ops: tuple[Op, ...]

    @property
    def reads(self) -> frozenset[str]:
        """Every name the stage's ops read (inputs, values, params, built-ins)."""
        return names_read(self.ops)


def names_read(ops) -> frozenset[str]:
    """The names `ops` read as arguments (literals aside)."""
    return frozenset(a for op in ops for a in op.args if isinstance(a, str))


@dataclass(frozen=True)
class TensorDecl:
    """An input, output or state. `dims` are names: B, T, H reserved; others are feature dims."""

    name: str
    role: str  # input output state
    dims: tuple[str, ...]
    annotations: tuple[str, ...] = ()
    loc: Loc = field(default=_NOLOC, compare=False, repr=False)

    @property
    def feature_dims(self) -> tuple[str, ...]:
        if self.role == "state":
            return tuple(d for d in self.dims if d not in ("B", "T", "H"))
        return self.dims[3:]  # [B, T, H, ...]; a key input's sequence dim may be its own (a key sequence, S)

    @property
    def seq(self) -> str | None:
        """The token axis: T, or a key sequence of its own (softmax family: `input kc: [B, S, H, K] key`)."""
        return None if self.role == "state" else self.dims[1]

    @property
    def reverse(self) -> bool:
        """A state scanned right to left (annotation `reverse`): the value entering a chunk holds the chunks
        after it, and inter folds the chunk in for the chunk before it."""
        return "reverse" in self.annotations

    @property
    def tile(self) -> TileType:
        per_token = ("C",) if self.seq is not None else ()
        return TileType(tuple(C if d == "C" else dim(d) for d in per_token + self.feature_dims))


@dataclass(frozen=True)
class ParamDecl:
    """A runtime scalar with a default written over the feature dims (e.g. K**-0.5)."""

    name: str
    default: sympy.Expr
    loc: Loc = field(default=_NOLOC, compare=False, repr=False)


@dataclass(frozen=True)
class Selection:
    """The select stage's result (passes.select): per query, the key blocks of `block` tokens it walks.
    `score` is a [C, NB] value of the select stage; `candidates` the predicates a block must meet to be
    chosen by the criterion, `forced` those that choose a block outright (it takes a slot of the criterion
    first); `criterion` is (kind, value), e.g. ("topk", 3.0) or ("topp", "p") (a param's name); `limit` caps
    the blocks topp / threshold choose (kmax); `shared` ("sum" / "mean"): one choice per key/value head
    group, on the group's score summed or averaged over its query heads."""

    block: int
    score: str
    criterion: tuple[str, float | str]
    candidates: tuple[str, ...] = ()
    forced: tuple[str, ...] = ()
    loc: Loc = field(default=_NOLOC, compare=False, repr=False)
    limit: int | None = None
    shared: str | None = None

    @property
    def k(self) -> int:
        return int(self.criterion[1])

    @property
    def slots(self) -> int | None:
        """The most blocks one query chooses, when the spec bounds it (topk's k, a cap); None: the number of
        key blocks (known at call time)."""
        return self.k if self.criterion[0] == "topk" else self.limit

    def describe_rule(self) -> str:
        kind, value = self.criterion
        value = value if isinstance(value, str) else f"{value:g}"
        cap = f", {self.limit}" if self.limit is not None else ""
        return f"{kind}({self.score}, {value}{cap})"


@dataclass(frozen=True)
class KeySeq:
    """The softmax family's second key sequence: key inputs declared over their own token axis `dim`
    (`input kc: [B, S, H, K] key`), S keys per sequence, not the query's T tokens. `pos` = (a, c): the key at
    index s sits at position a * s + c of the query's token axis (`keypos S = (S + 1) * 32 - 1`), sympy
    expressions over numbers and params (symbols p_<param>); None: no declared positions (a spec that reads
    kpos needs them)."""

    dim: str
    pos: tuple | None = None
    loc: Loc = field(default=_NOLOC, compare=False, repr=False)


@dataclass(frozen=True)
class Spec:
    name: str
    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]
    states: tuple[TensorDecl, ...]
    params: tuple[ParamDecl, ...]
    chunk: int
    intra: Stage
    merge: Stage
    inter: Stage
    # the softmax family (passes.softmax): `prefix` runs over whole sequences before the scan (its cumsum
    # is over the sequence); `score` runs per (query block, key block) pair; `masks` are the score-stage
    # predicates whose pairs exist. Empty for the linear family.
    prefix: Stage = Stage("prefix", ())
    score: Stage = Stage("score", ())
    masks: tuple[str, ...] = ()
    # the select stage (passes.select): per (query, key block) values, then the selection they define;
    # the walk visits only the selected key blocks
    select: Stage = Stage("select", ())
    selection: Selection | None = None
    keyseq: KeySeq | None = None  # key inputs over a key sequence of their own (softmax family)
    # feature dims run in power-of-two parts (passes.dim_parts): (the caller's dim, the part dims it became)
    parts: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def family(self) -> str:
        """'linear' (a chunked state), 'softmax' (a score walked over key blocks) or 'hybrid' (both)."""
        if not self.score.ops:
            return "linear"
        return "hybrid" if self.states else "softmax"

    @property
    def reverse_states(self) -> tuple[TensorDecl, ...]:
        """The states scanned right to left (passes.plan gives them their own walk, in reverse chunk order)."""
        return tuple(s for s in self.states if s.reverse)

    @property
    def stages(self) -> tuple[Stage, ...]:
        """In evaluation order for one chunk: merge reads the incoming state, inter writes the next."""
        return (self.intra, self.merge, self.inter)

    def reads(self, name: str) -> bool:
        """Does some op of the spec read the value or builtin `name`?"""
        return any(name in op.args for st in (self.prefix, self.score) + self.stages for op in st.ops)

    @property
    def dims(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for d in self.inputs + self.outputs + self.states:
            for n in d.feature_dims:
                seen[n] = None
        return tuple(seen)

    def decl(self, name: str) -> TensorDecl | ParamDecl | None:
        for d in self.inputs + self.outputs + self.states + self.params:
            if d.name == name:
                return d
        return None


def next_state_name(state: str) -> str:
    """The SSA name of a state's value leaving the chunk (assigned in `inter`)."""
    return f"_next_{state}"
