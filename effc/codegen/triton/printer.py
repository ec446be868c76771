"""One Triton expression per IR op. Values are fp32 tiles; matmul operands are cast to
DOT_DTYPE (the input dtype on a GPU, fp32 under the interpreter)."""
from __future__ import annotations

import math

import sympy

from ...ir import ops as O
from ...ir.nodes import C, Op, Spec
from ...passes.decay_dot import per_channel, rounds_operands
from ...passes.shapes import reduces_tokens
from .. import power, template

_UNARY = {
    "neg": "-({0})", "exp": "tl.exp({0})", "exp2": "tl.exp2({0})", "log": "tl.log({0})",
    "log2": "tl.log2({0})", "sigmoid": "tl.sigmoid({0})", "sqrt": "tl.sqrt({0})", "rsqrt": "tl.rsqrt({0})",
    "abs": "tl.abs({0})", "relu": "tl.maximum({0}, 0.0)", "silu": "(({0}) * tl.sigmoid({0}))",
    "sin": "_sin({0})", "cos": "_cos({0})",  # TRIG_HELPERS
    "tanh": "(2.0 * tl.sigmoid(2.0 * ({0})) - 1.0)",
    # stable forms: log(1 + e^x) = max(x, 0) + log(1 + e^-|x|)
    "softplus": "(tl.maximum({0}, 0.0) + tl.log(1.0 + tl.exp(-tl.abs({0}))))",
    "logsigmoid": "(tl.minimum({0}, 0.0) - tl.log(1.0 + tl.exp(-tl.abs({0}))))",
    "not": "(1.0 - {0})",  # of a 0/1 mask
}
_BINARY = {"add": "({0} + {1})", "sub": "({0} - {1})", "mul": "({0} * {1})", "div": "({0} / {1})",
           "maximum": "tl.maximum({0}, {1})", "minimum": "tl.minimum({0}, {1})",
           # comparisons and logic on 0/1 floats (a mask is a value like any other)
           **{k: f"tl.where({{0}} {sym} {{1}}, 1.0, 0.0)" for k, sym in
              (("lt", "<"), ("le", "<="), ("gt", ">"), ("ge", ">="), ("eq", "=="), ("ne", "!="))},
           "and": "({0} * {1})", "or": "tl.maximum({0}, {1})"}
_TERNARY = {"where": "tl.where({0} != 0.0, {1}, {2})"}
_ONE = sympy.Integer(1)
_MASK_CMP = {"causal": ">=", "strict": ">", "anticausal": "<=", "antistrict": "<"}  # row (cmp) column: kept
# ops whose result can be inf or nan for finite arguments
_LEAVES_FINITE_RANGE = {"exp", "exp2", "log", "log2", "rsqrt", "div", "pow"}


# The rotations of a [R, D] register tile along its features, D padded to DP columns (D, DP constexprs; D even,
# runtime.checks). rotate_half with D == DP (a power of two >= 16: every usual head dim) is a register shuffle:
# view the tile as [R, 2, D/2], split the halves and join them back swapped. A padded tile's halves do not sit at
# DP / 2, so it gathers each column's partner instead (padded columns gather themselves and never reach a real
# one). rotate_pairs needs no such care: D is even, so no pair straddles the padding.
ROTATION_HELPERS = """
@triton.jit
def _rotate_half(x, D: tl.constexpr, DP: tl.constexpr):
    \"\"\"[x1, x2] -> [-x2, x1] along the last axis of a [R, DP] tile (the first D columns real).\"\"\"
    R: tl.constexpr = x.shape[0]
    if D == DP:
        x1, x2 = tl.split(tl.permute(tl.reshape(x, (R, 2, DP // 2)), (0, 2, 1)))
        return tl.reshape(tl.permute(tl.join(-x2, x1), (0, 2, 1)), (R, DP))
    else:
        f = tl.arange(0, DP)
        src = tl.where(f < D // 2, f + D // 2, tl.where(f < D, f - D // 2, f))
        sign = tl.where(f < D // 2, -1.0, 1.0)
        return tl.gather(x, tl.broadcast_to(src[None, :], (R, DP)), 1) * sign[None, :]


@triton.jit
def _rotate_pairs(x, D: tl.constexpr, DP: tl.constexpr):
    \"\"\"(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) along the last axis of a [R, DP] tile.\"\"\"
    R: tl.constexpr = x.shape[0]
    x0, x1 = tl.split(tl.reshape(x, (R, DP // 2, 2)))
    return tl.reshape(tl.join(-x1, x0), (R, DP))
"""


