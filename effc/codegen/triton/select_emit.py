"""The select stage's kernels (passes.select) as views of the softmax template: pool (per key block),
select (per query block: scores over every key block, k rounds of arg-max, the lists) and select_t (per
key block: the transposed list). They run before the forward; the walks read their lists
(softmax_emit._listed)."""
from __future__ import annotations

from ...ir import ops as O
from ...passes.softmax import SoftmaxSchedule
from ...passes.softmax_plan import SoftmaxPlan
from . import softmax_emit
from .softmax_emit import KernelView, SoftmaxPrinter, kernel_name

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


def _select(sched: SoftmaxSchedule, kp) -> KernelView:
    """Per query block: the score of every key block, forced blocks at +inf and non-candidates at -inf, then
    KTOP rounds of arg-max (the lowest index among equal maxima); stores the per-token choice, the union
    as an ordered list with its count, and the union's row of the block map."""
    sel = sched.select
    kv = KernelView(kp.name, kernel_name(sched.spec.name, kp.name), "q", walk=False)
    lines = ["n_kb = tl.cdiv(T_seq, BN)", "r_B = tl.arange(0, NBP)", "bv = r_B < n_kb",
             "qblock_f = (r_M // BN).to(tl.float32)[:, None]", "kblock_f = r_B.to(tl.float32)[None, :]"]
    for p in sel.pools:
        feats = _pool_feats(sched, p.leaf)
        if feats:
            f = feats[0]
            lines.append(f"v_{p.out} = tl.load({p.out}_pool_ptr + (i_bh * NKB + r_B[:, None]) * {f} + "
                         f"r_{f}[None, :], mask=bv[:, None] & m_{f}[None, :], other=0.0)")
        else:
            lines.append(f"v_{p.out} = tl.load({p.out}_pool_ptr + i_bh * NKB + r_B, mask=bv, other=0.0)[None, :]")
    types = dict(sched.types)
    pr = SelectPrinter(sched, types)
    lines += pr.lines(tuple(op for op in sel.ops if op.kind not in O.POOLS))
    zero = "tl.zeros([BM, NBP], tl.float32)"
    lines.append(f"g = v_{sel.selection.score} + {zero}")
    cand = ["qv[:, None]", "bv[None, :]", "(g == g)"] + [f"((v_{m} + {zero}) != 0.0)" for m in sel.selection.candidates]
    lines.append("cand = " + " & ".join(cand))
    if sel.selection.forced:
        forced = " | ".join(f"((v_{f} + {zero}) != 0.0)" for f in sel.selection.forced)
        lines.append(f"forced = qv[:, None] & bv[None, :] & ({forced})")
        lines.append(f"g = tl.where(forced, float(\"inf\"), tl.where(cand, g, {_NEG}))")
    else:
        lines.append(f"g = tl.where(cand, g, {_NEG})")
    lines += [
              "r_J = tl.arange(0, KP)",
              "sel = tl.full([BM, KP], -1, tl.int32)",
              "row = tl.zeros([NBP], tl.int32)",
              "for j in tl.static_range(KTOP):  # arg-max, KTOP times; ties: the lower block index",
              "    m = tl.max(g, 1)",
              "    first = tl.min(tl.where(g == m[:, None], r_B[None, :], NBP), 1)",
              f"    first = tl.where(m > {_NEG}, first, -1)",
              "    sel = tl.where(r_J[None, :] == j, first[:, None], sel)",
              "    hit = r_B[None, :] == first[:, None]",
              "    row = tl.maximum(row, tl.max(tl.where(hit, 1, 0), 0))",
              f"    g = tl.where(hit, {_NEG}, g)",
              "tl.store(sel_ptr + ((bos + r_M[:, None]) * H + i_h) * KP + r_J[None, :], sel, mask=qv[:, None])",
              "tl.store(qmap_ptr + (i_bh * NQB + pid) * NKB + r_B, row.to(tl.int8), mask=bv)",
              "pos = tl.cumsum(row, 0) - 1  # the union in increasing block order",
              "tl.store(qlist_ptr + (i_bh * NQB + pid) * NKB + pos, r_B, mask=row > 0)",
              "tl.store(qcnt_ptr + i_bh * NQB + pid, tl.sum(row, 0))"]
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

