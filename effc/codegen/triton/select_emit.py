"""The select stage's kernels (passes.select) as views of the softmax template: pool (per key block),
select (per query block: scores over chunks of key blocks, the criterion, the lists) and select_t (per
key block: the transposed list). They run before the forward; the walks read their lists
(softmax_emit._listed)."""
from __future__ import annotations

from ...ir import ops as O
from ...passes.blocksparse import NEG, POS, triton_expr
from ...passes.softmax import SoftmaxSchedule
from ...passes.softmax_plan import SoftmaxPlan
from . import softmax_emit
from .softmax_emit import (KernelView, Leaf, SoftmaxPrinter, _bounds, _feats, _kbos, kernel_name, list_row, sel_row,
                           token_bits)

_NEG = '-float("inf")'


def _at_least(value: str) -> str:
    """threshold's take on the masked scores: forced (+inf), or a candidate (> -inf) scoring >= x."""
    return f'(g == float("inf")) | ((g > {_NEG}) & (g >= {value}))'


class SelectPrinter(SoftmaxPrinter):
    """Select-stage values: per-token leaves on the query side, pooled tiles (loaded as their values, v_*),
    and the block indices qblock [BM, 1], kblock [1, CB] (a chunk of key blocks; NBP: every one)."""

    NAMED = {**SoftmaxPrinter.NAMED, "qblock": "qblock_f", "kblock": "kblock_f"}



def _pool_feats(sched: SoftmaxSchedule, leaf: str) -> tuple[str, ...]:
    return tuple(str(d) for d in sched.types[leaf].shape[1:])


def pool_row(leaf: str) -> str:
    """The row of a pooled tile: its leaf's head of query head i_h (a key head's pool serves its group)."""
    return f"(i_b * HX_{leaf} + i_h // (H // HX_{leaf}))"


def _pool(sched: SoftmaxSchedule, kp) -> KernelView:
    """Per key block and head of the pooled leaf: the mean (over the tokens that exist) or the max of each
    pooled leaf. The grid is per query head, as every select kernel's: a program pools the leaf's head for
    the first query head of its group (the others return before loading: pooling a decode step's cache
    once a key head, not once a query head)."""
    kv = KernelView(kp.name, kernel_name(sched.spec.name, kp.name), "k", walk=False)
    leaves = sorted({p.leaf for p in sched.select.pools})
    kv.entry_lines = ["if " + " & ".join(f"(i_h % (H // HX_{x}) != 0)" for x in leaves) + ":", "    return"]
    lines = ["n_tok = (tl.minimum(k0 + BN, T_seq) - k0).to(tl.float32)"]
    for p in sched.select.pools:
        feats = _pool_feats(sched, p.leaf)
        valid = "kv[:, None]" if feats else "kv"
        if p.kind == "mean":
            lines.append(f"pooled = tl.sum(tl.where({valid}, lk_{p.leaf}, 0.0), 0) / n_tok")
        else:
            lines.append(f"pooled = tl.max(tl.where({valid}, lk_{p.leaf}, {_NEG}), 0)")
        # the group's first query head writes it: a branch on the program's head, not a mask (Triton 3.9's
        # interpreter holds a vector mask `&` a scalar flag as int32, which its store refuses)
        lines.append(f"if i_h % (H // HX_{p.leaf}) == 0:")
        if feats:
            f = feats[0]
            lines.append(f"    tl.store({p.out}_pool_ptr + ({pool_row(p.leaf)} * NKB + pid) * {f} + r_{f}, pooled, "
                         f"mask=m_{f})")
        else:
            lines.append(f"    tl.store({p.out}_pool_ptr + {pool_row(p.leaf)} * NKB + pid, pooled)")
    kv.pre_lines = lines
    return kv


