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
class Stage:
    name: str  # intra inter merge score prefix
    body: tuple[Assign | Mask, ...]
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
