"""The softmax family's schedule -> a Triton module: forward (FlashAttention-2: walk over the visible key
blocks with a running max and sum, exp2 with log2(e) folded into the score's scalar factor, the
epilogue fused) and backward (preprocess, dQ walk, dK/dV walk). The kernel bodies are printed one line
per IR op; the template holds only the loops, loads and stores, which are the same for every spec."""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from ...ir import ops as O
from ...ir.nodes import CK, C, Op
from ...passes.blocksparse import NEG, POS, Range, triton_expr
from ...passes.prefix_bwd import SEED, PrefixBackward
from ...passes.softmax import SoftmaxSchedule
from ...passes.softmax_bwd import SoftmaxBackward, acc_name, dd_name, dr_name, p_name
from ...passes.softmax_plan import SoftmaxKernel, SoftmaxPlan
from ...version import __version__
from .. import template
from .printer import _LEAVES_FINITE_RANGE, TritonPrinter, head_index, helper_source, pad_cond
from .signature import SOFTMAX_LAYOUT, signature

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_ONE = sympy.Integer(1)
# the suffix of a feature dim's stored row width ({d}_S): the leaves and scratch rows the runtime lays out
# (runtime.softmax_op.stored_width: padded to 16 bytes, where a row of {d} would leave loads unaligned)
STORED = "_S"


def kernel_name(spec_name: str, kernel: str) -> str:
    return f"{spec_name}_{kernel}_kernel"


def _dimname(d) -> str:
    if d == C:
        return "BM"
    if d == CK:
        return "BN"
    return str(d) if d.is_Integer else f"{d}_P"  # a feature dim: its padded tile size


class SoftmaxPrinter(TritonPrinter):
    """The Triton printer for score specs: leaves live on a query or key side, and `masked` (inside a
    partially masked block) makes every sum over a pair tile skip the pairs the masks drop (their values
    may be inf or nan). A per-token value is kept finite on padded tokens (`_finite_on_padding`), so that
    the zeros of a masked pair tile give zeros in a matmul over tokens. `full` holds the token axes (C, CK)
    known to hold real tokens only: the inner block of the walk's mask-free range. Ops it does not override
    print as in the chunked-scan kernels."""

    def __init__(self, sched: SoftmaxSchedule, types, masked: bool = False, full: frozenset = frozenset()):
        super().__init__(sched.spec, types)
        self.sched, self.masked, self.full = sched, masked, full
        self.leaves = set(sched.leaves)
        self.raw: dict[str, str] = {}  # values that are a loaded tile unchanged: print dots from the stored dtype
        self.keep_t = False

    NAMED = {"head": "i_hf", "inf": 'float("inf")', "qpos": "qpos_f", "kpos": "kpos_f"}

    def value_ref(self, a: str) -> str:
        return f"lq_{a}" if a in self.leaves else f"v_{a}"

    def _pair(self, a) -> str | None:
        if isinstance(a, float) or a not in self.types:
            return None
        s = self.types[a].shape
        return "keep" if s == (C, CK) else ("keep_t" if s == (CK, C) else None)

    def _safe(self, a, text: str) -> str:
        """Inside a masked block, a pair tile entering a sum: zero at the dropped pairs."""
        k = self._pair(a) if self.masked else None
        if k is None:
            return text
        self.keep_t |= k == "keep_t"
        return f"tl.where({k}, {text}, 0.0)"

    def expr(self, op: Op) -> str:
        k = op.kind
        n_args = 1 if k == "expand" else len(op.args)
        a = [self.ref(x) for x in op.args[:n_args]]
        if k == "query" or k == "key":
            side = "lq" if k == "query" else "lk"
            leaf = op.args[0]
            if self.types[leaf].rank == 1:
                return f"{side}_{leaf}" + ("[:, None]" if k == "query" else "[None, :]")
            self.raw[op.out] = f"{side}_{leaf}_raw"
            return f"{side}_{leaf}"
        if k == "transpose":
            if op.args[0] in self.raw:  # the transpose of a transposed loaded tile is the tile
                inner = self.raw[op.args[0]]
                self.raw[op.out] = inner[len("tl.trans("):-1] if inner.startswith("tl.trans(") else f"tl.trans({inner})"
            return f"tl.trans({a[0]})"
        if k in O.REDUCTIONS:
            axis, how = O.REDUCTIONS[k]
            x = self.padded_fill(op.args[0], a[0], "0.0" if how == "sum" else '-float("inf")', axes=(axis,))
            return f"tl.{how}({self._safe(op.args[0], x)}, axis={axis})"
        if k == "total":
            x = self._safe(op.args[0], self.padded_fill(op.args[0], a[0], "0.0"))
            rank = self.types[op.args[0]].rank
            return f"tl.sum(tl.sum({x}, axis=1), axis=0)" if rank == 2 else (f"tl.sum({x}, axis=0)" if rank else x)
        return super().expr(op)

    def _finite_on_padding(self, op: Op, text: str) -> str:
        """Padded tokens read 0, so an op that can leave the finite range (rsqrt(rowsum(k * k)), x / y,
        exp, log) may give inf or nan there, and its per-token result meets a masked pair tile's zeros in
        a matmul over tokens (softmax(s) @ xn, ds @ kn, ds.T @ qn), where 0 * inf = nan reaches the real
        tokens. Such an op gives 0 on padded tokens (one tl.where, on a [C] or [CK] vector for a
        normaliser), so no matmul operand needs a mask; pair tiles are masked by `keep` instead. Values on
        an axis in `full` (the inner block of a mask-free walk step) get none: every token there is real."""
        if op.kind not in _LEAVES_FINITE_RANGE:
            return text
        shape = self.types[op.out].shape
        axes = [i for i, d in enumerate(shape) if d == C or d == CK]
        if len(axes) != 1 or shape[axes[0]] in self.full:  # constants, pair tiles, a block of real tokens
            return text
        valid = "qv" if shape[axes[0]] == C else "kv"
        if len(shape) == 2:
            valid += "[:, None]" if axes[0] == 0 else "[None, :]"
        return f"tl.where({valid}, {text}, 0.0)"

    def _matmul(self, op: Op, a: list[str]) -> str:
        (m, kk), (_, n) = self.types[op.args[0]].shape, self.types[op.args[1]].shape
        x = [self._safe(op.args[i], self.raw.get(op.args[i], a[i])) for i in range(2)]
        if kk != _ONE:  # padded feature columns of a contracted dim: zero (loaded tiles already are)
            x = [x[i] if op.args[i] in self.raw else self._operand(op.args[i], x[i], 1 - i) for i in range(2)]
        if kk == _ONE:  # an outer product
            return f"({x[0]} * {x[1]})"
        if m == _ONE or n == _ONE:
            return f"tl.sum({x[0]}[:, :, None] * {x[1]}[None, :, :], axis=1)"
        return f"tl.dot({x[0]}.to(DOT_DTYPE), {x[1]}.to(DOT_DTYPE), input_precision=PRECISION)"

    def lines(self, ops) -> list[str]:
        return [f"v_{op.out} = {self.expr(op)}" for op in ops]