def _scores(sched: SoftmaxSchedule, width: str) -> list[str]:
    """One head's scores `g` [BM, width] over the key blocks r_B and the predicates' values: the pooled
    tiles loaded, the ops."""
    sel = sched.select
    lines = []
    for p in sel.pools:
        feats = _pool_feats(sched, p.leaf)
        if feats:
            f = feats[0]
            lines.append(f"v_{p.out} = tl.load({p.out}_pool_ptr + ({pool_row(p.leaf)} * NKB + r_B[:, None]) * {f} + "
                         f"r_{f}[None, :], mask=bv[:, None] & m_{f}[None, :], other=0.0)")
        else:
            lines.append(f"v_{p.out} = tl.load({p.out}_pool_ptr + {pool_row(p.leaf)} * NKB + r_B, mask=bv, "
                         "other=0.0)[None, :]")
    pr = SelectPrinter(sched, dict(sched.types))
    lines += pr.lines(tuple(op for op in sel.ops if op.kind not in O.POOLS))
    lines.append(f"g = v_{sel.selection.score} + tl.zeros([BM, {width}], tl.float32)")
    return lines


def _heads(head: str) -> list[str]:
    return [f"i_h = {head}", "i_bh = i_b * H + i_h", "i_hf = i_h.to(tl.float32)"]


def _indent(lines: list[str]) -> list[str]:
    return ["    " + x for x in lines]


_GROUP_LEADER = ("if i_h % GROUP != 0:  # the group's first head chooses for the group (shared)", "    return",
                 "i_h0 = i_h")


def _shared(sched: SoftmaxSchedule, kp, width: str) -> list[str]:
    """A group-shared choice (after _GROUP_LEADER): the group's first head sums (or averages) the scores of
    the group's query heads, each with its own query rows and pooled tiles; a score linear in the query side
    is scored once, from the summed tiles (_summed_queries)."""
    how = " / GROUP" if sched.select.selection.shared == "mean" else ""
    if sched.select.summed_query:
        return _scores(sched, width) + ([f"g = g{how}"] if how else [])
    # reloaded per chunk (volatile): hoisted, the group's query tiles would all sit in shared memory at once
    # (8 heads of [128, 128]: 270 KB, over the H100's 227 KB)
    loads = [x for leaf in kp.query_loads
             for x in Leaf(leaf, _pool_feats(sched, leaf)).load("lq", volatile=True).split("\n")]
    return ([f"g_group = tl.zeros([BM, {width}], tl.float32)",
             "for hh in tl.static_range(GROUP):  # the group's query heads, in order"]
            + _indent(_heads("i_h0 + hh") + loads + _scores(sched, width) + ["g_group += g"])
            + _heads("i_h0") + [f"g = g_group{how}"])


def _summed_queries(sched: SoftmaxSchedule, kp) -> list[str]:
    """A shared score linear in the query side (passes.select.linear_in_heads): the group's query tiles summed
    once, before the chunks, and bound to the names the score's ops read (fp32; a product casts them)."""
    lines = []
    for leaf in kp.query_loads:
        feats = _pool_feats(sched, leaf)
        lines.append(f"sum_{leaf} = tl.zeros([BM{''.join(f', {f}_P' for f in feats)}], tl.float32)")
    loads = [x for leaf in kp.query_loads for x in Leaf(leaf, _pool_feats(sched, leaf)).load("lq").split("\n")]
    lines += (["for hh in tl.static_range(GROUP):  # the group's query heads"]
              + _indent(_heads("i_h0 + hh") + loads + [f"sum_{leaf} += lq_{leaf}" for leaf in kp.query_loads])
              + _heads("i_h0"))
    for leaf in kp.query_loads:
        lines += [f"lq_{leaf}_raw = sum_{leaf}", f"lq_{leaf} = sum_{leaf}"]
    return lines