# Fenwick levels (ir.ops.LEVELS). A pair's level is the exponent field of (a xor b) as a float32 (exact below
# 2^24). gather / scatter with a [C, n] index loop over the DP columns of the picked tile (DP a constexpr,
# unrolled): no [C, n, DP] temporary, and an index outside 0..D-1 matches no real column (padded columns
# read 0), as the oracle reads 0 there.
LEVEL_HELPERS = """
@triton.jit
def _pair_level(a, b):
    \"\"\"0 where a == b, else floor(log2(a xor b)) + 1, for integer positions held as floats.\"\"\"
    x = a.to(tl.int32) ^ b.to(tl.int32)
    e = ((x.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 255) - 126
    return tl.where(x == 0, 0.0, e.to(tl.float32))


@triton.jit
def _gather_cols(x, i, r_D, DP: tl.constexpr):
    \"\"\"out[t, j] = x[t, i[t, j]] for a [R, DP] tile x and an [R, n] (or [1, n]) index tile i.\"\"\"
    out = tl.zeros((x.shape[0], i.shape[1]), tl.float32)
    for d in tl.static_range(DP):
        col = tl.sum(tl.where(r_D[None, :] == d, x, 0.0), axis=1)
        out = tl.where(i == d, col[:, None], out)
    return out


@triton.jit
def _scatter_cols(g, i, r_D, DP: tl.constexpr):
    \"\"\"The adjoint of _gather_cols: out[t, d] = sum_j g[t, j] where i[t, j] == d, an [R, DP] tile.\"\"\"
    out = tl.zeros((g.shape[0], DP), tl.float32)
    for d in tl.static_range(DP):
        col = tl.sum(tl.where(i == d, g, 0.0), axis=1)
        out = tl.where(r_D[None, :] == d, col[:, None], out)
    return out
"""


# sin / cos. libdevice's sinf spends ~25 instructions a value and keeps a Payne-Hanek path for |x| > 1e5
# whose local-memory array spills (softmax_rope's forward: 26.8k SASS instructions and 1.4 KB of spills
# against softmax_attn's 4.0k and 152 B; with these, 6.3k and 324 B). The angle is reduced to [-pi, pi] by
# two FMAs with a two-part 2 pi (8 + 24 significant bits: the reduced angle is exact to ~1e-7 rad) and
# handed to the SFU's approximate sine (absolute error ~1e-6 on [-pi, pi]). The interpreter has no libdevice: it keeps
# tl.sin / tl.cos, whose results agree with these to that error.
TRIG_HELPERS = """
import os as _os

if _os.environ.get("TRITON_INTERPRET") == "1":
    @triton.jit
    def _sin(x):
        return tl.sin(x)

    @triton.jit
    def _cos(x):
        return tl.cos(x)
else:
    from triton.language.extra import libdevice as _libdevice

    @triton.jit
    def _reduce_angle(x):
        n = tl.floor(x * 0.15915494309189535 + 0.5)
        return tl.fma(n, -0.0019353071795864769, tl.fma(n, -6.28125, x))

    @triton.jit
    def _sin(x):
        return _libdevice.fast_sinf(_reduce_angle(x))

    @triton.jit
    def _cos(x):
        return _libdevice.fast_cosf(_reduce_angle(x))
"""


