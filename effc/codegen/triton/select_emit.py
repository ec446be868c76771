"""The select stage's kernels (passes.select) as views of the softmax template: pool (per key block),
select (per query block: scores over every key block, the criterion, the lists) and select_t (per
key block: the transposed list). They run before the forward; the walks read their lists
(softmax_emit._listed)."""
from __future__ import annotations

from ...ir import ops as O
from ...passes.softmax import SoftmaxSchedule
from ...passes.softmax_plan import SoftmaxPlan
from . import softmax_emit
from .softmax_emit import KernelView, Leaf, SoftmaxPrinter, kernel_name

_NEG = '-float("inf")'


class SelectPrinter(SoftmaxPrinter):
    """Select-stage values: per-token leaves on the query side, pooled tiles (loaded as their values, v_*),
    and the block indices qblock [BM, 1], kblock [1, NBP]."""

    def ref(self, a) -> str:
        if a == "qblock":
            return "qblock_f"
        if a == "kblock":
            return "kblock_f"
        return super().ref(a)



def _pool_feats(sched: SoftmaxSchedule, leaf: str) -> tuple[str, ...]:
    return tuple(str(d) for d in sched.types[leaf].shape[1:])


def _pool(sched: SoftmaxSchedule, kp) -> KernelView:
    """Per key block: the mean (over the tokens that exist) or the max of each pooled leaf."""
    kv = KernelView(kp.name, kernel_name(sched.spec.name, kp.name), "k", walk=False)
    lines = ["n_tok = (tl.minimum(k0 + BN, T_seq) - k0).to(tl.float32)"]
    for p in sched.select.pools:
        feats = _pool_feats(sched, p.leaf)
        valid = "kv[:, None]" if feats else "kv"
        if p.kind == "mean":
            lines.append(f"pooled = tl.sum(tl.where({valid}, lk_{p.leaf}, 0.0), 0) / n_tok")
        else:
            lines.append(f"pooled = tl.max(tl.where({valid}, lk_{p.leaf}, {_NEG}), 0)")
        if feats:
            f = feats[0]
            lines.append(f"tl.store({p.out}_pool_ptr + (i_bh * NKB + pid) * {f} + r_{f}, pooled, mask=m_{f})")
        else:
            lines.append(f"tl.store({p.out}_pool_ptr + i_bh * NKB + pid, pooled)")
    kv.pre_lines = lines
    return kv


def _scores(sched: SoftmaxSchedule) -> list[str]:
    """One head's scores `g` [BM, NBP] and the predicates' values: the pooled tiles loaded, the ops."""
    sel = sched.select
    lines = []
    for p in sel.pools:
        feats = _pool_feats(sched, p.leaf)
        if feats:
            f = feats[0]
            lines.append(f"v_{p.out} = tl.load({p.out}_pool_ptr + (i_bh * NKB + r_B[:, None]) * {f} + "
                         f"r_{f}[None, :], mask=bv[:, None] & m_{f}[None, :], other=0.0)")
        else:
            lines.append(f"v_{p.out} = tl.load({p.out}_pool_ptr + i_bh * NKB + r_B, mask=bv, other=0.0)[None, :]")
    pr = SelectPrinter(sched, dict(sched.types))
    lines += pr.lines(tuple(op for op in sel.ops if op.kind not in O.POOLS))
    lines.append(f"g = v_{sel.selection.score} + tl.zeros([BM, NBP], tl.float32)")
    return lines


def _heads(head: str) -> list[str]:
    return [f"i_h = {head}", "i_bh = i_b * H + i_h", "i_hf = i_h.to(tl.float32)"]


def _indent(lines: list[str]) -> list[str]:
    return ["    " + x for x in lines]


def _shared(sched: SoftmaxSchedule, kp) -> list[str]:
    """A group-shared choice: the group's first head sums (or averages) the scores of the group's query
    heads, each with its own query rows and pooled tiles; the other heads' programs have nothing to do."""
    loads = [x for leaf in kp.query_loads for x in Leaf(leaf, _pool_feats(sched, leaf)).load("lq").split("\n")]
    how = " / GROUP" if sched.select.selection.shared == "mean" else ""
    return (["if i_h % GROUP != 0:  # the group's first head chooses for the group (shared)", "    return",
             "i_h0 = i_h", "g_group = tl.zeros([BM, NBP], tl.float32)",
             "for hh in tl.static_range(GROUP):  # the group's query heads, in order"]
            + _indent(_heads("i_h0 + hh") + loads + _scores(sched) + ["g_group += g"])
            + _heads("i_h0") + [f"g = g_group{how}"])


