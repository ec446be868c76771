"""Decoding kernels of the softmax family (flash-decoding): a few new queries per request against its KV cache.

`decode` (grid: splits x B*H/G, its rows the new tokens of G query heads sharing their key heads) walks one
split of the request's visible key blocks exactly as the forward walks a query block's (the same printed score, masks, modifiers and running (max, sum, acc)), reading the
new tokens' query-side tiles and the cache's key-side ones, and stores its unnormalised partials.
`decode_combine` (grid: B*H/G) merges the splits' partials by a log-sum-exp rescale, then runs the
forward's epilogue (normalise, the merge ops) and stores the outputs. Both come from the schedule's ops;
nothing here knows a mechanism."""
from __future__ import annotations

from ...passes.softmax import SoftmaxSchedule
from ...passes.softmax_plan import SoftmaxKernel, SoftmaxPlan, decode_combine_ops
from .. import template
from .signature import SOFTMAX_LAYOUT, signature
from .softmax_emit import (
    KernelView,
    Leaf,
    SoftmaxPrinter,
    Store,
    _bounds,
    _feats,
    kernel_name,
    normalise,
    walk_init,
    walk_step,
)


def _part(sched: SoftmaxSchedule, r: str) -> str:
    """Offsets of a reduction's partial accumulator, (B*H, NSPLIT, BM, D_P): the padded tile as it is."""
    feats = _feats(sched, r)
    assert len(feats) <= 1, feats
    return f"part[:, None] * {feats[0]}_P + r_{feats[0]}[None, :]" if feats else "part"


def _split(sched: SoftmaxSchedule, kp: SoftmaxKernel) -> KernelView:
    kv = KernelView(kp.name, kernel_name(sched.spec.name, kp.name), "q")
    pr = SoftmaxPrinter(sched, sched.types)
    kv.pre_lines = pr.lines(sched.c_ops) + pr.lines(sched.q_ops) + walk_init(sched)
    for masked in (True, False):
        kv.body[masked] = walk_step(sched, pr, masked)
    kv.bounds = _bounds(sched.sparsity.keys, "q")
    post = ["part = (i_bh * NSPLIT + i_s) * BM + r_M"]
    for gi, g in enumerate(sched.groups):
        post += [f"tl.store(m{gi}_part_ptr + part, m{gi})", f"tl.store(l{gi}_part_ptr + part, l{gi})"]
        post += [f"tl.store({r.out}_part_ptr + {_part(sched, r.out)}, acc_{r.out})" for r in g.reductions]
    kv.post_lines = post
    kv.k_loads = [Leaf(x, _feats(sched, x), stored=False).load("lk", True, f"{x}_cache_ptr", "kbos") for x in kp.key_loads]
    kv.k_loads_full = [Leaf(x, _feats(sched, x), stored=False).load("lk", False, f"{x}_cache_ptr", "kbos") for x in kp.key_loads]
    return kv


def _combine(sched: SoftmaxSchedule, kp: SoftmaxKernel) -> KernelView:
    kv = KernelView(kp.name, kernel_name(sched.spec.name, kp.name), "q", walk=False)
    pr = SoftmaxPrinter(sched, sched.types)
    merge = ["for i_s in tl.range(0, NSPLIT):  # the splits' partials, merged by a log-sum-exp rescale",
             "    part = (i_bh * NSPLIT + i_s) * BM + r_M"]
    for gi, g in enumerate(sched.groups):
        merge += [f"    m_s = tl.load(m{gi}_part_ptr + part)",
                  f"    m_new = tl.maximum(m{gi}, m_s)",
                  '    m_use = tl.where(m_new == -float("inf"), 0.0, m_new)',
                  f"    alpha = tl.exp2(m{gi} - m_use)",
                  "    beta = tl.exp2(m_s - m_use)",
                  f"    l{gi} = l{gi} * alpha + tl.load(l{gi}_part_ptr + part) * beta"]
        merge += [f"    acc_{r.out} = acc_{r.out} * alpha[:, None] + tl.load({r.out}_part_ptr + "
                  f"{_part(sched, r.out)}) * beta[:, None]" for r in g.reductions]
        merge.append(f"    m{gi} = m_new")
    post = normalise(sched) + pr.lines(decode_combine_ops(sched))
    post += [Store(f"{o.name}_ptr", f"v_{o.name}", o.feature_dims, cast=True, row_heads=True).line()
             for o in sched.spec.outputs]
    kv.pre_lines = walk_init(sched) + merge + post
    return kv


def emit_decode_kernels(plan: SoftmaxPlan) -> str:
    """The decode kernels of `plan` (none with a select stage) as module text, appended to the softmax module."""
    sched = plan.schedule
    views = []
    for kp in plan.kernels:
        if kp.role not in ("decode", "decode_combine"):
            continue
        k = (_split if kp.role == "decode" else _combine)(sched, kp)
        k.q_loads = [Leaf(x, _feats(sched, x), stored=False).load("lq", row_heads=True) for x in kp.query_loads]
        k.signature = signature(kp.args, SOFTMAX_LAYOUT)
        views.append(k)
    if not views:
        return ""
    return template(__file__, "softmax_decode.py.j2").render(
        kernels=views, leaf_dims=sorted({str(d) for x in sched.leaves for d in _feats(sched, x)}))
