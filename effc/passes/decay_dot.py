"""Factored decays kept finite: `causal((x * exp(b)) @ (y * exp(-b)).T)` becomes `decay_dot(x, y, b, -b)`.

A chunk's score under a per-channel decay is P[i, j] = sum_k x_ik y_jk exp(b_ik - b_jk) for j <= i, with
b the cumulative log decay (b = cumsum(g), g <= 0). Specs write it factored, as two matmul operands
x * exp(b) and y * exp(-b): every product is at most 1, but exp(-b) alone leaves fp32's range once the
chunk's decay passes e^-88 (fp16's at e^-11), and exp(b) underflows while the product it belongs to is
near 1. The result is inf, nan or silently lost terms for strong gates.

This pass finds such matmuls and replaces them with `decay_dot(x, y, eq, ek, diag, c)`:
P[i, j] = sum_k x_ik y_jk exp(eq_ik + ek_jk) over the kept pairs (j <= i with diag = 1, j < i with 0),
0 elsewhere. The code generators evaluate it from the exponents, never from exp(eq) and exp(ek) alone
(codegen.triton's `_decay_dot`: the factored form x e^(eq - c), y e^(ek + c) when the chunk's exponent
span fits the matmul dtype, sub-chunk anchors and a pairwise diagonal when it does not). The centre
c = last(cumsum(g)) / 2 is an IR value, not a reduction inside the helper: every eq and -ek of the chunk
lies between 0 and last(cumsum(g)) (g <= 0), so both factors stay within e^(|last| / 2), and CSE shares
the `last` with the state update that reads it anyway (a per-column max/min in the helper cost gla's walk
half its time on an H200). Its adjoints
(passes.vjp_rules) are the two contractions of the same kind, `decay_mm` and `decay_mm_t`, so the
backward is finite too.

A matmul is rewritten when (proved on the IR, not assumed from names):
- its left operand is a product with one factor exp(eq) (or exp(eq)[:, None]) and its right operand the
  transpose of a product with one factor exp(ek), the other factors giving the operand's whole shape;
- eq is cumsum(g) (inclusive) or cumsum(g) - g (exclusive), ek is -cumsum(g), for one g proved <= 0
  (an input annotated `logdecay`, logsigmoid, -exp, ...): then eq is non-increasing along the chunk and
  eq_i + ek_j <= 0 on every kept pair, which is what the stable evaluation needs;
- every reader of the product keeps only the lower triangle (causal, strict, unit_lower_inv); an
  exclusive eq needs every reader strict (its diagonal term exp(-g_i) is not bounded);
- y is not computed by a matmul (its transpose would feed a dot from an accumulator layout: see
  passes.transpose_sink).
Other matmuls are left as written.
"""
from __future__ import annotations

from dataclasses import replace

from ..ir import ops as O
from ..ir.nodes import C, Op, Spec, Stage, TileType, next_state_name
from .shapes import op_type, value_types

_LOWER_READERS = {"causal": 1.0, "strict": 0.0, "unit_lower_inv": 0.0}  # reader -> the diagonal it reads
_NONNEG_FNS = {"exp", "exp2", "sigmoid", "softplus", "relu", "abs", "sqrt", "rsqrt"}