def _block_bounds(sched: SoftmaxSchedule) -> list[str]:
    """The key blocks [kb_lo, kb_hi) the query block may choose (passes.select: SelectSchedule.blocks, over
    its tokens' blocks [qb0, qb1]): the chunks score no others."""
    r = sched.select.blocks
    names = {"qb0": "qb0", "qb1": "qb1"}

    def e(x) -> str:
        return triton_expr(x, {**names, **{sym.name: sym.name for sym in x.free_symbols if sym.name.startswith("p_")}})
    lines = ["qb0 = tl.floor(o_lo / BN)", "qb1 = tl.floor(o_hi / BN)"]
    lines.append("kb_lo = 0" if r.lo == NEG else f"kb_lo = tl.maximum(tl.floor({e(r.lo)}).to(tl.int32), 0)")
    lines.append("kb_hi = n_kb" if r.hi == POS else f"kb_hi = tl.minimum(tl.floor({e(r.hi)}).to(tl.int32) + 1, n_kb)")
    return lines + ["kb_hi = tl.maximum(kb_hi, kb_lo)"]


def _masked_scores(sched: SoftmaxSchedule, kp, width: str) -> list[str]:
    """The scores over the key blocks r_B (valid: bv): forced blocks at +inf, non-candidates (masked out,
    nan, padding rows and blocks) at -inf."""
    selection = sched.select.selection
    lines = _shared(sched, kp, width) if selection.shared else _scores(sched, width)
    zero = f"tl.zeros([BM, {width}], tl.float32)"
    cand = ["qv[:, None]", "bv[None, :]", "(g == g)"] + [f"((v_{m} + {zero}) != 0.0)" for m in selection.candidates]
    lines.append("cand = " + " & ".join(cand))
    if selection.forced:
        forced = " | ".join(f"((v_{f} + {zero}) != 0.0)" for f in selection.forced)
        lines.append(f"forced = qv[:, None] & bv[None, :] & ({forced})")
        lines.append(f"g = tl.where(forced, float(\"inf\"), tl.where(cand, g, {_NEG}))")
    else:
        lines.append(f"g = tl.where(cand, g, {_NEG})")
    return lines


def _ordered(sel, value: str) -> list[str]:
    """An uncapped topp over every key block: the order (forced, then the candidates' scores descending,
    ties to the lower block) as one int64 key per block, sorted once; the rule taken along the sorted keys
    (a prefix); the last key taken is each query's cut-off, and a block is chosen when its key reaches it."""
    lines = ["bits = g.to(tl.int32, bitcast=True)  # the score's bits, made monotone as integers",
             "key = (tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) << 32) + (NBP - 1 - r_B)[None, :]",
             "ks = tl.sort(key, 1, descending=True)",
             "hi = (ks >> 32).to(tl.int32)",
             "g_s = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)",
             'forced_s = g_s == float("inf")',
             f'cand_s = (g_s > {_NEG}) & (g_s < float("inf"))']
    lines += _masses("g", value) + [
        f"take = forced_s | (cand_s & ((before < {value}) | ({value} >= 1.0)))",
        "cut = tl.min(tl.where(take, ks, tl.full([BM, NBP], 0x7FFFFFFFFFFFFFFF, tl.int64)), 1)",
        "chosen = key >= cut[:, None]"]
    return lines


def _masses(g: str, value: str) -> list[str]:
    """Along the sorted keys ks: each candidate's mass (softmax of the candidates' scores; forced blocks take
    no share) and the mass ahead of it, `before` (a block is taken while it is < p). Needs g_s, cand_s, and
    the normaliser: from `g` itself (one tile), or the running g_max and z when `g` is None."""
    lines = []
    if g is not None:
        lines += ["# the candidates' masses: softmax of their scores (forced blocks take no share)",
                  f'own = (g > {_NEG}) & (g < float("inf"))',
                  f"g_max = tl.max(tl.where(own, g, {_NEG}), 1)",
                  "z = tl.sum(tl.where(own, tl.exp(g - tl.where(g_max > " + _NEG + ", g_max, 0.0)[:, None]), 0.0), 1)"]
    lines += [f"g_max = tl.where(g_max > {_NEG}, g_max, 0.0)",
              "mass_s = tl.where(cand_s, tl.exp(g_s - g_max[:, None]), 0.0) / tl.where(z > 0, z, 1.0)[:, None]",
              "before = tl.cumsum(mass_s, 1) - mass_s  # the mass ahead of each block"]
    return lines