def _topk() -> list[str]:
    return ["r_J = tl.arange(0, KP)",
            "sel = tl.full([BM, KP], -1, tl.int32)",
            "row = tl.zeros([NBP], tl.int32)",
            "for j in tl.static_range(KTOP):  # arg-max, KTOP times; ties: the lower block index",
            "    m = tl.max(g, 1)",
            "    first = tl.min(tl.where(g == m[:, None], r_B[None, :], NBP), 1)",
            f"    first = tl.where(m > {_NEG}, first, -1)",
            "    sel = tl.where(r_J[None, :] == j, first[:, None], sel)",
            "    hit = r_B[None, :] == first[:, None]",
            "    row = tl.maximum(row, tl.max(tl.where(hit, 1, 0), 0))",
            f"    g = tl.where(hit, {_NEG}, g)"]


def _ordered(sel, value: str) -> list[str]:
    """topp, or a capped threshold: the order (forced, then the candidates' scores descending, ties to the
    lower block) as one int64 key per block, sorted once; the rule taken along the sorted keys (a prefix);
    the last key taken is each query's cut-off, and a block is chosen when its key reaches it."""
    lines = ["bits = g.to(tl.int32, bitcast=True)  # the score's bits, made monotone as integers",
             "key = (tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) << 32) + (NBP - 1 - r_B)[None, :]",
             "ks = tl.sort(key, 1, descending=True)",
             "hi = (ks >> 32).to(tl.int32)",
             "g_s = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)",
             'forced_s = g_s == float("inf")',
             f'cand_s = (g_s > {_NEG}) & (g_s < float("inf"))']
    if sel.criterion[0] == "topp":
        lines += ["# the candidates' masses: softmax of their scores (forced blocks take no share)",
                  f'own = (g > {_NEG}) & (g < float("inf"))',
                  f"g_max = tl.max(tl.where(own, g, {_NEG}), 1)",
                  f"g_max = tl.where(g_max > {_NEG}, g_max, 0.0)",
                  "z = tl.sum(tl.where(own, tl.exp(g - g_max[:, None]), 0.0), 1)",
                  "mass_s = tl.where(cand_s, tl.exp(g_s - g_max[:, None]), 0.0) / tl.where(z > 0, z, 1.0)[:, None]",
                  "before = tl.cumsum(mass_s, 1) - mass_s  # the mass ahead of each block: taken while it is < p",
                  f"take = forced_s | (cand_s & ((before < {value}) | ({value} >= 1.0)))"]
    else:
        lines.append(f"take = forced_s | (cand_s & (g_s >= {value}))")
    if sel.limit is not None:
        lines.append("take = take & (r_B[None, :] < KTOP)  # the cap: the first KTOP of the order")
    lines += ["cut = tl.min(tl.where(take, ks, tl.full([BM, NBP], 0x7FFFFFFFFFFFFFFF, tl.int64)), 1)",
              "chosen = key >= cut[:, None]"]
    return lines


def _listed_choice(sel, value: str) -> list[str]:
    """topp / threshold: the chosen blocks as a [BM, NBP] mask, then compacted into each query's list."""
    if sel.criterion[0] == "threshold" and sel.limit is None:
        lines = [f'chosen = (g == float("inf")) | ((g > {_NEG}) & (g >= {value}))']
    else:
        lines = _ordered(sel, value)
    return lines + ["ci = chosen.to(tl.int32)", "n_ch = tl.sum(ci, 1)",
                    "slot = tl.cumsum(ci, 1) - 1  # each query's list in increasing block order",
                    "r_J = tl.arange(0, KP)", "row = tl.max(ci, 0)"]