class _Graph:
    def __init__(self, spec: Spec):
        self.spec = spec
        self.defs = {op.out: op for st in spec.stages for op in st.ops}
        self.readers: dict[str, list[Op]] = {}
        for st in spec.stages:
            for op in st.ops:
                for a in op.args:
                    if isinstance(a, str):
                        self.readers.setdefault(a, []).append(op)

    def sign(self, a) -> int:
        """-1: provably <= 0; 1: provably >= 0; 0: unknown."""
        if isinstance(a, float):
            return -1 if a <= 0 else 1
        decl = self.spec.decl(a)
        if decl is not None:
            return -1 if "logdecay" in getattr(decl, "annotations", ()) else 0
        op = self.defs.get(a)
        if op is None:
            return 0
        k, args = op.kind, op.args
        if k == "logsigmoid":
            return -1
        if k in _NONNEG_FNS:
            return 1
        if k == "neg":
            return -self.sign(args[0])
        if k in ("copy", "expand", "cumsum", "last"):
            return self.sign(args[0])
        if k in ("mul", "div"):
            return self.sign(args[0]) * self.sign(args[1])
        if k == "add":
            s0, s1 = self.sign(args[0]), self.sign(args[1])
            return s0 if s0 == s1 else 0
        if k == "minimum":
            return -1 if -1 in (self.sign(args[0]), self.sign(args[1])) else 0
        if k == "maximum":
            return 1 if 1 in (self.sign(args[0]), self.sign(args[1])) else 0
        return 0

    def factors(self, a) -> list:
        """The leaves of the product tree (through `mul` only) that computes `a`."""
        op = self.defs.get(a) if isinstance(a, str) else None
        if op is None or op.kind != "mul":
            return [a]
        return self.factors(op.args[0]) + self.factors(op.args[1])

    def exponent(self, f):
        """(e, widen): f is exp(e), or exp(e)[:, None] (widen: e must be widened to a column)."""
        op = self.defs.get(f) if isinstance(f, str) else None
        widen = False
        if op is not None and op.kind == "expand" and tuple(op.args[1:]) == (0.0, 1.0):
            op, widen = self.defs.get(op.args[0]) if isinstance(op.args[0], str) else None, True
        if op is None or op.kind != "exp" or not isinstance(op.args[0], str):
            return None
        return op.args[0], widen

    def cumulative(self, e):
        """('incl' | 'excl', g, sign) when e is +-cumsum(g) (or cumsum(g) - g) with g <= 0; else None."""
        op = self.defs.get(e)
        if op is None:
            return None
        if op.kind == "neg" and isinstance(op.args[0], str):
            inner = self.cumulative(op.args[0])
            return None if inner is None or inner[0] != "incl" else ("incl", inner[1], -inner[2])
        if op.kind == "cumsum" and self.sign(op.args[0]) == -1:
            return "incl", op.args[0], 1
        if op.kind == "sub" and isinstance(op.args[0], str) and isinstance(op.args[1], str):
            cum = self.defs.get(op.args[0])
            if cum is not None and cum.kind == "cumsum" and cum.args[0] == op.args[1] and self.sign(op.args[1]) == -1:
                return "excl", op.args[1], 1
        return None

    def from_matmul(self, a, seen=None) -> bool:
        op = self.defs.get(a) if isinstance(a, str) else None
        if op is None:
            return False
        if op.kind == "matmul":
            return True
        seen = set() if seen is None else seen
        if a in seen:
            return False
        seen.add(a)
        return any(self.from_matmul(x, seen) for x in op.args if isinstance(x, str))


def _split_factor(g: _Graph, operand: str):
    """(other factors, exponent, widen) of an operand with exactly one exp factor of a cumulative decay."""
    leaves = g.factors(operand)
    found = [(i, g.exponent(f)) for i, f in enumerate(leaves)]
    found = [(i, e) for i, e in found if e is not None and g.cumulative(e[0]) is not None]
    if len(found) != 1:
        return None
    i, (e, widen) = found[0]
    return leaves[:i] + leaves[i + 1:], e, widen


def _diag(g: _Graph, product: str):
    readers = g.readers.get(product, [])
    if not readers or any(r.kind not in _LOWER_READERS or r.args[0] != product for r in readers):
        return None
    return max(_LOWER_READERS[r.kind] for r in readers)


class _Builder:
    """Typed ops under fresh names (`_dd<n>`); `ops` holds those of the rewrite under way."""

    def __init__(self, types: dict[str, TileType]):
        self.types = dict(types)
        self.n = 0
        self.ops: list[Op] = []

    def take(self) -> list[Op]:
        ops, self.ops = self.ops, []
        return ops

    def emit(self, kind: str, *args, loc) -> str:
        while True:
            self.n += 1
            out = f"_dd{self.n}"
            if out not in self.types:
                break
        n_args = 1 if kind == "expand" else len(args)
        op = Op(out, kind, tuple(args), loc=loc)
        t = op_type(op, [TileType(()) if isinstance(a, float) else self.types[a] for a in args[:n_args]])
        self.types[out] = t
        self.ops.append(op.typed(t))
        return out

    def product(self, leaves: list, shape, loc) -> str | None:
        names = [x for x in leaves if isinstance(x, str)]
        consts = [x for x in leaves if isinstance(x, float)]
        if not names:
            return None
        out = names[0]
        for x in names[1:] + consts:
            out = self.emit("mul", out, x, loc=loc)
        return out if self.types[out].shape == shape else None