def _stored_mask(f: str, width: str) -> tuple[str, str]:
    """(mask, constexpr condition) of feature dim f's columns in a row `width` wide: the real ones (m_f) or,
    in a stored row (STORED), the stored ones (s_f: the runtime's zero padding loads as is, and an unmasked
    run of 16 bytes keeps the loads vectorised)."""
    return (f"s_{f}", f"({f}_P != {f}_S)") if width == STORED else (f"m_{f}", pad_cond(f))


def _rowmask(valid: str, feats: tuple[str, ...], width: str = "") -> str:
    """The mask of a per-token tile: its valid rows and, where its feature dim is padded, real (or stored)
    columns."""
    if not feats:
        return valid
    m, cond = _stored_mask(feats[0], width)
    return f"({valid}[:, None] & {m}[None, :] if {cond} else {valid}[:, None])"


def _offsets(d_name: str, feats: tuple[str, ...], heads: str, rows: str, base: str = "qbos", width: str = "",
             row_heads: bool = False) -> str:
    """Offsets of a per-token tile, rows being token indices within the sequence: the (sequence, head)
    base is a 64-bit scalar (hoisted out of the walk), the per-row part 32-bit. `base`: the sequence's
    first token (a KV cache's sequences start at their own base). `width`: STORED for a row {d}_S wide.
    `row_heads`: each row has a head of its own, h_M (decoding's rows are (new token, query head) pairs)."""
    assert len(feats) <= 1, feats
    if row_heads:
        per_row = f"({rows} * {heads} + {head_index(heads, 'h_M')})"
        if not feats:
            return f"({base} * {heads}) + {per_row}"
        f, w = feats[0], feats[0] + width
        return f"({base} * {heads} * {w}) + {per_row}[:, None] * {w} + r_{f}[None, :]"
    head = head_index(heads)
    if not feats:
        return f"({base} * {heads} + {head}) + {rows} * {heads}"
    f, w = feats[0], feats[0] + width
    return f"(({base} * {heads} + {head}) * {w}) + {rows}[:, None] * ({heads} * {w}) + r_{f}[None, :]"


@dataclass
class Leaf:
    name: str
    feats: tuple[str, ...]
    kbos: str = "bos"  # the first token of its sequence on the key side (bos_k: a key sequence of its own)
    stored: bool = True  # laid out by the runtime, {d}_S wide; False: the caller's tensor, {d} wide (a KV cache)

    def load(self, side: str, masked: bool = True, ptr: str | None = None, base: str | None = None,
             row_heads: bool = False, volatile: bool = False) -> str:
        """masked=False: a block wholly inside the sequence (the walk's mask-free blocks) loads unmasked.
        `ptr` and `base`: another buffer of the leaf (a KV cache) and its sequence's first token. Rows are
        `stored` wide ({d}_S columns, see runtime.softmax_op.stored_width) unless stored=False.
        `row_heads`: query rows are (token t_M, head h_M) pairs (decoding). `volatile`: a load Triton may not
        hoist out of the loop around it (a loop-invariant tile per head of a group would otherwise stay in
        shared memory for every head at once)."""
        rows, valid = ("t_M" if row_heads else "r_M", "qv") if side == "lq" else ("r_N", "kv")
        width = STORED if self.stored else ""
        offs = _offsets(self.name, self.feats, f"HX_{self.name}", rows,
                        base or ("qbos" if side == "lq" else self.kbos), width, row_heads)
        ptr = ptr or f"{self.name}_ptr"
        if masked:
            mask = f", mask={_rowmask(valid, self.feats, width)}, other=0.0"
        elif self.feats:  # rows wholly inside the sequence; padded feature columns still masked
            m, cond = _stored_mask(self.feats[0], width)
            mask = f", mask=({m}[None, :] if {cond} else None), other=(0.0 if {cond} else None)"
        else:
            mask = ""
        if volatile:
            mask += ", volatile=True"
        return (f"{side}_{self.name}_raw = tl.load({ptr} + {offs}{mask})\n"
                f"{side}_{self.name} = {side}_{self.name}_raw.to(tl.float32)")