# where the select kernel writes a query's list and the query block's union: once per head group (a shared
# choice is the group's first head's: _GROUP_LEADER)
_PER_TOKEN = f"sel_ptr + {sel_row('qbos + r_M[:, None]')} * KP"
_UNION = f"({list_row()} * NQB + pid) * NKB"


def _stores() -> list[str]:
    return [f"tl.store({_PER_TOKEN} + slot, r_B[None, :] + 0 * slot, mask=qv[:, None] & chosen)",
            f"tl.store({_PER_TOKEN} + r_J[None, :], tl.full([BM, KP], -1, tl.int32), "
            "mask=qv[:, None] & (r_J[None, :] >= n_ch[:, None]))",
            f"tl.store(qmap_ptr + {_UNION} + r_B, tl.sum(ci, 0).to(tl.uint8), mask=bv)  # tokens taking it",
            "pos = tl.cumsum(row, 0) - 1  # the union in increasing block order",
            f"tl.store(qlist_ptr + {_UNION} + pos, r_B, mask=row > 0)",
            f"tl.store(qcnt_ptr + {list_row()} * NQB + pid, tl.sum(row, 0))"]


def _whole(sched: SoftmaxSchedule, kp, value: str) -> list[str]:
    """An uncapped topp: one tile [BM, NBP] over every key block, sorted (_ordered)."""
    selection = sched.select.selection
    lines = ["r_B = tl.arange(0, NBP)", "bv = r_B < n_kb", "kblock_f = r_B.to(tl.float32)[None, :]"]
    lines += list(_GROUP_LEADER) if selection.shared else []
    if sched.select.summed_query:
        lines += _summed_queries(sched, kp)
    lines += _masked_scores(sched, kp, "NBP")
    lines += _ordered(selection, value) + ["ci = chosen.to(tl.int32)", "n_ch = tl.sum(ci, 1)",
                                           "slot = tl.cumsum(ci, 1) - 1  # each query's list in increasing block order",
                                           "r_J = tl.arange(0, KP)", "row = tl.max(ci, 0)"]
    return lines + _stores()


# int64 keys: a block not choosable; the list's empty slots (distinct, above it, below every real key);
# the list's padding slots (KP > KTOP: never the weakest)
_KEY_NONE = "-0x7FFFFFFFFFFFFFFF"
_KEY_TOP = "0x7FFFFFFFFFFFFFFF"


def _chunk(sched: SoftmaxSchedule, kp) -> list[str]:
    """One chunk of key blocks [c0, c0 + CB): the masked scores and, unless an uncapped threshold, each
    block's key (the order as an int64: monotone score bits, then the reversed block index), keyed out
    (_KEY_NONE) where the block cannot be taken."""
    selection = sched.select.selection
    lines = ["r_B = c0 + tl.arange(0, CB)", "bv = r_B < kb_hi", "kblock_f = r_B.to(tl.float32)[None, :]"]
    lines += _masked_scores(sched, kp, "CB")
    kind, value = selection.criterion[0], SelectPrinter(sched, {}).ref(selection.criterion[1])
    if kind == "threshold" and selection.limit is None:
        return lines
    takeable = f"g > {_NEG}"
    if kind == "threshold":  # capped: the candidates under x are not taken; the cap keeps the first KTOP
        takeable = _at_least(value)
    return lines + [
        "bits = tl.where(g == 0.0, 0.0, g).to(tl.int32, bitcast=True)  # -0.0 keyed as +0.0: equal scores tie",
        "key = (tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) << 32) + (0x7FFFFFFF - r_B)[None, :]",
        f"key = tl.where({takeable}, key, {_KEY_NONE})"]


