"""Block sparsity derived from a spec's masks, at compile time, symbolically (sympy).

The masks of a score stage are predicates over a (query, key) pair. Those built from positions
(`qpos`, `kpos`), numbers, params and `head` with + - * / and comparisons, joined by and/or/not,
become sympy formulas over the integers i (query position) and j (key position). For a query block
of positions [i0, i1] this module derives, as expressions in i0, i1 and the params:

- a *visible* key range [lo, hi]: every pair the masks keep has lo <= j <= hi, so key blocks outside
  it are never loaded;
- a *full* key range [flo, fhi]: every j in it is kept for every i in the block, so key blocks inside
  it skip the elementwise mask.

Each comparison must be linear in j with a numeric coefficient (j <= a*i + c, j > i - window, ...);
over the block its bound is taken at the end of the block that makes it loosest (visible) or
tightest (full). `and` intersects ranges; `or` takes the hull of the visible ranges (conservative:
blocks inside the hull that no disjunct reaches are loaded and masked, never skipped wrongly) and a
full range that one disjunct guarantees. Anything else (a per-token input, a non-linear position
term) is *opaque*: every key is visible and no block is full, so the mask is applied elementwise
everywhere. The same derivation with i and j exchanged gives the query blocks a key block sees
(the backward's dK/dV walk).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import sympy

from ..ir.nodes import Op

I, J = sympy.Symbol("i", integer=True), sympy.Symbol("j", integer=True)
I0, I1 = sympy.Symbol("i0", integer=True), sympy.Symbol("i1", integer=True)
J0, J1 = sympy.Symbol("j0", integer=True), sympy.Symbol("j1", integer=True)
NEG, POS = sympy.S.NegativeInfinity, sympy.S.Infinity


@dataclass(frozen=True)
class Range:
    """lo <= x <= hi for the visible pairs; every x in [flo, fhi] is kept for the whole block.
    Unbounded sides are -oo / oo; an empty full range has flo = oo."""

    lo: sympy.Expr = NEG
    hi: sympy.Expr = POS
    flo: sympy.Expr = POS
    fhi: sympy.Expr = NEG

    @staticmethod
    def everything() -> "Range":
        return Range(NEG, POS, NEG, POS)

    @staticmethod
    def nothing() -> "Range":
        return Range(POS, NEG, POS, NEG)

    @property
    def has_full(self) -> bool:
        return self.flo != POS and self.fhi != NEG


OPAQUE = Range()  # every key visible, none known full


def _smax(*xs):
    xs = [x for x in xs if x != NEG]
    return POS if POS in xs else (sympy.Max(*xs) if xs else NEG)


def _smin(*xs):
    xs = [x for x in xs if x != POS]
    return NEG if NEG in xs else (sympy.Min(*xs) if xs else POS)


def predicate_formula(pred: str, ops: dict[str, Op], params: set[str], leaves: dict | None = None):
    """The sympy formula of a mask predicate, or None where it is not built from positions.
    Params become symbols named p_<param>; `head` the symbol head. `leaves`: the position-like leaves and
    their symbols (default qpos -> i, kpos -> j; the select stage's block indices are another pair)."""
    memo: dict[str, object] = {}
    leaves = {"qpos": I, "kpos": J} if leaves is None else leaves

    def rec(x):
        if isinstance(x, float):
            return sympy.nsimplify(x) if x == int(x) else sympy.Float(x)
        if x in memo:
            return memo[x]
        if x in leaves:
            out = leaves[x]
        elif x == "head":
            out = sympy.Symbol("head", integer=True, nonnegative=True)
        elif x in params:
            out = sympy.Symbol(f"p_{x}", real=True)
        elif x in ops:
            op = ops[x]
            a = [rec(y) for y in op.args[:1 if op.kind == "expand" else len(op.args)]]
            if any(v is None for v in a):
                out = None
            else:
                out = _combine(op.kind, a)
        else:
            out = None
        memo[x] = out
        return out

    return rec(pred)


_REL = {"lt": sympy.Lt, "le": sympy.Le, "gt": sympy.Gt, "ge": sympy.Ge, "eq": sympy.Eq, "ne": sympy.Ne}


def _combine(kind, a):
    arith = all(isinstance(v, sympy.Expr) for v in a)
    if kind in ("copy", "expand"):
        return a[0]
    if arith:
        if kind == "add":
            return a[0] + a[1]
        if kind == "sub":
            return a[0] - a[1]
        if kind == "mul":
            return a[0] * a[1]
        if kind == "div":
            return a[0] / a[1]
        if kind == "neg":
            return -a[0]
        if kind in _REL:
            return _REL[kind](a[0], a[1], evaluate=False)
        return None
    if kind == "and":
        return sympy.And(*a)
    if kind == "or":
        return sympy.Or(*a)
    if kind == "not":
        return sympy.Not(a[0])
    return None  # e.g. arithmetic on a comparison's 1.0 / 0.0 value


def _atom_range(rel, var, other, o_lo, o_hi) -> Range:
    """Range of `var` kept by one relation, for `other` anywhere in [o_lo, o_hi]."""
    e = sympy.expand(rel.lhs - rel.rhs)
    a = e.coeff(var)
    rest = sympy.expand(e - a * var)
    if var in rest.free_symbols or not a.is_number or (rest.free_symbols & {I, J} - {other}):
        return OPAQUE
    b = rest.coeff(other)
    if other in sympy.expand(rest - b * other).free_symbols or not b.is_number:
        return OPAQUE
    if a == 0:  # a condition on `other` only (or a constant): no structure over var exploited
        if not rest.free_symbols or rest.free_symbols == set():
            truth = type(rel)(rest, 0)
            if truth is sympy.true:
                return Range.everything()
            if truth is sympy.false:
                return Range.nothing()
        return OPAQUE
    kind = type(rel)
    if a < 0:  # divide by a negative number: flip the relation
        kind = {sympy.Lt: sympy.Gt, sympy.Le: sympy.Ge, sympy.Gt: sympy.Lt, sympy.Ge: sympy.Le}.get(kind, kind)
    bound = -rest / a  # var (rel) bound, bound linear in other with slope -b/a
    slope = -b / a
    at_lo, at_hi = bound.subs(other, o_lo), bound.subs(other, o_hi)
    small, large = (at_lo, at_hi) if slope >= 0 else (at_hi, at_lo)
    if kind in (sympy.Le, sympy.Lt):
        f = (lambda x: sympy.floor(x)) if kind is sympy.Le else (lambda x: sympy.ceiling(x) - 1)
        return Range(NEG, f(large), NEG, f(small))
    if kind in (sympy.Ge, sympy.Gt):
        f = (lambda x: sympy.ceiling(x)) if kind is sympy.Ge else (lambda x: sympy.floor(x) + 1)
        return Range(f(small), POS, f(large), POS)
    if kind is sympy.Eq:
        return Range(sympy.ceiling(small), sympy.floor(large), POS, NEG)
    return OPAQUE  # !=


def _and(rs: list[Range]) -> Range:
    lo, hi = _smax(*(r.lo for r in rs)), _smin(*(r.hi for r in rs))
    if any(not r.has_full for r in rs):
        return Range(lo, hi, POS, NEG)
    return Range(lo, hi, _smax(*(r.flo for r in rs)), _smin(*(r.fhi for r in rs)))


def _or(rs: list[Range]) -> Range:
    lo, hi = _smin(*(r.lo for r in rs)), _smax(*(r.hi for r in rs))
    full = [r for r in rs if r.has_full]
    if not full:
        return Range(lo, hi, POS, NEG)
    if all(r.flo == full[0].flo for r in full):  # e.g. prefix-LM: [0, prefix) or [0, i]
        return Range(lo, hi, full[0].flo, _smax(*(r.fhi for r in full)))
    if all(r.fhi == full[0].fhi for r in full):
        return Range(lo, hi, _smin(*(r.flo for r in full)), full[0].fhi)
    return Range(lo, hi, full[0].flo, full[0].fhi)


def _nnf(f):
    """Push `not` down to the comparisons."""
    if isinstance(f, sympy.Not):
        g = f.args[0]
        if isinstance(g, sympy.And):
            return sympy.Or(*(_nnf(sympy.Not(x)) for x in g.args), evaluate=False)
        if isinstance(g, sympy.Or):
            return sympy.And(*(_nnf(sympy.Not(x)) for x in g.args), evaluate=False)
        if isinstance(g, sympy.Not):
            return _nnf(g.args[0])
        neg = {sympy.Lt: sympy.Ge, sympy.Le: sympy.Gt, sympy.Gt: sympy.Le, sympy.Ge: sympy.Lt, sympy.Eq: sympy.Ne,
               sympy.Ne: sympy.Eq}
        if type(g) in neg:
            return neg[type(g)](g.lhs, g.rhs, evaluate=False)
        return f
    if isinstance(f, (sympy.And, sympy.Or)):
        return type(f)(*(_nnf(x) for x in f.args), evaluate=False)
    return f


def formula_range(f, var, other, o_lo, o_hi) -> Range:
    if f is None:
        return OPAQUE
    f = _nnf(f)
    if f is sympy.true:
        return Range.everything()
    if f is sympy.false:
        return Range.nothing()
    if isinstance(f, sympy.And):
        return _and([formula_range(x, var, other, o_lo, o_hi) for x in f.args])
    if isinstance(f, sympy.Or):
        return _or([formula_range(x, var, other, o_lo, o_hi) for x in f.args])
    if isinstance(f, sympy.core.relational.Relational):
        return _atom_range(f, var, other, o_lo, o_hi)
    return OPAQUE


@dataclass(frozen=True)
class BlockSparsity:
    """Key ranges for a query block [i0, i1] and query ranges for a key block [j0, j1]."""

    keys: Range  # over j, in i0, i1
    queries: Range  # over i, in j0, j1
    formulas: tuple  # one per mask (None: opaque)

    @property
    def skips(self) -> bool:
        return any(x not in (NEG, POS) for x in (self.keys.lo, self.keys.hi))

    def describe(self) -> list[str]:
        def show(r: Range, var, blk) -> str:
            vis = f"{var} in [{_fmt(r.lo)}, {_fmt(r.hi)}]"
            full = f"{var} in [{_fmt(r.flo)}, {_fmt(r.fhi)}]" if r.has_full else "none"
            return f"for a {blk}: visible {vis}; mask-free {full}"

        lines = []
        for n, f in enumerate(self.formulas):
            lines.append(f"mask {n + 1}: " + (f"{f}" if f is not None else "opaque (not a position formula): "
                                                 "applied elementwise on every block"))
        lines.append("key blocks " + show(self.keys, "j", "query block [i0, i1]"))
        lines.append("query blocks " + show(self.queries, "i", "key block [j0, j1]"))
        return lines


def _fmt(x) -> str:
    return {NEG: "-oo", POS: "oo"}.get(x, str(x))


def derive(masks: tuple[str, ...], ops: dict[str, Op], params: set[str], kmap: tuple | None = None) -> BlockSparsity:
    """`kmap` = (a, c): the keys are a sequence of their own, the key at index j at position a * j + c (a
    KeySeq's positions); the ranges are then over key indices, which the walks count."""
    formulas = tuple(predicate_formula(m, ops, params) for m in masks)
    if kmap is not None:
        formulas = tuple(f if f is None else f.subs(J, kmap[0] * J + kmap[1]) for f in formulas)
    if not formulas:
        return BlockSparsity(Range.everything(), Range.everything(), ())
    keys = _and([formula_range(f, J, I, I0, I1) for f in formulas])
    queries = _and([formula_range(f, I, J, J0, J1) for f in formulas])
    return BlockSparsity(keys, queries, formulas)


@lru_cache(maxsize=256)
def mean_visible_blocks(r: Range, T: int, bm: int, bn: int, params: tuple[tuple[str, float], ...]) -> float:
    """The key blocks of `bn` tokens that a query block of `bm` rows reaches under `r` (BlockSparsity.keys:
    keys j in [lo, hi] for the query block [i0, i1]), averaged over the query blocks of a T-token sequence
    (`params`: the spec's param values, as (name, value) pairs). A bound that reads anything else (the head
    index) counts every key block. Memoised: each call of a select spec asks it (~1 ms of sympy)."""
    params = dict(params)
    n_kb = -(-T // bn)
    bounds = [sympy.sympify(x) for x in (r.lo, r.hi)]
    values = {s: params[s.name[2:]] for x in bounds for s in x.free_symbols
              if s.name.startswith("p_") and s.name[2:] in params}
    bounds = [x.subs(values) for x in bounds]
    if any(x.free_symbols - {I0, I1} for x in bounds):
        return float(n_kb)
    bound = sympy.lambdify((I0, I1), bounds, "math")
    n_qb = -(-T // bm)
    total = 0
    for qb in range(n_qb):
        lo, hi = bound(qb * bm, min(T, (qb + 1) * bm) - 1)
        lo, hi = max(0.0, float(lo)), min(float(T - 1), float(hi))
        total += max(0, math.floor(hi) // bn - math.ceil(lo) // bn + 1) if hi >= lo else 0
    return total / n_qb


# ---- printing the bounds as Triton scalar arithmetic ------------------------------------------------
def triton_expr(x, names: dict) -> str:
    """A sympy bound as a Triton fp32 scalar expression; `names` maps symbols to Triton expressions."""
    if x.is_Integer or x.is_Rational or x.is_Float:
        return repr(float(x))
    if x.is_Symbol:
        return names[x.name]
    if isinstance(x, sympy.Add):
        return "(" + " + ".join(triton_expr(a, names) for a in x.args) + ")"
    if isinstance(x, sympy.Mul):
        return "(" + " * ".join(triton_expr(a, names) for a in x.args) + ")"
    if isinstance(x, sympy.Pow) and x.exp == -1:
        return f"(1.0 / {triton_expr(x.base, names)})"
    if isinstance(x, sympy.floor):
        return f"tl.floor({triton_expr(x.args[0], names)})"
    if isinstance(x, sympy.ceiling):
        return f"tl.ceil({triton_expr(x.args[0], names)})"
    if isinstance(x, (sympy.Max, sympy.Min)):
        fn = "tl.maximum" if isinstance(x, sympy.Max) else "tl.minimum"
        out = triton_expr(x.args[0], names)
        for a in x.args[1:]:
            out = f"{fn}({out}, {triton_expr(a, names)})"
        return out
    raise NotImplementedError(f"cannot print the block bound {x} for Triton")


def numeric(x, values: dict) -> float:
    """A bound at concrete values (tests); `values` maps symbol names to numbers."""
    if x in (NEG, POS):
        return float(x)
    return float(x.subs({s: values[s.name] for s in x.free_symbols}))