@dataclass
class Store:
    ptr: str
    value: str
    feats: tuple[str, ...]
    side: str = "q"  # q: rows r_M; k: rows r_N
    cast: bool = False
    base: str = "qbos"  # the sequence's first token (bos_k: a key-side store over a key sequence of its own)
    width: str = ""  # STORED: a scratch buffer {d}_S wide (its real columns written, the rest left zero)
    row_heads: bool = False  # query rows are (token t_M, head h_M) pairs (decoding)
    heads: str = "H"  # the buffer's heads: (H // GQ) for dK/dV's per key head (KernelView.head_loop)

    def line(self) -> str:
        rows, valid = ("t_M" if self.row_heads else "r_M", "qv") if self.side == "q" else ("r_N", "kv")
        offs = _offsets("", self.feats, self.heads, rows, self.base, self.width, self.row_heads)
        mask = _rowmask(valid, self.feats)
        v = f"{self.value}.to({self.ptr}.dtype.element_ty)" if self.cast else self.value
        return f"tl.store({self.ptr} + {offs}, {v}, mask={mask})"


@dataclass
class KernelView:
    name: str
    fn: str
    outer: str  # "q" (program per query block) or "k"
    pre_lines: list[str] = field(default_factory=list)  # after the prologue, before the walk
    body: dict = field(default_factory=dict)  # masked (bool) -> lines of one walk step
    post_lines: list[str] = field(default_factory=list)
    walk: bool = True
    bounds: list[str] = field(default_factory=list)
    signature: str = ""  # from the plan's arguments (codegen.triton.signature)
    q_loads: list[str] = field(default_factory=list)  # the leaves' loads per query block, per key block
    k_loads: list[str] = field(default_factory=list)
    q_loads_full: list[str] = field(default_factory=list)  # the same for a block wholly inside the sequence
    k_loads_full: list[str] = field(default_factory=list)
    listed: bool = False  # walks the select stage's list of blocks (passes.select), not a range
    head_rows: bool = False  # rows are (query token t_M, query head h_M) pairs: G heads of a group a program
    gathered: bool = False  # head rows over a choice of key tokens: the key tiles gathered from each query's list
    head_loop: bool = False  # dK/dV: a program per key head walks its GQ query heads in turn (grouped heads)
    decodes: bool = False  # takes DECODE: launched over KV caches too (runtime.softmax_decode)
    list_lines: list[str] = field(default_factory=list)  # before that walk: n_sel and list_base
    entry_lines: list[str] = field(default_factory=list)  # outer k, before the key block's loads: the
    # program's key block and units (dK/dV over split lists), or an early return


def _feats(sched: SoftmaxSchedule, x: str) -> tuple[str, ...]:
    t = sched.types[x]
    return tuple(str(d) for d in t.shape[1:])


def _bounds(r: Range, outer: str, kseq: str = "T_seq", margin: float = 0.0) -> list[str]:
    """Block ranges of the walk from the masks' ranges. outer q: key blocks for the query block
    [i0, i1]; outer k: query blocks for the key block [j0, j1]. `margin` widens the visible range and
    narrows the mask-free one by that many tokens: bounds computed in fp32 through an inexact factor (a
    key sequence's positions a * s + c with a not a power of two) may land just past an integer."""
    names = {"i0": "o_lo", "i1": "o_hi", "j0": "o_lo", "j1": "o_hi", "head": "i_hf"}

    def names_for(x):
        out = dict(names)
        out.update({s.name: s.name for s in x.free_symbols if s.name.startswith("p_")})
        for s in x.free_symbols:
            if s.name not in out:
                out[s.name] = f"({s.name} * 1.0)"
        return out

    def e(x, widen: float = 0.0):
        text = triton_expr(x, names_for(x))
        return f"({text} + {widen!r})" if widen else text

    B = "BN" if outer == "q" else "BM"
    # keys: the whole sequence; queries: the rows computed, [q_first, q_end) (the prologue's)
    end, first = (kseq, "0") if outer == "q" else ("q_end", "q_first // BM")
    lines = [f"n_blk = tl.cdiv({end}, {B})", f"n_full = {end} // {B}"]
    lines.append(f"b_lo = {first}" if r.lo == NEG else
                 f"b_lo = tl.maximum(tl.floor({e(r.lo, -margin)} / {B}).to(tl.int32), {first})")
    lines.append("b_hi = n_blk" if r.hi == POS else
                 f"b_hi = tl.minimum(tl.floor({e(r.hi, margin)} / {B}).to(tl.int32) + 1, n_blk)")
    lines.append("b_hi = tl.maximum(b_hi, b_lo)")
    if not r.has_full:
        lines += ["f_lo = b_hi", "f_hi = b_hi"]
    else:
        lines.append("f_lo = b_lo" if r.flo == NEG else f"f_lo = tl.ceil({e(r.flo, margin)} / {B}).to(tl.int32)")
        lines.append("f_hi = n_full" if r.fhi == POS else f"f_hi = tl.floor(({e(r.fhi, -margin)} + 1.0) / {B}).to(tl.int32)")
        if outer == "k":  # a query block cut by q_first is partial
            lines.append("f_lo = tl.maximum(f_lo, tl.cdiv(q_first, BM))")
        lines += ["f_lo = tl.minimum(tl.maximum(f_lo, b_lo), b_hi)",
                  "f_hi = tl.minimum(tl.maximum(f_hi, f_lo), tl.minimum(b_hi, n_full))",
                  "f_hi = tl.maximum(f_hi, f_lo)"]
    return lines