def _running_list(sched: SoftmaxSchedule, kp) -> list[str]:
    """Pass 1: per query the KTOP best keys so far, `top` [BM, KP] (topp: and its candidates' running
    max and sum of exp), over the chunks; then each query's cut-off key `cut`."""
    selection = sched.select.selection
    kind, value = selection.criterion[0], SelectPrinter(sched, {}).ref(selection.criterion[1])
    topp = kind == "topp"
    lines = [f"top = tl.where(r_J < KTOP, {_KEY_NONE} + 1 + r_J.to(tl.int64), {_KEY_TOP})[None, :] "
             "+ tl.zeros([BM, KP], tl.int64)"]
    if topp:
        lines += [f"g_max = tl.full([BM], {_NEG}, tl.float32)", "z = tl.zeros([BM], tl.float32)"]
    body = _chunk(sched, kp)
    if topp:  # the candidates' softmax normaliser, online (a rescale when the max grows)
        body += [f'own = (g > {_NEG}) & (g < float("inf"))',
                 f"m_new = tl.maximum(g_max, tl.max(tl.where(own, g, {_NEG}), 1))",
                 f"m_safe = tl.where(m_new > {_NEG}, m_new, 0.0)",
                 "z = z * tl.exp(g_max - m_safe) + tl.sum(tl.where(own, tl.exp(g - m_safe[:, None]), 0.0), 1)",
                 "g_max = m_new"]
    body += ["# merge: while the chunk's best key beats the list's weakest (some query), it takes that slot;",
             "# at most KTOP rounds a chunk, and fewer once the list holds better keys than the chunk",
             "m = tl.max(key, 1)",
             "low = tl.min(top, 1)",
             "while tl.max((m > low).to(tl.int32), 0) > 0:",
             "    top = tl.where((top == low[:, None]) & (m > low)[:, None], m[:, None], top)",
             f"    key = tl.where(key == m[:, None], {_KEY_NONE}, key)",
             "    m = tl.max(key, 1)",
             "    low = tl.min(top, 1)"]
    lines += ["for c0 in range(kb_lo, kb_hi, CB):  # pass 1: the running list"] + _indent(body)
    real = f"top > {_KEY_NONE} + KP"  # a slot holding a block (not empty, not padding: r_J < KTOP)
    if not topp:
        return lines + [f"cut = tl.min(tl.where(({real}) & (r_J[None, :] < KTOP), top, {_KEY_TOP}), 1)"]
    return lines + [
        f"ks = tl.sort(tl.where(r_J[None, :] < KTOP, top, {_KEY_NONE}), 1, descending=True)  # the order's head",
        f"real_s = ks > {_KEY_NONE} + KP",
        "hi = (ks >> 32).to(tl.int32)",
        "g_s = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)",
        'forced_s = real_s & (g_s == float("inf"))',
        'cand_s = real_s & (g_s < float("inf"))'] + _masses(None, value) + [
        f"take = forced_s | (cand_s & ((before < {value}) | ({value} >= 1.0)))",
        f"cut = tl.min(tl.where(take, ks, {_KEY_TOP}), 1)"]


def _write(sched: SoftmaxSchedule, kp) -> list[str]:
    """Pass 2: each chunk scored again; a block is chosen when its key reaches the query's cut-off (an
    uncapped threshold: by its score); stores each query's list (increasing block order, -1 pads), the
    query block's union (its block map row, the ordered list and its count), for each head of a group."""
    selection = sched.select.selection
    kind, value = selection.criterion[0], SelectPrinter(sched, {}).ref(selection.criterion[1])
    if kind == "threshold" and selection.limit is None:
        choose = f"chosen = {_at_least(value)}"
    else:
        choose = "chosen = key >= cut[:, None]"
    stores = [f"tl.store({_PER_TOKEN} + slot, r_B[None, :] + 0 * slot, mask=qv[:, None] & chosen)",
              f"tl.store(qmap_ptr + {_UNION} + r_B, tl.sum(ci, 0).to(tl.uint8), mask=bv)  # tokens taking it",
              f"tl.store(qlist_ptr + {_UNION} + pos, r_B, mask=row > 0)"]
    ends = [f"tl.store({_PER_TOKEN} + r_J[None, :], tl.full([BM, KP], -1, tl.int32), "
            "mask=qv[:, None] & (r_J[None, :] >= n_ch[:, None]))",
            f"tl.store(qcnt_ptr + {list_row()} * NQB + pid, n_union)"]
    body = _chunk(sched, kp) + [
        choose, "ci = chosen.to(tl.int32)",
        "slot = n_ch[:, None] + tl.cumsum(ci, 1) - 1  # each query's list in increasing block order",
        "row = tl.max(ci, 0)",
        "pos = n_union + tl.cumsum(row, 0) - 1  # the union in increasing block order"] + stores + [
        "n_ch += tl.sum(ci, 1)", "n_union += tl.sum(row, 0)"]
    return (["n_ch = tl.zeros([BM], tl.int32)",
             "n_union = tl.sum(tl.zeros([CB], tl.int32), 0)",
             "for c0 in range(kb_lo, kb_hi, CB):  # pass 2: the choice written"] + _indent(body) + ends)


