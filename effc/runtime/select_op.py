"""The select stage at call time (passes.select): the pool, select and (for the backward) transpose kernels,
and the buffers they fill, which the walks read by name. The backward runs them again rather than saving
them: the choice is deterministic, and recomputing it (O(T * key blocks * D)) is cheap beside the walks."""
from __future__ import annotations

import math

import torch


def _pow2(n: int, least: int) -> int:
    return max(least, 1 << max(0, n - 1).bit_length())


def selection_buffers(op, cfg, named: dict, meta: dict, n_seq: int, longest: int, H: int, leaves,
                      transpose: bool) -> dict:
    """Launch the select stage's kernels for one call; returns the buffers and sizes the walks take
    (sel, qlist, qcnt and, with `transpose`, klist, kcnt; NQB, NKB, KP)."""
    sel = op.sched.select
    first = leaves[0]
    device = first.device
    bm, sb = cfg.fwd[0], sel.block
    n_qb, n_kb, n_bh = math.ceil(longest / bm), math.ceil(longest / sb), n_seq * H
    i32 = dict(dtype=torch.int32, device=device)
    sizes = dict(NQB=n_qb, NKB=n_kb, NBP=_pow2(n_kb, 16), NQBP=_pow2(n_qb, 16), KTOP=sel.k, KP=_pow2(sel.k, 2))
    out = dict(sizes)
    for p in sel.pools:
        feats = tuple(int(meta[str(d)]) for d in op.sched.types[p.leaf].shape[1:])
        out[f"{p.out}_pool_ptr"] = torch.empty((n_bh, n_kb) + feats, dtype=torch.float32, device=device)
    out.update(sel_ptr=torch.empty(first.shape[:3] + (sizes["KP"],), **i32),
               qmap_ptr=torch.zeros((n_bh, n_qb, n_kb), dtype=torch.int8, device=device),
               qlist_ptr=torch.empty((n_bh, n_qb, n_kb), **i32), qcnt_ptr=torch.zeros((n_bh, n_qb), **i32))
    values = {**named, **out}
    step = (bm, sb) + tuple(cfg.fwd[2:])
    kernel_meta = {**meta, "BM": bm, "BN": sb}
    op._launch("select_pool", step, n_kb, n_bh, values, kernel_meta)
    op._launch("select", step, n_qb, n_bh, values, kernel_meta)
    if transpose:
        out.update(klist_ptr=torch.empty((n_bh, n_kb, n_qb), **i32), kcnt_ptr=torch.zeros((n_bh, n_kb), **i32))
        op._launch("select_t", step, n_kb, n_bh, {**values, **out}, kernel_meta)
    return out