def _kseq(sched: SoftmaxSchedule) -> str:
    """The key sequence's length in the kernels: the query's (T_seq) or a key sequence's own (S_seq)."""
    return "T_seq" if sched.spec.keyseq is None else "S_seq"


def _margin(sched: SoftmaxSchedule) -> float:
    """Half a token where a key sequence's position factor is not exact in fp32 (a power of two is)."""
    ks = sched.spec.keyseq
    if ks is None or ks.pos is None:
        return 0.0
    a = sympy.sympify(ks.pos[0])
    exact = a.is_Integer and int(a) > 0 and int(a) & (int(a) - 1) == 0
    return 0.0 if exact else 0.5


def _kbos(sched: SoftmaxSchedule) -> str:
    return "bos" if sched.spec.keyseq is None else "bos_k"


def _kpos(sched: SoftmaxSchedule) -> str:
    """kpos of the key block's keys r_N: their index, or a key sequence's declared positions a * r_N + c."""
    ks = sched.spec.keyseq
    if ks is None or ks.pos is None:
        return "r_N.to(tl.float32)[None, :]"
    a, c = ks.pos
    names = {x.name: x.name for e in ks.pos for x in e.free_symbols}
    return f"(r_N.to(tl.float32) * {triton_expr(sympy.sympify(a), names)} + {triton_expr(sympy.sympify(c), names)})[None, :]"


def _keep(sched: SoftmaxSchedule) -> str:
    parts = ["qv[:, None]", "kv[None, :]"] + [f"(v_{m} != 0.0)" for m in sched.masks]
    if sched.select is not None:  # the pairs of the blocks (or tokens) each query chose
        parts.append("chosen" if sched.select.per_token else "chosen[:, None]")
    return "keep = " + " & ".join(parts)


def list_row(head: str = "i_h", seq: str = "i_b") -> str:
    """The row of the select stage's per-sequence lists (qmap, qlist, qcnt, klist, kcnt, ktok) for query head
    `head`: one per head group (GROUP heads share a choice: passes.select's `shared`; GROUP = 1 without it), so a
    group's lists are stored once, not once per head."""
    return f"({seq} * (H // GROUP) + {head} // GROUP)"


def sel_row(token: str, head: str = "i_h") -> str:
    """The row of `sel` (each query token's chosen blocks, KP a row) for `token` and query head `head`."""
    return f"(({token}) * (H // GROUP) + {head} // GROUP)"


# the select stage's lists (passes.select): `sel` holds each query token's chosen blocks (-1 pads), KP a row
_SEL_LOAD = (f"sel_q = tl.load(sel_ptr + {sel_row('qbos + r_M[:, None]')} * KP + tl.arange(0, KP)[None, :], "
             "mask=qv[:, None], other=-1)")
# with head rows: each row's own head
_SEL_LOAD_ROWS = (f"sel_q = tl.load(sel_ptr + {sel_row('qbos + t_M', 'h_M')}[:, None] * KP + tl.arange(0, KP)[None, :], "
                  "mask=qv[:, None], other=-1)")


def token_bits(block: str) -> str:
    """The offset of the words holding key block `block`'s chosen tokens for the query rows r_M, in `tmask`
    [tokens, H / GROUP, NKB, NW] (a choice of key tokens, passes.select: one bit a key, NW 32-bit words a block,
    one row per key/value head group)."""
    return f"({sel_row('qbos + r_M')} * NKB + {block}) * NW"


def _token_chosen(block: str) -> list[str]:
    """Per step of a walk over a choice of key tokens: the chosen (query, key) pairs of the block, [BM, BN]."""
    return ["r_bit = tl.arange(0, BN)",
            f"words = tl.load(tmask_ptr + ({token_bits(block)})[:, None] + (r_bit // 32)[None, :], mask=qv[:, None], "
            "other=0)",
            "chosen = ((words >> (r_bit % 32)[None, :]) & 1) != 0"]