def _streamed(sched: SoftmaxSchedule, kp) -> list[str]:
    """Every criterion but an uncapped topp: the key blocks CB at a time, never a tile over all of them."""
    selection = sched.select.selection
    lines = (list(_GROUP_LEADER) if selection.shared else []) + _block_bounds(sched) + ["r_J = tl.arange(0, KP)"]
    if sched.select.summed_query:
        lines += _summed_queries(sched, kp)
    if not (selection.criterion[0] == "threshold" and selection.limit is None):
        lines = lines + _running_list(sched, kp)
    return lines + _write(sched, kp)


# a choice of key tokens (passes.select, per_token): the cut-off is found digit by digit, 4 bits a round, over
# the score's 32 bits made monotone (u): _PIVOTS counts a round, over chunks of SB keys ([BM, SB, _PIVOTS]
# compares: one reduction a chunk, not one a pivot; SB: the block, runtime.select_op)
_PIVOTS = 16
_ROUNDS = 8


def _token_block(sched: SoftmaxSchedule, kp, start: str, width: str) -> list[str]:
    """The keys [start, start + width) of a choice of key tokens: their leaves loaded, the masked scores
    (forced at +inf, non-candidates at -inf), `u` the score's bits made monotone (-0.0 as +0.0) and `valid`
    the choosable ones."""
    loads = [x for leaf in kp.key_loads for x in Leaf(leaf, _feats(sched, leaf), _kbos(sched)).load("lk").split("\n")]
    selection = sched.select.selection
    valid = f"valid = g > {_NEG}"
    if selection.criterion[0] == "threshold" and selection.limit is not None:  # capped: the first KTOP of those >= x
        x = SelectPrinter(sched, {}).ref(selection.criterion[1])
        valid = f"valid = {_at_least(x)}"
    return ([f"r_N = {start} + tl.arange(0, {width})", "kv = r_N < T_seq", "bv = kv",
             "kpos_f = r_N.to(tl.float32)[None, :]"] + loads + _masked_scores(sched, kp, width)
            + [valid,
               "bits = tl.where(g == 0.0, 0.0, g).to(tl.int32, bitcast=True)",
               "u = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)"])


