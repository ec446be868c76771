"""One TileLang printer method per IR tile op.

Elementwise ops print as an expression at one element of their output: `expr(op, idx, arg)` gets
the output's index (one string per axis, "0" on a broadcast axis of size 1) and `arg(name, idx)`,
which prints an argument at an index of *its* shape. Anchor ops (matmul, scans, reductions) print
statements through the `Body` they are given (see body.py): they stage operands into buffers and
call T.gemm / T.cumsum / T.reduce_*. Values are fp32; gemm operands are staged in the input dtype.
"""
from __future__ import annotations

import sympy

from ...ir import ops as O
from ...ir.nodes import Op, Spec
from .. import power
from .schedule import matmul_form

_UNARY = {
    "neg": "(-({0}))", "exp": "T.exp({0})", "exp2": "T.exp2({0})", "log": "T.log({0})", "log2": "T.log2({0})",
    "sqrt": "T.sqrt({0})", "rsqrt": "T.rsqrt({0})", "abs": "T.abs({0})", "relu": "T.max({0}, 0.0)",
    "sin": "T.sin({0})", "cos": "T.cos({0})",
    "sigmoid": "(1.0 / (1.0 + T.exp(-({0}))))",
    "silu": "(({0}) / (1.0 + T.exp(-({0}))))",
    "tanh": "(2.0 / (1.0 + T.exp(-2.0 * ({0}))) - 1.0)",
    # stable forms, as in the Triton backend: log(1 + e^x) = max(x, 0) + log(1 + e^-|x|)
    "softplus": "(T.max({0}, 0.0) + T.log(1.0 + T.exp(-T.abs({0}))))",
    "logsigmoid": "(T.min({0}, 0.0) - T.log(1.0 + T.exp(-T.abs({0}))))",
}
_BINARY = {"add": "({0} + {1})", "sub": "({0} - {1})", "mul": "({0} * {1})", "div": "({0} / {1})",
           "maximum": "T.max({0}, {1})", "minimum": "T.min({0}, {1})"}
INF = 'T.infinity("float32")'
# ops this backend refuses, and why (the error names the op and the backend)
UNSUPPORTED = {
    "unit_lower_inv": "the Triton backend inverts I + L by halves with fp32 products (three tf32 passes each); "
                      "T.gemm on fp32 tiles runs in tf32 in TileLang 0.1.x, which is too coarse for the inverse",
    "maxall": "a whole-tile max to a scalar (the mLSTM stabiliser) has no TileLang lowering here yet",
    "level": "Fenwick pair levels (log-linear attention) have no TileLang lowering here yet",
    "gather": "a per-token column gather (per-level weights) has no TileLang lowering here yet",
}
_ONE = sympy.Integer(1)


def token_ok(i: str) -> str:
    """Row i of the chunk is a real token (padded rows past T do not exist)."""
    return f"(i_c * C + {i} < T_seq)"


def broadcast_index(out_shape, arg_shape, idx) -> tuple[str, ...]:
    """NumPy broadcasting, aligned from the right: an axis of size 1 in the argument reads element 0."""
    lead = len(out_shape) - len(arg_shape)
    return tuple("0" if d == _ONE else idx[lead + i] for i, d in enumerate(arg_shape))