def _listed(sched: SoftmaxSchedule, kv: KernelView, outer: str) -> None:
    """A walk over the select stage's list: the query block's chosen blocks (outer q: forward, dQ) or the
    query blocks that chose the key block (outer k: dK/dV); each step keeps the pairs of the queries that
    chose the block (`chosen`), beside the masks."""
    if sched.select is None:
        return
    kv.listed = True
    tokens = sched.select.per_token  # a choice of key tokens: the block's bits, not each query's list
    block = "blk" if outer == "q" else "pid"
    own = _token_chosen(block) if tokens else [f"chosen = tl.sum(tl.where(sel_q == {block}, 1, 0), 1) > 0"]
    if kv.head_rows and tokens:  # one token a program, its chosen keys gathered: every pair is chosen
        kv.gathered = True
        own = ["chosen = qv[:, None] & kv[None, :]"]
    elif kv.head_rows and outer == "k":  # the group's first head's list of query blocks; rows all took the block
        kv.list_lines = [f"list_base = klist_ptr + ({list_row()} * NKB + pid) * NQB",
                         "r_T = tl.arange(0, NQBP)",
                         f"took_n = tl.load(qmap_ptr + ({list_row()} * NQB + r_T) * NKB + pid, mask=r_T < NQB, "
                         "other=0).to(tl.int32)  # each query block's tokens that took the key block",
                         "took_end = tl.cumsum(took_n, 0)",
                         "# the listed query blocks holding the units [u_lo, u_hi) (tokens, in list order)",
                         "e_lo = tl.sum(tl.where((took_n > 0) & (took_end <= u_lo), 1, 0), 0)",
                         "e_hi = tl.sum(tl.where((took_n > 0) & (took_end - took_n < u_hi), 1, 0), 0)"]
        _split(kv, ["units = " + _UNITS.format(units="ktok_ptr", row=list_row())])
        own = ["chosen = qv"]
    elif kv.head_rows:  # the loop reads each token's row of `sel` (softmax.py.j2); with one token a program
        # (a shared choice, G >= 16) its rows all chose the block
        kv.list_lines = [_SEL_LOAD_ROWS]
        own = [f"chosen = (tl.sum(tl.where(sel_q == {block}, 1, 0), 1) > 0) if BM // G > 1 else qv"]
    elif outer == "q":
        kv.list_lines = ([] if tokens else [_SEL_LOAD]) + [f"n_sel = tl.load(qcnt_ptr + {list_row()} * NQB + pid)",
                                                            f"list_base = qlist_ptr + ({list_row()} * NQB + pid) * NKB"]
    else:  # the program's units count every query head of its group (head_loop), each head's list in turn
        kv.list_lines = [f"n_g = tl.load(kcnt_ptr + {list_row()} * NKB + pid)  # this head's list",
                         "g_lo = tl.minimum(tl.maximum(u_lo - g_base, 0), n_g)",
                         "g_hi = tl.minimum(tl.maximum(u_hi - g_base, 0), n_g)",
                         "g_base += n_g",
                         f"list_base = klist_ptr + ({list_row()} * NKB + pid) * NQB"]
        _split(kv, ["units = tl.zeros([NBP], tl.int32)",
                    "for i_g in tl.range(0, GQ):",
                    "    units += " + _UNITS.format(units="kcnt_ptr", row=list_row("(i_h + i_g)"))])
        own = ([] if tokens else [_SEL_LOAD]) + own
    kv.body[True] = own + kv.body[True]


# a row of per-key-block unit counts
_UNITS = "tl.load({units} + {row} * NKB + r_U, mask=r_U < NKB, other=0)"


def _split(kv: KernelView, units: list[str]) -> None:
    """dK/dV over the transposed lists, a long list split over programs (passes.softmax_plan.KEY_SPLIT): the
    program's key block `pid`, its units [u_lo, u_hi) of the list (`units`: the lines loading each key block's
    count), `e` its segment (< 0: the whole list), and after the walk the segments' sums stored (PHASE 0) or
    added (PHASE 1) around the gradients' stores."""
    kv.entry_lines = [
        "r_U = tl.arange(0, NBP)", *units,
        "L = tl.maximum(SPLIT, tl.cdiv(2 * tl.sum(units, 0), EXTRA))  # at most EXTRA segments in all",
        "n_seg = tl.where(units > L, tl.cdiv(units, L), 0)  # a split list's segments (0: walked whole)",
        "seg_end = tl.cumsum(n_seg, 0)",
        "e = tl.program_id(0) - NKB",
        "ph = 0 * e + PHASE  # a tensor even where the launcher specialised the int",
        "pid = tl.where(e >= 0, tl.sum(tl.where(seg_end <= e, 1, 0), 0), tl.program_id(0))",
        "n_own = tl.sum(tl.where(r_U == pid, n_seg, 0), 0)",
        "seg0 = tl.sum(tl.where(r_U == pid, seg_end, 0), 0) - n_own  # its first segment",
        "u_all = tl.sum(tl.where(r_U == pid, units, 0), 0)",
        "u_lo = tl.where(e >= 0, (e - seg0) * L, 0)",
        "u_hi = tl.where(ph == 1, 0, tl.where(e >= 0, tl.minimum(u_lo + L, u_all), u_all))",
        "if (e >= tl.sum(n_seg, 0)) | ((e < 0) & (n_own > 0) & (ph == 0)) | ((ph == 1) & (n_own == 0)):",
        "    return"]


def _split_tail(kv: KernelView, kp, types) -> None:
    """After a split walk: PHASE 1 adds the key block's segments' sums in order; a segment stores its sums and
    stores no gradient."""
    before, adds, spills = [], [], []  # the sizes of the accumulators ahead in the slot
    for x, _ in kp.accumulators:
        dims = [_dimname(d) for d in types[x].shape]
        terms = [f"tl.arange(0, {d}){_expand(i, len(dims))}" + "".join(f" * {s}" for s in dims[i + 1:])
                 for i, d in enumerate(dims)]
        at = " + ".join(["part"] + before + terms)
        adds.append(f"    v_{acc_name(x)} += tl.load({at})")
        spills.append(f"    tl.store({at}, v_{acc_name(x)})")
        before.append(" * ".join(dims) or "1")
    slots = "tl.program_id(1).to(tl.int64) * EXTRA"
    kv.post_lines = (["for s in tl.range(0, tl.where(ph == 1, n_own, 0)):  # a split list's segments, in order",
                      f"    part = ksplit_ptr + ({slots} + seg0 + s) * SLOT"] + adds
                     + ["if e >= 0:  # a segment: its sums, added by PHASE 1",
                        f"    part = ksplit_ptr + ({slots} + e) * SLOT"] + spills
                     + ["else:"] + ["    " + line for line in kv.post_lines])


def _expand(i: int, n: int) -> str:
    """The index that puts an arange on axis i of n."""
    return "" if n == 1 else "[" + ", ".join(":" if j == i else "None" for j in range(n)) + "]"