def _token_search(sched: SoftmaxSchedule, kp) -> list[str]:
    """Each query's cut-off `t`: the largest u with at least KTOP choosable keys at or above it (the lowest
    u when fewer exist), found 4 bits a round: per round, the keys at or above each of _PIVOTS evenly spaced
    pivots counted over the sequence; `n_gt` the keys above t, so the ties at t taken are the first
    KTOP - n_gt by position."""
    # PG pivots a reduction ([BM, SB, PG] compares; passes.softmax.pivot_group), placed into cnt's columns;
    # pivots past the int32 range clamp to its top, which no choosable key reaches (it is a nan's u)
    count = [f"for j0 in tl.static_range(0, {_PIVOTS}, PG):",
             "    pivot = tl.minimum(lo[:, None] + (j0 + 1 + r_G)[None, :].to(tl.int64) * step[:, None], "
             "0x7FFFFFFF).to(tl.int32)",
             "    n_j = tl.sum((valid[:, :, None] & (u[:, :, None] >= pivot[:, None, :])).to(tl.int32), 1)",
             "    cnt += tl.sum(tl.where((j0 + r_G)[None, :, None] == r_P[None, None, :], n_j[:, :, None], 0), 1)"]
    body = ["step = lo * 0 + (1 << (28 - 4 * digit))  # int64: the round's pivots span 2^(32 - 4 digit)",
            f"cnt = tl.zeros([BM, {_PIVOTS}], tl.int32)",
            "for c0 in range(b_lo * BN, b_hi * BN, SB):"] + _indent(_token_block(sched, kp, "c0", "SB") + count) + [
        f"n_up = tl.sum(((r_P[None, :] < {_PIVOTS - 1}) & (cnt >= KTOP)).to(tl.int32), 1)  # pivots still holding KTOP",
        "n_gt = tl.sum(tl.where(r_P[None, :] == n_up[:, None], cnt, 0), 1)  # the count at the next pivot",
        "lo = lo + n_up * step"]
    # a query block that scans no more than KTOP keys takes every choosable one: the search would keep the
    # lowest cut-off, so it is skipped
    return ([f"r_P = tl.arange(0, {_PIVOTS})", "r_G = tl.arange(0, PG)", "lo = tl.full([BM], -2147483648, tl.int64)",
             "n_gt = tl.zeros([BM], tl.int32)",
             "if (b_hi - b_lo) * BN > KTOP:",
             f"    for digit in tl.static_range({_ROUNDS}):  # the cut-off's bits, 4 a round"] + _indent(_indent(body))
            + ["t = lo.to(tl.int32)", "need = KTOP - n_gt  # the ties at t taken, by position"])


def _token_write(sched: SoftmaxSchedule, kp) -> list[str]:
    """Each key block once more: the chosen tokens (above the cut-off, or at it among the first `need` by
    position; an uncapped threshold: the forced and those scoring >= x) stored as bits per (query, key block),
    the block in the query block's union when some query chose a token of it."""
    selection = sched.select.selection
    kind, value = selection.criterion[0], SelectPrinter(sched, {}).ref(selection.criterion[1])
    if kind == "threshold" and selection.limit is None:
        choose = [f"chosen = {_at_least(value)}"]
    else:
        choose = ["tie = (valid & (u == t[:, None])).to(tl.int32)",
                  "chosen = valid & ((u > t[:, None]) | ((tie > 0) & (ties[:, None] + tl.cumsum(tie, 1) <= "
                  "need[:, None])))",
                  "ties += tl.sum(tie, 1)"]
    union = [f"tl.store(qmap_ptr + {_UNION} + kb, row.to(tl.uint8))",
             f"tl.store(qlist_ptr + {_UNION} + n_union, kb, mask=row > 0)"]
    count = [f"tl.store(qcnt_ptr + {list_row()} * NQB + pid, n_union)"]
    words = ["for w in tl.static_range(NW):",
             f"    tl.store(tmask_ptr + {token_bits('kb')} + w, tl.sum(tl.where((r_bit // 32)[None, :] == w, "
             "packed, 0), 1), mask=qv)"]
    # the head-rows walks gather each query's chosen keys: their positions in increasing order, KTOP a row
    indices = ["if INDICES:",
               "    slot = n_row[:, None] + tl.cumsum(ci, 1) - 1",
               "    tl.store(tidx_ptr + (t_row * KTOP)[:, None] + slot, r_N[None, :], mask=chosen & qv[:, None] & "
               "(slot < KTOP))",
               "    n_row += tl.sum(ci, 1)"]
    body = _token_block(sched, kp, "kb * BN", "BN") + choose + [
        "ci = chosen.to(tl.int32)",
        "packed = ci << (r_bit % 32)[None, :]  # one bit a key: the words' bits are disjoint, so a sum is an or"
    ] + words + indices + ["row = tl.max(tl.max(ci, 1), 0)"] + union + ["n_union += row"]
    return (["ties = tl.zeros([BM], tl.int32)", "r_bit = tl.arange(0, BN)",
             "n_union = tl.sum(tl.zeros([BN], tl.int32), 0)",
             "n_row = tl.zeros([BM], tl.int32)",
             f"t_row = {sel_row('qbos + r_M')}  # the query's row of the group's lists",
             "for kb in range(b_lo, b_hi):  # the choice written"] + _indent(body) + count
            + ["if INDICES:", "    tl.store(tcnt_ptr + t_row, tl.minimum(n_row, KTOP), mask=qv)"])