def _stores(sel) -> list[str]:
    per_token = "sel_ptr + ((bos + r_M[:, None]) * H + i_h) * KP"
    if sel.criterion[0] == "topk":
        lines = [f"tl.store({per_token} + r_J[None, :], sel, mask=qv[:, None])"]
    else:
        lines = [f"tl.store({per_token} + slot, r_B[None, :] + 0 * slot, mask=qv[:, None] & chosen)",
                 f"tl.store({per_token} + r_J[None, :], tl.full([BM, KP], -1, tl.int32), "
                 "mask=qv[:, None] & (r_J[None, :] >= n_ch[:, None]))"]
    return lines + ["tl.store(qmap_ptr + (i_bh * NQB + pid) * NKB + r_B, row.to(tl.int8), mask=bv)",
                    "pos = tl.cumsum(row, 0) - 1  # the union in increasing block order",
                    "tl.store(qlist_ptr + (i_bh * NQB + pid) * NKB + pos, r_B, mask=row > 0)",
                    "tl.store(qcnt_ptr + i_bh * NQB + pid, tl.sum(row, 0))"]


def _select(sched: SoftmaxSchedule, kp) -> KernelView:
    """Per query block (per group's first head, shared): the score of every key block, forced blocks at +inf
    and non-candidates at -inf, then the criterion: topk by KTOP rounds of arg-max (the lowest index among
    equal maxima), topp / threshold by a mask of the chosen blocks; stores the per-token choice, the union
    as an ordered list with its count, and the union's row of the block map (for each head of the group)."""
    sel = sched.select
    selection = sel.selection
    kv = KernelView(kp.name, kernel_name(sched.spec.name, kp.name), "q", walk=False)
    lines = ["n_kb = tl.cdiv(T_seq, BN)", "r_B = tl.arange(0, NBP)", "bv = r_B < n_kb",
             "qblock_f = (r_M // BN).to(tl.float32)[:, None]", "kblock_f = r_B.to(tl.float32)[None, :]"]
    lines += _shared(sched, kp) if selection.shared else _scores(sched)
    zero = "tl.zeros([BM, NBP], tl.float32)"
    cand = ["qv[:, None]", "bv[None, :]", "(g == g)"] + [f"((v_{m} + {zero}) != 0.0)" for m in selection.candidates]
    lines.append("cand = " + " & ".join(cand))
    if selection.forced:
        forced = " | ".join(f"((v_{f} + {zero}) != 0.0)" for f in selection.forced)
        lines.append(f"forced = qv[:, None] & bv[None, :] & ({forced})")
        lines.append(f"g = tl.where(forced, float(\"inf\"), tl.where(cand, g, {_NEG}))")
    else:
        lines.append(f"g = tl.where(cand, g, {_NEG})")
    value = SelectPrinter(sched, {}).ref(selection.criterion[1])
    lines += _topk() if sel.kind == "topk" else _listed_choice(selection, value)
    if selection.shared:  # every head of the group walks the group's choice
        lines += ["for hh in tl.static_range(GROUP):"] + _indent(_heads("i_h0 + hh") + _stores(selection))
    else:
        lines += _stores(selection)
    kv.pre_lines = lines
    return kv


def _select_t(sched: SoftmaxSchedule, kp) -> KernelView:
    """Per key block: the query blocks whose union holds it, in increasing order (no atomics: one program
    reads the block map's column)."""
    kv = KernelView(kp.name, kernel_name(sched.spec.name, kp.name), "k", walk=False)
    kv.pre_lines = ["r_Q = tl.arange(0, NQBP)",
                    "col = tl.load(qmap_ptr + (i_bh * NQB + r_Q) * NKB + pid, mask=r_Q < tl.cdiv(T_seq, BM), "
                    "other=0).to(tl.int32)",
                    "pos = tl.cumsum(col, 0) - 1",
                    "tl.store(klist_ptr + (i_bh * NKB + pid) * NQB + pos, r_Q, mask=col > 0)",
                    "tl.store(kcnt_ptr + i_bh * NKB + pid, tl.sum(col, 0))"]
    return kv


def emit_select_module(plan: SoftmaxPlan) -> str:
    """The softmax module of a spec with a select stage: its three select kernels, then the walks."""
    sched = plan.schedule
    views = {"pool": lambda kp: _pool(sched, kp), "select": lambda kp: _select(sched, kp),
             "select_t": lambda kp: _select_t(sched, kp)}
    return softmax_emit.emit_softmax_module(plan, views)