def _score2(sched: SoftmaxSchedule, gi: int) -> str:
    """The score in log2 units."""
    g = sched.groups[gi]
    if g.fold is not None:
        base, c = g.fold
        factor = repr(c * LOG2E) if isinstance(c, float) else f"({SoftmaxPrinter(sched, {}).ref(c)} * {LOG2E})"
        return f"v_{base} * {factor}"
    return f"v_{g.score} * {LOG2E}"


def walk_step(sched: SoftmaxSchedule, pr: SoftmaxPrinter, masked: bool) -> list[str]:
    """One step of the online-softmax walk over a key block: the key-side and pair values, the masks (a
    partially masked block), and per softmax the running (max, sum, acc) updated by a log-sum-exp rescale
    (max in log2 units). `pr` printed the query-side values (its raw tiles feed the dots)."""
    types = sched.types
    p = SoftmaxPrinter(sched, types, masked, frozenset() if masked else frozenset({CK}))
    p.raw.update(pr.raw)
    body = p.lines(sched.k_ops) + p.lines(sched.p_ops)
    if masked:
        body.append(_keep(sched))
    for gi, g in enumerate(sched.groups):
        body.append(f"s2 = {_score2(sched, gi)}")
        if masked:
            body.append('s2 = tl.where(keep, s2, -float("inf"))')
        body += [f"m_new = tl.maximum(m{gi}, tl.max(s2, 1))",
                 'm_use = tl.where(m_new == -float("inf"), 0.0, m_new)',
                 f"alpha = tl.exp2(m{gi} - m_use)",
                 "p = tl.exp2(s2 - m_use[:, None])",
                 f"l{gi} = l{gi} * alpha + tl.sum(p, 1)"]
        for r in g.reductions:
            x = p.raw.get(r.x, f"v_{r.x}")
            body.append(f"acc_{r.out} = acc_{r.out} * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), "
                        f"{x}.to(DOT_DTYPE), input_precision=PRECISION)")
        body.append(f"m{gi} = m_new")
    return body


def walk_init(sched: SoftmaxSchedule) -> list[str]:
    """The running (max, sum, acc) of each softmax before the walk."""
    lines = []
    for gi, g in enumerate(sched.groups):
        lines += [f"m{gi} = tl.full([BM], -float(\"inf\"), tl.float32)", f"l{gi} = tl.zeros([BM], tl.float32)"]
        for r in g.reductions:
            shape = ", ".join(_dimname(d) for d in sched.types[r.out].shape)
            lines.append(f"acc_{r.out} = tl.zeros([{shape}], tl.float32)")
    return lines


def normalise(sched: SoftmaxSchedule) -> list[str]:
    """After the walk: each reduction normalised by its softmax's sum, each log-sum-exp (natural log; -inf
    for a query that keeps no key, whose reductions read 0)."""
    post = []
    for gi, g in enumerate(sched.groups):
        post.append(f"l_safe = tl.where(l{gi} == 0.0, 1.0, l{gi})")
        for r in g.reductions:
            post.append(f"v_{r.out} = acc_{r.out} / l_safe[:, None]")
        post.append(f'lse{gi} = tl.where(l{gi} == 0.0, -float("inf"), (m{gi} + tl.log2(l_safe)) * {LN2})')
        for x in g.lse:
            post.append(f"v_{x} = lse{gi}")
    return post


def _fwd(sched: SoftmaxSchedule, name: str = "fwd") -> KernelView:
    spec = sched.spec
    types = sched.types
    outputs = {o.name for o in spec.outputs}
    rows = name.endswith("_rows")
    kv = KernelView(name, kernel_name(spec.name, name), "q", head_rows=rows)
    pr = SoftmaxPrinter(sched, types)
    pre = pr.lines(sched.c_ops)
    q_lines = pr.lines(sched.q_ops)
    kv.pre_lines = pre + q_lines + walk_init(sched)
    for masked in (True, False):
        kv.body[masked] = walk_step(sched, pr, masked)
    post = normalise(sched) + pr.lines(sched.post_ops)
    for o in spec.outputs:
        post.append(Store(f"{o.name}_ptr", f"v_{o.name}", o.feature_dims, cast=True, row_heads=rows).line())
    post.append("if SAVE:")
    for gi, g in enumerate(sched.groups):
        post.append("    " + Store(f"lse{gi}_ptr", f"lse{gi}", (), row_heads=rows).line())
        for r in g.reductions:
            if r.out not in outputs:
                post.append("    " + Store(f"{r.out}_save_ptr", f"v_{r.out}", _feats(sched, r.out), cast=True,
                                          row_heads=rows).line())
    post.append("    pass")
    kv.post_lines = post
    kv.bounds = _bounds(sched.sparsity.keys, "q", _kseq(sched), _margin(sched))
    _listed(sched, kv, "q")
    return kv


class PrefixPrinter(SoftmaxPrinter):
    """The prefix stage's values per token: inputs are the loaded query-side tiles, `pos` the token's position
    in its sequence (a [BM] vector), every other value an op's."""

    NAMED = {**SoftmaxPrinter.NAMED, "pos": "pos_f"}

    def value_ref(self, a: str) -> str:
        return f"lq_{a}" if a in self.inputs else f"v_{a}"