def _rewrite(g: _Graph, op: Op, b: _Builder):
    """The ops replacing matmul `op` with a decay_dot, or None when it is not a factored decay."""
    if op.kind != "matmul" or not isinstance(op.args[0], str) or not isinstance(op.args[1], str):
        return None
    if op.type is None or op.type.shape != (C, C):
        return None
    right = g.defs.get(op.args[1])
    if right is None or right.kind != "transpose" or not isinstance(right.args[0], str):
        return None
    diag = _diag(g, op.out)
    left_f, right_f = _split_factor(g, op.args[0]), _split_factor(g, right.args[0])
    if diag is None or left_f is None or right_f is None:
        return None
    (xs, eq, widen_q), (ys, ek, widen_k) = left_f, right_f
    (form_q, gate_q, sign_q), (form_k, gate_k, sign_k) = g.cumulative(eq), g.cumulative(ek)
    if gate_q != gate_k or sign_q != 1 or sign_k != -1 or form_k != "incl" or widen_q != widen_k:
        return None
    if form_q == "excl" and diag != 0.0:
        return None
    x = b.product(xs, b.types[op.args[0]].shape, op.loc)
    y = b.product(ys, b.types[right.args[0]].shape, op.loc)
    if x is None or y is None or g.from_matmul(y):
        b.take()  # dropped: the matmul stays as written
        return None
    if widen_q:  # one exponent per token: the pair weights are formed directly, no centre needed
        eq, ek = (b.emit("expand", e, 0.0, 1.0, loc=op.loc) for e in (eq, ek))
        centre = 0.0
    else:  # ek = -B with B = cumsum(g) monotone: eq and -ek lie between 0 and last(B), centred on half of it
        centre = b.emit("mul", b.emit("last", g.defs[ek].args[0], loc=op.loc), 0.5, loc=op.loc)
    if b.types[eq].shape[0] != C or b.types[eq] != b.types[ek]:
        b.take()
        return None
    return b.take() + [Op(op.out, "decay_dot", (x, y, eq, ek, diag, centre), op.type, op.loc)]


def factor_decays(spec: Spec) -> Spec:
    """`spec` (typed, linear family) with every factored-decay score matmul replaced by a decay_dot."""
    g = _Graph(spec)
    b = _Builder(value_types(spec))
    stages = []
    for st in spec.stages:
        ops: list[Op] = []
        for op in st.ops:
            new = _rewrite(g, op, b)
            ops.extend(new if new is not None else [op])
        stages.append(Stage(st.name, tuple(ops)))
    if all(a.ops == s.ops for a, s in zip(stages, spec.stages)):
        return spec
    return replace(spec, **{st.name: st for st in _live(spec, stages)})


def _live(spec: Spec, stages: list[Stage]) -> list[Stage]:
    """The stages without the ops the rewrite left unread (the factored operands and their exps)."""
    wanted = {d.name for d in spec.outputs} | {next_state_name(s.name) for s in spec.states}
    kept: list[list[Op]] = [[] for _ in stages]
    for i in reversed(range(len(stages))):
        for op in reversed(stages[i].ops):
            if op.out in wanted:
                kept[i].append(op)
                wanted |= {a for a in op.args if isinstance(a, str)}
    return [Stage(st.name, tuple(reversed(ops))) for st, ops in zip(stages, kept)]


def per_channel(op: Op, types: dict[str, TileType]) -> bool:
    """A decay op with an exponent per channel ([C, K]): evaluated by the code generators' helpers (factored,
    or anchored past the dot dtype); one exponent per token ([C, 1]) is a [C, C] tile of pair weights."""
    return op.kind in O.DECAY and types[op.args[2]].shape[1] != 1


def rounds_operands(kind: str, per_channel_exponents: bool) -> bool:
    """Are the two tile operands of decay op `kind` rounded to the dot dtype (bf16 / fp16 on a GPU)? The
    per-channel adjoints feed the exponent's gradient x * dx - y * dy, a difference of near-equal terms: their
    operands stay fp32 (tf32 on a GPU, 8x finer than bf16), or gla's dg misses the bf16 reference by ~2.4x.
    The code generators and the oracle's low-precision reference both follow this."""
    return kind == "decay_dot" or not per_channel_exponents


def decay_sites(spec: Spec) -> tuple[Op, ...]:
    """The decay_dot ops of a spec: where `factor_decays` applied (the plan prints them)."""
    return tuple(op for st in spec.stages for op in st.ops if op.kind == "decay_dot")