def helper_source(ops) -> str:
    """The @triton.jit helpers a module's kernels call, for the op kinds among `ops`: the rotations', the
    decay contractions' (decay.py.j2), the in-chunk solve's (solve.py.j2); empty when none is used."""
    kinds = {op.kind for op in ops}
    parts = [ROTATION_HELPERS] if kinds & set(O.ROTATIONS) else []
    if kinds & {"sin", "cos"}:
        parts.append(TRIG_HELPERS)
    if kinds & (set(O.LEVELS) | {"scatter"}):
        parts.append(LEVEL_HELPERS)
    if kinds & set(O.DECAY):
        parts.append(template(__file__, "decay.py.j2").render())
    if kinds & set(O.SOLVES):
        parts.append(template(__file__, "solve.py.j2").render())
    return "\n".join(parts)


def head_index(heads: str, head: str = "i_h") -> str:
    """The head of a tensor with `heads` heads that query head `head` reads: itself, or its group's under
    grouped heads (GQA: H // heads query heads share one)."""
    if heads == "H":
        return head
    if heads.startswith("(H // ") and heads.endswith(")"):  # H // G heads: G query heads a head
        return f"{head} // {heads[6:-1]}"
    return f"{head} // (H // {heads})"


def pad_cond(d: str, split: str | None = None) -> str:
    """A constexpr condition: is feature dim `d`'s tile padded past its real size? Non-split dims are loaded
    as one tile of `d_P` columns (passes.tiling.padded); the split dim in blocks of BLOCK, the last one
    padded unless BLOCK divides it. False for power-of-two dims >= 16, so their kernels are unchanged."""
    return f"({d} % BLOCK != 0)" if d == split else f"({d}_P != {d})"


def feature_mask(axes, split: str | None = None) -> tuple[str, str] | None:
    """(mask, constexpr condition) of a tile whose axes are `axes` (feature dim names, other entries None),
    masking its padded feature columns; None when no axis is a feature dim."""
    feats = [(i, d) for i, d in enumerate(axes) if d is not None]
    if not feats:
        return None
    n = len(axes)
    mask = " & ".join(f"m_{d}" + ("" if n == 1 else "[" + ", ".join(":" if j == i else "None" for j in range(n)) + "]")
                      for i, d in feats)
    conds = [pad_cond(d, split) for _, d in feats]
    return mask, conds[0] if len(conds) == 1 else "(" + " | ".join(conds) + ")"