def _prefix(sched: SoftmaxSchedule, kp) -> KernelView:
    """The prefix kernel (passes.softmax_plan.prefix_lowered): per block of one head's tokens, the prefix ops on
    the loaded inputs, then each value the walks read stored (cast to its buffer's dtype)."""
    kv = KernelView(kp.name, kernel_name(sched.spec.name, kp.name), "q", walk=False)
    pr = PrefixPrinter(sched, dict(sched.types))
    pr.inputs = set(kp.query_loads)
    kv.pre_lines = (["pos_f = r_M.to(tl.float32)"] + pr.lines(sched.spec.prefix.ops)
                    + [Store(f"{d.name}_ptr", f"v_{d.name}", _feats(sched, d.name), cast=True).line() for d in kp.stores])
    return kv


def _bwd_prefix(sched: SoftmaxSchedule, pb: PrefixBackward, kp) -> KernelView:
    """The prefix stage's backward (passes.prefix_bwd): per block of one head's tokens, the stored values'
    cotangents and the inputs loaded, the prefix ops the adjoints read recomputed, each input's gradient
    stored (per query head, cast to its buffer's dtype)."""
    kv = KernelView(kp.name, kernel_name(sched.spec.name, kp.name), "q", walk=False)
    pr = PrefixPrinter(sched, dict(pb.types))
    pr.inputs = set(kp.query_loads)
    seeds = [f"v_{SEED}{x} = tl.load({x}_grad_ptr + {_offsets('', _feats(sched, x), 'H', 'r_M')}, "
             f"mask={_rowmask('qv', _feats(sched, x))}, other=0.0).to(tl.float32)" for x in pb.seeds]
    kv.pre_lines = (["pos_f = r_M.to(tl.float32)"] + seeds + pr.lines(pb.recompute) + pr.lines(pb.vjp)
                    + [Store(f"{x}_grad_ptr", pr.value_ref(g), _feats(sched, x), cast=True).line()
                       for x, g in pb.grads])
    return kv


def _bwd_pre(sched: SoftmaxSchedule, bwd: SoftmaxBackward) -> KernelView:
    spec = sched.spec
    kp = bwd.pre
    outputs = {o.name for o in spec.outputs}
    kv = KernelView("bwd_pre", kernel_name(spec.name, "bwd_pre"), "q", walk=False)
    pr = SoftmaxPrinter(sched, kp.types)
    lines = []
    for o in spec.outputs:
        lines.append(f"v__seed_{o.name} = tl.load({o.name}_grad_ptr + {_offsets('', o.feature_dims, 'H', 'r_M')}, "
                     f"mask={_rowmask('qv', o.feature_dims)}, other=0.0).to(tl.float32)")
    for gi, g in enumerate(sched.groups):
        lines.append(f"lse{gi} = tl.load(lse{gi}_ptr + {_offsets('', (), 'H', 'r_M')}, mask=qv, other=0.0)")
        for x in g.lse:
            lines.append(f"v_{x} = lse{gi}")
        for r in g.reductions:
            ptr = f"{r.out}_ptr" if r.out in outputs else f"{r.out}_save_ptr"
            feats = _feats(sched, r.out)
            lines.append(f"v_{r.out} = tl.load({ptr} + {_offsets('', feats, 'H', 'r_M')}, "
                         f"mask={_rowmask('qv', feats)}, other=0.0).to(tl.float32)")
    lines += pr.lines(kp.outer_ops) + pr.lines(kp.post_vjp)
    for r, g in bwd.d_reduction:
        if r in bwd.seeded_reductions():  # the output's cotangent itself: the walks read it
            continue
        feats = _feats(sched, r)
        val = f"v_{g}" if g else "0.0"
        # a matmul operand of both walks: the input's precision, rows stored wide
        lines.append(Store(f"{r}_dr_ptr", val, feats, cast=True, width=STORED).line())
    for gi, d in enumerate(bwd.d_group):
        lines.append(Store(f"D{gi}_ptr", f"v_{d}", ()).line())
    for x, g in kp.leaf_grads:
        lines.append(Store(f"{x}_dpre_ptr", f"v_{g}", _feats(sched, x), cast=True).line())
    kv.pre_lines = lines
    return kv