def _tokens(sched: SoftmaxSchedule, kp) -> list[str]:
    """A choice of key tokens (passes.select, per_token): the search for each query's cut-off (none for an
    uncapped threshold), then the bits and the union written."""
    selection = sched.select.selection
    # the key blocks holding a key the masks or force lines allow (passes.select: SelectSchedule.keys)
    lines = (list(_GROUP_LEADER) if selection.shared else []) + _bounds(sched.select.keys, "q")
    if not (selection.criterion[0] == "threshold" and selection.limit is None):
        lines += _token_search(sched, kp)
    return lines + _token_write(sched, kp)


def _select(sched: SoftmaxSchedule, kp) -> KernelView:
    """Per query block (per group's first head, shared): the score of each key block, forced blocks at +inf
    and non-candidates at -inf, then the criterion (passes.select: a running top-k over chunks of key
    blocks and a cut-off key, or an uncapped topp over one sorted tile); stores the per-token choice, the
    union as an ordered list with its count, and the union's row of the block map (once per head group)."""
    sel = sched.select
    kv = KernelView(kp.name, kernel_name(sched.spec.name, kp.name), "q", walk=False)
    lines = ["n_kb = tl.cdiv(T_seq, BN)", "qblock_f = (r_M // BN).to(tl.float32)[:, None]"]
    value = SelectPrinter(sched, {}).ref(sel.selection.criterion[1])
    if sel.per_token:
        kv.pre_lines = ["n_kb = tl.cdiv(T_seq, BN)"] + _tokens(sched, kp)
        return kv
    kv.pre_lines = lines + (_streamed(sched, kp) if sel.streamed else _whole(sched, kp, value))
    return kv


def _select_t(sched: SoftmaxSchedule, kp) -> KernelView:
    """Per key block: the query blocks whose union holds it, in increasing order, and how many of their tokens
    took it (no atomics: one program reads the block map's column, which counts the tokens of a choice of
    blocks, flags a choice of tokens)."""
    kv = KernelView(kp.name, kernel_name(sched.spec.name, kp.name), "k", walk=False)
    row = list_row()
    kv.pre_lines = list(_GROUP_LEADER[:2]) + [
        "r_Q = tl.arange(0, NQBP)",
        f"col = tl.load(qmap_ptr + ({row} * NQB + r_Q) * NKB + pid, mask=r_Q < tl.cdiv(T_seq, BM), other=0).to(tl.int32)",
        "pos = tl.cumsum((col > 0).to(tl.int32), 0) - 1",
        f"tl.store(klist_ptr + ({row} * NKB + pid) * NQB + pos, r_Q, mask=col > 0)",
        f"tl.store(kcnt_ptr + {row} * NKB + pid, tl.sum((col > 0).to(tl.int32), 0))",
        f"tl.store(ktok_ptr + {row} * NKB + pid, tl.sum(col, 0))  # the tokens taking it (a choice of blocks)"]
    return kv


def emit_select_module(plan: SoftmaxPlan) -> str:
    """The softmax module of a spec with a select stage: its three select kernels, then the walks."""
    sched = plan.schedule
    views = {"pool": lambda kp: _pool(sched, kp), "select": lambda kp: _select(sched, kp),
             "select_t": lambda kp: _select_t(sched, kp)}
    return softmax_emit.emit_softmax_module(plan, views)