class TritonPrinter:
    # the chunk's valid-token mask in the scan kernels; None where padding is handled otherwise
    token_valid: str | None = "tv"

    def __init__(self, spec: Spec, types, split: str | None = None):
        self.spec, self.types = spec, types
        self.inputs = {d.name for d in spec.inputs}
        # values loaded with other=0 on their padded feature columns: a matmul contracting them needs no mask
        self.zero_columns = set(self.inputs)
        self.states = {d.name for d in spec.states}
        self.params = {p.name for p in spec.params}
        self.dims = set(spec.dims) | {"H"}
        self.features = set(spec.dims)
        self.split = split
        # [C] tiles this kernel loads from a per-token buffer: name -> the pointer of one of its rows (`{row}`)
        self.row_pointers: dict[str, str] = {}

    # -- padded feature columns -----------------------------------------------------------------
    # A feature dim that is not a power of two >= 16 is a tile of its padded size (tiling.padded), masked past
    # the real one. Values on padded columns may be anything (exp(0) = 1, garbage carried in a state); they
    # must never reach a real column. Only reductions over a feature axis and matmuls contracting one mix
    # columns: they select 0 (sum) or -inf (max) there, with tl.where (a select: inf or nan there is dropped,
    # where a multiply by 0 would not drop it). Every mask is under a constexpr condition (pad_cond), so a
    # power-of-two dim compiles to the kernel it had before.
    def _feature_axes(self, shape) -> list:
        return [str(d) if str(d) in self.features else None for d in shape]

    def padded_fill(self, a, text: str, fill: str, axes=None) -> str:
        """`text` (the tile `a`) with fill on the padded columns of the axes in `axes` (default: all)."""
        if isinstance(a, float) or a not in self.types:
            return text
        found = self._feature_axes(self.types[a].shape)
        if axes is not None:
            found = [d if i in axes else None for i, d in enumerate(found)]
        fm = feature_mask(found, self.split)
        if fm is None:
            return text
        mask, cond = fm
        return f"(tl.where({mask}, {text}, {fill}) if {cond} else {text})"

    def _operand(self, a, text: str, axis: int) -> str:
        """A matmul operand contracted over `axis`: zero on padded columns of it. Inputs are loaded with
        other=0 there (zero_columns), so they need no mask."""
        if a in self.zero_columns:
            return text
        return self.padded_fill(a, text, "0.0", axes=(axis,))

    # the names a spec's expressions read besides values, params and dims, and their Triton text here
    NAMED = {"idx": "r_C.to(tl.float32)", "pos": "(tok + POS0).to(tl.float32)", "head": "i_h.to(tl.float32)",
             "inf": 'float("inf")'}

    def ref(self, a) -> str:
        if isinstance(a, float):
            return ('-float("inf")' if a < 0 else 'float("inf")') if math.isinf(a) else repr(a)
        if a in self.params:
            return f"p_{a}"
        if a in self.dims:
            return f"({a} * 1.0)"
        if a in self.NAMED:
            return self.NAMED[a]
        return self.value_ref(a)

    def value_ref(self, a: str) -> str:
        """A value computed by an op (or loaded): its variable."""
        return f"v_{a}"

    def expr(self, op: Op) -> str:
        k = op.kind
        n_args = 1 if k == "expand" else len(op.args)
        a = [self.ref(x) for x in op.args[:n_args]]
        if k == "copy":
            return a[0]
        if k in _UNARY:
            return self._finite_on_padding(op, _UNARY[k].format(*a))
        if k in _BINARY:
            return self._finite_on_padding(op, _BINARY[k].format(*a))
        if k in _TERNARY:
            return _TERNARY[k].format(*a)
        if k == "pow":
            return self._finite_on_padding(op, power(a[0], op.args[1], "tl", self.ref(op.args[1])))
        if k == "matmul":
            return self._matmul(op, a)
        if k in O.DECAY:
            return self._decay(op, a)
        if k == "transpose":
            return f"tl.trans({a[0]})"
        if k in _MASK_CMP:
            cmp = _MASK_CMP[k]
            fill = a[1] if len(a) > 1 else "0.0"
            return f"tl.where(r_C[:, None] {cmp} r_C[None, :], {a[0]}, {fill})"
        if k == "cumsum":
            return f"tl.cumsum({a[0]}, axis=0)"
        if k == "revcumsum":
            mask = "tv" + ("[:, None]" if self.types[op.args[0]].rank == 2 else "")
            return f"tl.cumsum(tl.where({mask}, {a[0]}, 0.0), axis=0, reverse=True)"
        if k == "last":
            if op.args[0] in self.row_pointers:  # a loaded row vector: one load, no reduction across the warps
                return f"tl.load({self.row_pointers[op.args[0]].format(row='n_valid - 1')}).to(tl.float32)"
            sel = "(r_C == n_valid - 1)" + ("[:, None]" if self.types[op.args[0]].rank == 2 else "")
            return f"tl.sum(tl.where({sel}, {a[0]}, 0.0), axis=0)"
        if k in O.REDUCTIONS:
            axis, how = O.REDUCTIONS[k]
            fill = "0.0" if how == "sum" else '-float("inf")'
            a[0] = self.padded_fill(op.args[0], a[0], fill, axes=(axis,))
            if reduces_tokens(op, self.types):  # padded tokens do not exist
                a[0] = f"tl.where({'tv[:, None]' if axis == 0 else 'tv[None, :]'}, {a[0]}, {fill})"
            return f"tl.{how}({a[0]}, axis={axis})"
        if k == "expand":
            return a[0] + "[" + ", ".join("None" if p == 1.0 else ":" for p in op.args[1:]) + "]"
        if k == "unit_lower_inv":
            return f"_unit_lower_inv({a[0]}, r_C, C, solve)"
        if k in O.ROTATIONS:
            return self._rotation(op, a[0])
        if k == "fidx":  # r_D: the feature indices of the tile (of this program's block, for a split dim)
            return f"r_{op.args[0]}.to(tl.float32)"
        if k == "level":  # a number beside a tile takes the tile's shape
            a = [f"(tl.zeros_like({a[1 - n]}) + {x})" if isinstance(op.args[n], float) else x for n, x in enumerate(a)]
            return f"_pair_level({a[0]}, {a[1]})"
        if k in ("gather", "scatter"):
            return self._columns(op, a)
        if k == "gtz":
            return f"tl.where({a[0]} > 0.0, 1.0, 0.0)"
        if k == "sign":
            return f"tl.where({a[0]} > 0.0, 1.0, tl.where({a[0]} < 0.0, -1.0, 0.0))"
        if k == "unlast":
            rank = self.types[op.args[0]].rank
            sel = "(r_C == n_valid - 1)" + ("[:, None]" if rank == 1 else "")
            return f"tl.where({sel}, {a[0]}{'[None, :]' if rank == 1 else ''}, 0.0)"
        if k in ("total", "maxall"):
            rank, how = self.types[op.args[0]].rank, "sum" if k == "total" else "max"
            fill = "0.0" if how == "sum" else '-float("inf")'
            a[0] = self.padded_fill(op.args[0], a[0], fill)
            if reduces_tokens(op, self.types):
                a[0] = f"tl.where(tv{'[:, None]' if rank == 2 else ''}, {a[0]}, {fill})"
            if rank == 0:
                return a[0]
            return f"tl.{how}(tl.{how}({a[0]}, axis=1), axis=0)" if rank == 2 else f"tl.{how}({a[0]}, axis=0)"
        if k == "bcast":
            return f"(tl.zeros_like({a[1]}) + {a[0]})"
        raise NotImplementedError(f"the Triton backend cannot emit tile op '{k}'")

    def _columns(self, op: Op, a: list[str]) -> str:
        """gather(x, i) and its adjoint scatter(g, i, x): the picked tile's columns are a feature dim D."""
        x = op.args[0] if op.kind == "gather" else op.args[2]
        d = str(self.types[x].shape[1])
        i = op.args[1]
        rank = 0 if isinstance(i, float) else self.types[i].rank
        if op.kind == "gather":
            xt = self.padded_fill(x, a[0], "0.0", axes=(1,))
            if rank == 2:
                return f"_gather_cols({xt}, {a[1]}, r_{d}, {d}_P)"
            col = a[1] + ("[:, None]" if rank == 1 else "")
            return f"tl.sum(tl.where(r_{d}[None, :] == {col}, {xt}, 0.0), axis=1)"
        if rank == 2:
            return f"_scatter_cols({a[0]}, {a[1]}, r_{d}, {d}_P)"
        col = a[1] + ("[:, None]" if rank == 1 else "")
        return f"tl.where(r_{d}[None, :] == {col}, {a[0]}[:, None], 0.0)"

    def _rotation(self, op: Op, x: str) -> str:
        t = self.types[op.args[0]]
        d = str(t.shape[-1])
        if d == self.split:  # passes.legality never splits a rotated dim
            raise NotImplementedError(f"'{op.kind}' rotates dim {d}, which this kernel holds in blocks ({op.loc})")
        fn = f"_{op.kind}"
        if t.rank == 2:
            return f"{fn}({x}, {d}, {d}_P)"
        return f"tl.reshape({fn}(({x})[None, :], {d}, {d}_P), ({d}_P,))"

    def _finite_on_padding(self, op: Op, text: str) -> str:
        """Values on padded tokens are never used, but they meet zeros in matmuls over tokens, where
        inf * 0 = nan: an op that can leave the finite range (exp(last(b) - b) past the last token, 0 / 0 of
        a normalised padded row) gives 0 on padded token rows. Masking here, on the rare op that needs it,
        is cheaper than masking both operands of every token-contracting matmul (~20% on retention)."""
        shape = self.types[op.out].shape
        if self.token_valid is None or op.kind not in _LEAVES_FINITE_RANGE or not shape or shape[0] != C:
            return text
        return f"tl.where({self.token_valid}{'[:, None]' if len(shape) == 2 else ''}, {text}, 0.0)"

    def _decay(self, op: Op, a: list[str]) -> str:
        """The decay contractions (passes.decay_dot). Per-channel exponents go to the template's helpers; one
        exponent per token makes the pair weights a [C, C] tile, exp of the masked sums, as written."""
        k, diag = op.kind, int(op.args[4])
        if k == "decay_dot":  # x and y are contracted over their feature axis
            a[0], a[1] = self._operand(op.args[0], a[0], 1), self._operand(op.args[1], a[1], 1)
        if per_channel(op, self.types):
            dtype = "DOT_DTYPE" if rounds_operands(k, True) else "tl.float32"
            return f"_{k}({', '.join(a[:4])}, {a[5]}, tv, r_C, C, {diag}, {dtype}, PRECISION, DECAY_MODE, decay_flag)"
        x, y, eq, ek = a[:4]
        if k == "decay_mm_t":  # weights of pair (i, j) at [j, i]
            keep, pair = f"(r_C[None, :] > r_C[:, None] - {diag})", f"{ek} + tl.trans({eq})"
        else:
            keep, pair = f"(r_C[:, None] > r_C[None, :] - {diag})", f"{eq} + tl.trans({ek})"
        weight = f"tl.exp(tl.where({keep}, {pair}, -float(\"inf\")))"
        if k == "decay_dot":
            return (f"(tl.dot({x}.to(DOT_DTYPE), tl.trans({y}).to(DOT_DTYPE), input_precision=PRECISION)"
                    f" * {weight})")
        return (f"tl.dot(({x} * {weight}).to(DOT_DTYPE), tl.where(tv[:, None], {y}, 0.0).to(DOT_DTYPE), "
                "input_precision=PRECISION)")

    def _tensor_core(self, op: Op) -> bool:
        """Does this matmul print as tl.dot (not as an outer product or a broadcast sum, which compute in
        the operands' own dtype)?"""
        (m, kk), (_, n) = self.types[op.args[0]].shape, self.types[op.args[1]].shape
        return _ONE not in (m, kk, n)

    def dot_operands(self, ops) -> set[str]:
        """The values whose every reader takes them as a tl.dot operand, directly or through copies and
        transposes. A tile loaded for such readers alone needs no fp32 copy: tl.dot casts it to DOT_DTYPE
        (bf16 -> fp32 -> bf16 is exact, so the result is the same), and without the conversion between
        them Triton's pipeliner streams the load into shared memory as the tensor cores read it (the delta
        rule's walk: 162 -> 128 registers on sm_90, no register copy of w and k)."""
        readers: dict[str, list[Op]] = {}
        for op in ops:
            for a in set(op.args):
                if isinstance(a, str):
                    readers.setdefault(a, []).append(op)
        memo: dict[str, bool] = {}

        def only_dots(name: str) -> bool:
            if name not in memo:
                memo[name] = False  # a cycle cannot happen in SSA ops; this only guards the recursion
                memo[name] = bool(readers.get(name)) and all(
                    (op.kind == "matmul" and self._tensor_core(op)) or
                    (op.kind in ("copy", "transpose") and only_dots(op.out)) for op in readers[name])
            return memo[name]
        return {name for name in readers if only_dots(name)}

    def _matmul(self, op: Op, a: list[str]) -> str:
        (m, kk), (_, n) = self.types[op.args[0]].shape, self.types[op.args[1]].shape
        if kk == _ONE:  # an outer product
            return f"({a[0]} * {a[1]})"
        a = [self._operand(op.args[0], a[0], 1), self._operand(op.args[1], a[1], 0)]
        if reduces_tokens(op, self.types):  # contracting over tokens: padded tokens do not exist
            # (the left operand's padded values are finite, see _finite_on_padding, so 0 * them is 0)
            a = [a[0], f"tl.where(tv[:, None], {a[1]}, 0.0)"]
        if m == _ONE or n == _ONE:  # tl.dot needs 16 rows and columns: reduce a broadcast product instead
            return f"tl.sum({a[0]}[:, :, None] * {a[1]}[None, :, :], axis=1)"
        return f"tl.dot({a[0]}.to(DOT_DTYPE), {a[1]}.to(DOT_DTYPE), input_precision=PRECISION)"