def _bwd_walk(sched: SoftmaxSchedule, kp, outer: str, name: str | None = None) -> KernelView:
    spec = sched.spec
    types = kp.types
    name = name or kp.name
    rows = name.endswith("_rows")
    kv = KernelView(name, kernel_name(spec.name, name), outer, head_rows=rows)
    pr = SoftmaxPrinter(sched, types)
    pre = pr.lines(kp.outer_ops)
    at = dict(rows="t_M", row_heads=True) if rows else dict(rows="r_M")  # a query row's offsets
    gl = []  # per query block: lse, D and dR of the groups
    for gi, g in enumerate(sched.groups):
        gl.append(f"lse2_{gi} = tl.load(lse{gi}_ptr + {_offsets('', (), 'H', **at)}, mask=qv, other=0.0) * {LOG2E}")
        gl.append(f'lse2_{gi} = tl.where(lse2_{gi} == -float("inf"), float("inf"), lse2_{gi})')
        gl.append(f"v_{dd_name(gi)} = tl.load(D{gi}_ptr + {_offsets('', (), 'H', **at)}, mask=qv, other=0.0)")
        for r in g.reductions:
            feats = _feats(sched, r.out)
            gl.append(f"v_{dr_name(r.out)} = tl.load({r.out}_dr_ptr + {_offsets('', feats, 'H', base='qbos', width=STORED, **at)}, "
                      f"mask={_rowmask('qv', feats, STORED)}, other=0.0)")
    for x, _ in kp.accumulators:
        shape = ", ".join(_dimname(d) for d in types[x].shape)
        pre.append(f"v_{acc_name(x)} = tl.zeros([{shape}], tl.float32)" if shape else f"v_{acc_name(x)} = 0.0")
    if outer == "q":
        kv.pre_lines = pre + gl
    else:
        kv.pre_lines = pre
    inner = CK if outer == "q" else C
    for masked in (True, False):
        p = SoftmaxPrinter(sched, types, masked, frozenset() if masked else frozenset({inner}))
        p.raw.update(pr.raw)
        p.zero_columns.update(dr_name(r.out) for g in sched.groups for r in g.reductions)  # loaded, other=0
        body = (gl if outer == "k" else []) + p.lines(kp.loop_fwd)
        if masked:
            body.append(_keep(sched))
        for gi in range(len(sched.groups)):
            body.append(f"s2 = {_score2(sched, gi)}")
            body.append(f"v_{p_name(gi)} = tl.exp2(s2 - lse2_{gi}[:, None])")
            if masked:
                body.append(f"v_{p_name(gi)} = tl.where(keep, v_{p_name(gi)}, 0.0)")
        body += p.lines(kp.loop_vjp)
        for x, c in kp.accumulators:
            body.append(f"v_{acc_name(x)} = v_{acc_name(x)} + v_{c}")
        if p.keep_t:
            body.insert(body.index(_keep(sched)) + 1, "keep_t = tl.trans(tl.where(keep, 1.0, 0.0)) != 0.0")
        kv.body[masked] = body
    kv.head_loop = outer == "k" and not rows
    post = pr.lines(kp.post_vjp)
    for x, g in kp.leaf_grads:
        post.append(Store(f"{x}_d{outer}_ptr", f"v_{g}", _feats(sched, x), side=outer, cast=True,
                          base=_kbos(sched) if outer == "k" else "qbos", row_heads=rows and outer == "q",
                          heads=_grad_heads(kv, outer)).line())
    kv.post_lines = post
    kv.bounds = _bounds(sched.sparsity.keys if outer == "q" else sched.sparsity.queries, outer, _kseq(sched),
                        _margin(sched))
    _listed(sched, kv, outer)
    if kv.listed and outer == "k":  # dK/dV over the transposed lists: split (_split)
        _split_tail(kv, kp, types)
    return kv


def emit_softmax_module(plan: SoftmaxPlan, more_views: dict | None = None) -> str:
    """`more_views`: role -> (kernel plan -> KernelView) for the kernels of other roles (the select stage's:
    codegen.triton.select_emit)."""
    sched, bwd = plan.schedule, plan.backward
    spec = sched.spec
    views = {"walk": lambda kp: _fwd(sched, kp.name), "bwd_pre": lambda kp: _bwd_pre(sched, bwd),
             "prefix": lambda kp: _prefix(sched, kp),
             "bwd_prefix": lambda kp: _bwd_prefix(sched, plan.prefix_backward, kp),
             "bwd_walk": lambda kp: _bwd_walk(sched, bwd.dq if kp.outer == "q" else bwd.dkv, kp.outer, kp.name),
             **(more_views or {})}
    kernels = []
    for kp in plan.kernels:
        if kp.role in ("decode", "decode_combine"):  # codegen.triton.softmax_decode_emit appends them
            continue
        k = views[kp.role](kp)
        _place_loads(sched, k, kp, plan.key_leaves)
        kernels.append(k)
    ks = spec.keyseq
    return template(__file__, "softmax.py.j2").render(version=__version__, spec=spec, kernels=kernels, dims=spec.dims,
                              kseq=_kseq(sched), kpos=_kpos(sched), keyseq=ks is not None,
                              keyseq_pos="its index" if ks is None or ks.pos is None else
                              f"{ks.pos[0]} * {ks.dim.lower()} + {ks.pos[1]}",
                              leaf_dims=sorted({str(d) for x in sched.leaves for d in _feats(sched, x)}),
                              helpers=helper_source(spec.prefix.ops + spec.score.ops + spec.merge.ops),
                              sel_row=sel_row)


def _grad_heads(kv: KernelView, outer: str) -> str:
    """The heads of a gradient buffer a kernel stores into: the key heads' where one dK/dV program sums a
    group's query heads (GQ in turn, or G as head rows), else the query heads'."""
    if kv.head_loop:
        return "(H // GQ)"
    return "(H // G)" if kv.head_rows and outer == "k" else "H"


def _place_loads(sched: SoftmaxSchedule, k: KernelView, kp: SoftmaxKernel, key_leaves: tuple[str, ...]) -> None:
    """The plan's loads and signature on the view: each leaf the kernel reads, loaded per query block or per
    key block (masked, and unmasked for the walk's blocks that lie wholly inside the sequence). A leaf read on
    the key side (`key_leaves`) is a KV cache's when the kernel decodes: its query rows are the cache's too."""
    k.decodes = "DECODE" in kp.arg_names
    qbase = lambda x: "bos" if x in key_leaves else None
    rows = k.head_rows
    k.q_loads = [Leaf(x, _feats(sched, x)).load("lq", base=qbase(x), row_heads=rows) for x in kp.query_loads]
    k.k_loads = [Leaf(x, _feats(sched, x), _kbos(sched)).load("lk") for x in kp.key_loads]
    k.q_loads_full = [Leaf(x, _feats(sched, x)).load("lq", False, base=qbase(x), row_heads=rows)
                      for x in kp.query_loads]
    k.k_loads_full = [Leaf(x, _feats(sched, x), _kbos(sched)).load("lk", False) for x in kp.key_loads]
    k.signature = signature(kp.args, SOFTMAX_LAYOUT)