class TileLangPrinter:
    def __init__(self, spec: Spec, types):
        self.spec, self.types = spec, types
        self.params = {p.name for p in spec.params}
        self.dims = set(spec.dims) | {"H"}

    # -- leaves -----------------------------------------------------------------------------------
    def const(self, a: float) -> str:
        if a == float("inf"):
            return INF
        if a == float("-inf"):
            return f"(-{INF})"
        return repr(float(a))

    def leaf(self, a, idx) -> str | None:
        """A name that is no buffer and no op: a param, a dim, idx, head, inf; None otherwise."""
        if isinstance(a, float):
            return self.const(a)
        if a in self.params:
            return f"p_{a}"
        if a in self.dims:
            return f"T.float32({a})"
        if a == "idx":
            return f'T.Cast("float32", {idx[0]})'
        if a == "pos":
            return f'T.Cast("float32", i_c * C + {idx[0]})'
        if a == "head":
            return 'T.Cast("float32", i_h)'
        if a == "inf":
            return INF
        return None

    # -- elementwise ops: an expression at one element ---------------------------------------------
    def refuse(self, op: Op, how: str = "") -> NotImplementedError:
        why = UNSUPPORTED.get(op.kind)
        return NotImplementedError(f"the TileLang backend cannot emit tile op '{op.kind}'{how}"
                                   + (f": {why}" if why else "") + "; the Triton backend can")

    def expr(self, op: Op, idx, arg) -> str:
        method = getattr(self, f"op_{op.kind}", None)
        if op.kind in _UNARY:
            method = self.op_unary
        elif op.kind in _BINARY:
            method = self.op_binary
        if method is None:
            raise self.refuse(op, " as an expression")
        return method(op, idx, arg)

    def _arg(self, op: Op, i: int, idx, arg) -> str:
        a = op.args[i]
        if isinstance(a, float):
            return self.const(a)
        return arg(a, broadcast_index(op.type.shape, self.types[a].shape, idx))

    def op_unary(self, op, idx, arg):
        return _UNARY[op.kind].format(self._arg(op, 0, idx, arg))

    def op_binary(self, op, idx, arg):
        return _BINARY[op.kind].format(self._arg(op, 0, idx, arg), self._arg(op, 1, idx, arg))

    def op_copy(self, op, idx, arg):
        return self._arg(op, 0, idx, arg)

    def op_pow(self, op, idx, arg):
        return power(self._arg(op, 0, idx, arg), op.args[1], "T", self._arg(op, 1, idx, arg))

    def op_transpose(self, op, idx, arg):
        return arg(op.args[0], tuple(reversed(idx)))

    def op_expand(self, op, idx, arg):
        return arg(op.args[0], tuple(i for i, p in zip(idx, op.args[1:]) if p != 1.0))

    def _mask(self, op, idx, arg, cmp):
        fill = self._arg(op, 1, idx, arg) if len(op.args) > 1 else "0.0"
        return f"T.if_then_else({idx[0]} {cmp} {idx[1]}, {self._arg(op, 0, idx, arg)}, {fill})"

    def op_causal(self, op, idx, arg):
        return self._mask(op, idx, arg, ">=")

    def op_strict(self, op, idx, arg):
        return self._mask(op, idx, arg, ">")

    def op_anticausal(self, op, idx, arg):
        return self._mask(op, idx, arg, "<=")

    def op_antistrict(self, op, idx, arg):
        return self._mask(op, idx, arg, "<")

    def op_last(self, op, idx, arg):
        return arg(op.args[0], ("n_valid - 1",) + tuple(idx))

    # rotations read each element's partner column (a fragment is read through its shared mirror, as for
    # transpose). `d` is the real size, so a real column's partner is real; a padded column (past d in a
    # masked dim's tile) reads some real column and stays padding: nothing mixes it into a real one
    def op_rotate_half(self, op, idx, arg):
        d, j = str(self.types[op.args[0]].shape[-1]), idx[-1]
        partner = arg(op.args[0], tuple(idx[:-1]) + (f"({j} + {d} // 2) % {d}",))
        return f"(T.if_then_else({j} < {d} // 2, -1.0, 1.0) * {partner})"

    def op_rotate_pairs(self, op, idx, arg):
        j = idx[-1]
        partner = arg(op.args[0], tuple(idx[:-1]) + (f"({j} + 1 - 2 * ({j} % 2))",))
        return f"(T.if_then_else({j} % 2 == 0, -1.0, 1.0) * {partner})"

    def op_fidx(self, op, idx, arg):
        return f'T.Cast("float32", {idx[0]})'

    def op_matmul(self, op, idx, arg):
        if matmul_form(op, self.types) != "outer":
            raise NotImplementedError("the TileLang backend emits matmul through T.gemm, not as an expression")
        return f"({arg(op.args[0], (idx[0], '0'))} * {arg(op.args[1], ('0', idx[1]))})"

    # -- anchors: statements ------------------------------------------------------------------------
    def emit(self, op: Op, body) -> None:
        if op.kind == "matmul":
            return self.emit_matmul(op, body)
        if op.kind == "decay_dot":
            return self.emit_decay_dot(op, body)
        if op.kind in O.SCANS:
            return self.emit_scan(op, body)
        if op.kind in O.REDUCTIONS:
            return self.emit_reduction(op, body)
        raise self.refuse(op)

    def emit_matmul(self, op: Op, body, into=None, clear: bool = True) -> None:
        """`into`: for an add fused with this matmul, a function that fills the accumulator with the
        addend and names it; it runs after the operands are staged, since they may read the buffer."""
        if matmul_form(op, self.types) == "matvec":
            return self._emit_matvec(op, body)
        a, ta = body.gemm_operand(op.args[0], 1)
        b, tb = body.gemm_operand(op.args[1], 0)
        out = into() if into is not None else body.fragment(op.out, self.types[op.out].shape)
        body.stmt(f"T.gemm({a}, {b}, {out}, transpose_A={ta}, transpose_B={tb}, clear_accum={clear})")
        body.gemm_shapes.append(body.extents(self.types[op.out].shape))
        body.wrote(out)

    def _emit_matvec(self, op: Op, body) -> None:
        # T.gemm needs 16+ rows and columns: sum a broadcast product over k, as Triton's backend does
        (m, kk), (_, n) = self.types[op.args[0]].shape, self.types[op.args[1]].shape
        a, b = op.args
        if n == _ONE:  # [m, k] @ [k, 1]: terms [m, k], summed over axis 1
            shape, dim = (m, kk), 1

            def term(i):
                return f"({body.read(a, i)} * {body.read(b, (i[1], '0'))})"
        else:  # [1, k] @ [k, n]: terms [k, n], summed over axis 0
            shape, dim = (kk, n), 0

            def term(i):
                return f"({body.read(a, ('0', i[0]))} * {body.read(b, i)})"
        # the summed axis drops padded tokens and masked feature columns
        terms = body.fill_fragment(f"{op.out}_terms", shape, term, mask_axes=(dim,))
        # T.reduce keeps no unit axis in a fragment: sum into a vector, then widen it into the [m, 1] / [1, n] tile
        sums = body.alloc(f"f_{op.out}_sum", (body.extents(shape)[1 - dim],), "fragment", '"float32"')
        body.stmt(f"T.reduce_sum({terms}, {sums.name}, dim={dim}, clear=True)")
        body.wrote(sums.name)
        body.shared(op.out, self.types[op.out].shape)
        body.fill(body.where[op.out], lambda iv: body.load(sums, (iv[1 - dim],)))

    def emit_decay_dot(self, op: Op, body) -> None:
        """P = decay_dot(x, y, eq, ek, diag) (ir.ops.DECAY), finite wherever P is: no exp(eq) or exp(ek) is
        formed alone where it could leave the gemm dtype's range.

        One exponent per token ([C, 1]): x @ y.T on the tensor cores, times the pair weight exp(eq_i + ek_j).
        Per channel ([C, K]): per column k, the range [lo, hi] of eq and -ek over the real rows. A column whose
        span fits the gemm dtype (`decay_span`) goes through T.gemm in the factored form centred on the range,
        x e^(eq - c) and y e^(ek + c) with both factors within e^(span / 2); each other column adds its terms
        pair by pair, x_ik y_jk exp(eq_ik + ek_jk), on the CUDA cores (C*C exps per column: slow, but only
        the columns of strong gates pay it, and only in the chunks where they are strong)."""
        # the range is measured per column here (a column past the span goes pair by pair), so the IR's
        # centre (op.args[5]) is not read
        x, y, eq, ek, diag = op.args[:5]
        keep = ">=" if diag == 1.0 else ">"
        out = body.fragment(op.out, self.types[op.out].shape)
        f = body.where[op.out]
        per_token = self.types[eq].shape[1] == _ONE

        def at(a, i, k):  # an operand at row i, channel k
            return body.read(a, (i, "0" if self.types[a].shape[1] == _ONE else k))

        if per_token:
            a, ta = body.gemm_operand(x, 1)
            b, tb = body.gemm_operand(y, 1)
            body.stmt(f"T.gemm({a}, {b}, {out}, transpose_A={ta}, transpose_B={not tb}, clear_accum=True)")
            body.gemm_shapes.append(("C", "C"))
            body.wrote(out)
            body.fill(f, lambda iv: f"T.if_then_else({iv[0]} {keep} {iv[1]}, {body.load(f, iv)} * "
                                    f"T.exp(T.min({at(eq, iv[0], '0')} + {at(ek, iv[1], '0')}, 0.0)), 0.0)")
            return
        kk = body.extents(self.types[eq].shape)[1]
        body.consts["decay_span"] = '14.0 if dtype == "float16" else 80.0'  # e^7 / e^40 factors and their products
        hi = body.alloc(f"dd_{op.out}_hi", (kk,), "shared", '"float32"')
        lo = body.alloc(f"dd_{op.out}_lo", (kk,), "shared", '"float32"')

        def ranges(iv):
            k = iv[0]
            both = (at(eq, "i_row", k), f"(-{at(ek, 'i_row', k)})")
            return [f"{hi.name}[{k}] = (-{INF})", f"{lo.name}[{k}] = {INF}",
                    "for i_row in T.serial(C):",
                    f"    if {token_ok('i_row')}:",
                    f"        {hi.name}[{k}] = T.max({hi.name}[{k}], T.max({both[0]}, {both[1]}))",
                    f"        {lo.name}[{k}] = T.min({lo.name}[{k}], T.min({both[0]}, {both[1]}))"]

        body.nest([], (kk,), ranges)

        def fits(k):
            return f"({hi.name}[{k}] - {lo.name}[{k}] <= decay_span)"

        def centre(k):
            return f"(0.5 * ({hi.name}[{k}] + {lo.name}[{k}]))"

        staged = []
        for v, e, sign in ((x, eq, "-"), (y, ek, "+")):
            buf = body.alloc(f"g_dd_{v}", body.extents(self.types[v].shape), "shared", "dtype")
            body.fill(buf, lambda iv, v=v, e=e, sign=sign: (
                f"T.if_then_else({fits(iv[1])}, {at(v, *iv)} * T.exp({at(e, *iv)} {sign} {centre(iv[1])}), 0.0)"),
                mask_axes=(0, 1))
            staged.append(buf.name)
        body.stmt(f"T.gemm({staged[0]}, {staged[1]}, {out}, transpose_A=False, transpose_B=True, clear_accum=True)")
        body.gemm_shapes.append(("C", "C"))
        body.wrote(out)
        real = str(self.types[eq].shape[1])  # the real channels only (kk is padded where the dim is masked)
        body.nest([f"for i_ch in T.serial({real}):  # the columns too wide for the gemm, pair by pair",
                   f"if not {fits('i_ch')}:"], ("C", "C"),
                  lambda iv: [f"{out}[{iv[0]}, {iv[1]}] = {out}[{iv[0]}, {iv[1]}] + {at(x, iv[0], 'i_ch')} * "
                              f"{at(y, iv[1], 'i_ch')} * T.exp(T.min({at(eq, iv[0], 'i_ch')} + {at(ek, iv[1], 'i_ch')}, 0.0))"])
        body.fill(f, lambda iv: f"T.if_then_else({iv[0]} {keep} {iv[1]}, {body.load(f, iv)}, 0.0)")

    def emit_scan(self, op: Op, body) -> None:
        # padded rows come after every real one, so only the reverse scan must drop them
        reverse = op.kind == "revcumsum"
        src = body.stage_shared(op.args[0], mask_axes=(0,) if reverse else ())
        out = body.shared(op.out, self.types[op.out].shape)
        body.stmt(f"T.cumsum({src}, {out}, dim=0, reverse={reverse})")
        # TileLang 0.1.15's scan templates take threadIdx.x as the lane; warp specialization moves the
        # compute threads to 128..255, where they skip the scan (the output stays garbage)
        body.pass_configs["tl.disable_warp_specialized"] = True
        body.wrote(out)

    def emit_reduction(self, op: Op, body) -> None:
        axis, how = O.REDUCTIONS[op.kind]
        fill = "0.0" if how == "sum" else f"(-{INF})"
        # padded token rows and masked feature columns do not exist: 0 or -inf there
        src = body.stage_fragment(op.args[0], mask_axes=(axis,), fill=fill)
        out = body.fragment(op.out, self.types[op.out].shape)
        body.stmt(f"T.reduce_{how}({src}, {out}, dim={axis}, clear=True)")
        body.wrote(out)
