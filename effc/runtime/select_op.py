"""The select stage at call time (passes.select): the pool, select and (for the backward) transpose kernels,
and the buffers they fill, which the walks read by name. The backward runs them again rather than saving
them: the choice is deterministic, and recomputing it (O(T * key blocks * D)) is cheap beside the walks."""
from __future__ import annotations

import math

import torch

from ..passes.softmax import pivot_group, select_chunk
from .checks import interpreting
from .select_oracle import check_criterion, head_group


def _pow2(n: int, least: int) -> int:
    return max(least, 1 << max(0, n - 1).bit_length())


def selection_buffers(op, cfg, named: dict, meta: dict, n_seq: int, longest: int, H: int, leaves,
                      transpose: bool, query_rows: int | None = None) -> dict:
    """Launch the select stage's kernels for one call; returns the buffers and sizes the walks take
    (sel, qlist, qcnt and, with `transpose`, klist, kcnt; NQB, NKB, KP, GROUP), a row of each per group of
    GROUP heads sharing a choice. `query_rows`: the rows computed per
    sequence when not all of them (decoding's new tokens). A choice of key tokens walked with head rows
    (`cfg.head_rows`) also gets each query's chosen keys, `tidx` [tokens, H / GROUP, KTOP] and their count
    `tcnt`, which those walks gather."""
    sel = op.sched.select
    first = leaves[0]
    device = first.device
    bm, sb = cfg.fwd[0], sel.block
    n_qb, n_kb, n_bh = math.ceil((query_rows or longest) / bm), math.ceil(longest / sb), n_seq * H
    i32 = dict(dtype=torch.int32, device=device)
    check_criterion(op.spec, named)
    # each query's list holds at most `slots` blocks: topk's k, a cap, or else every key block
    slots = sel.selection.slots or n_kb
    sizes = dict(NQB=n_qb, NKB=n_kb, NBP=_pow2(n_kb, 16), NQBP=_pow2(n_qb, 16), KTOP=slots, KP=_pow2(slots, 2),
                 CB=select_chunk(bm, n_kb, interpreting()))
    # the heads sharing a choice: their lists are stored once, a row per group (1: a choice per head)
    sizes["GROUP"] = head_group(op.spec, dict(zip(op.sched.leaves, leaves)), H) if sel.selection.shared else 1
    if sel.per_token:  # topk's k or a cap in tokens; an uncapped threshold takes no count
        # the search scores the keys a block at a time, as the last pass does: each key's score is then the same
        # product in every pass, bit for bit (a product of another width may round differently: numpy's BLAS
        # under the interpreter does, and so may an MMA of another shape), so the cut-off counts what is chosen
        search = sb
        sizes.update(KTOP=sel.selection.slots or 1, NW=-(-sb // 32), SB=search,
                     PG=pivot_group(bm, search, interpreting()))
    out = dict(sizes)
    for p in sel.pools:  # a row per head of the pooled leaf (its key heads)
        feats = tuple(int(meta[str(d)]) for d in op.sched.types[p.leaf].shape[1:])
        heads = leaves[op.sched.leaves.index(p.leaf)].shape[2]
        out[f"{p.out}_pool_ptr"] = torch.empty((n_seq * heads, n_kb) + feats, dtype=torch.float32, device=device)
    # decoding (runtime.softmax_decode) gives each request's cached tokens and its new ones; a call, none
    rows = (n_seq * named["TQ"],) if meta.get("DECODE") else first.shape[:2]
    out.update(lens_ptr=named.get("lens_ptr", torch.empty(1, **i32)), TQ=named.get("TQ", 0))
    if sel.per_token:  # each (query, key block)'s chosen tokens as bits, one row per key/value head group
        # zeros: the select kernel writes the blocks its masks reach only (the walks read no others)
        out.update(tmask_ptr=torch.zeros(rows + (H // sizes["GROUP"], n_kb, sizes["NW"]), **i32))
        lists = rows + (H // sizes["GROUP"],)
        gather = bool(cfg.head_rows)
        out.update(INDICES=gather, tidx_ptr=torch.empty(lists + (sizes["KTOP"],) if gather else (1,), **i32),
                   tcnt_ptr=torch.empty(lists if gather else (1,), **i32))
    else:
        out.update(sel_ptr=torch.empty(rows + (H // sizes["GROUP"], sizes["KP"]), **i32))
    # the block map counts the query block's tokens that took a key block (a choice of tokens: flags them)
    n_lists = n_seq * (H // sizes["GROUP"])  # a row per head group, as `sel`
    out.update(qmap_ptr=torch.zeros((n_lists, n_qb, n_kb), dtype=torch.uint8, device=device),
               qlist_ptr=torch.empty((n_lists, n_qb, n_kb), **i32), qcnt_ptr=torch.zeros((n_lists, n_qb), **i32))
    values = {**named, **out}
    step = (bm, sb) + tuple(cfg.fwd[2:])
    kernel_meta = {**meta, "BM": bm, "BN": sb}
    if sel.pools:
        op._launch("select_pool", step, n_kb, n_bh, values, kernel_meta)
    op._launch("select", step, n_qb, n_bh, values, kernel_meta)
    if transpose:
        out.update(klist_ptr=torch.empty((n_lists, n_kb, n_qb), **i32), kcnt_ptr=torch.zeros((n_lists, n_kb), **i32),
                   ktok_ptr=torch.zeros((n_lists, n_kb), **i32))
        op._launch("select_t", step, n_kb, n_bh, {**values, **out}, kernel_meta)
    return out


def kernel_choice(op, tensors, cu_seqlens=None, chunk: int | None = None, **params) -> torch.Tensor:
    """The key blocks the generated select kernel chooses, (B, T, H, nb) bool (nb: the longest sequence's
    block count), for comparing the choice itself against a reference."""
    from ..passes.softmax import choose_softmax_tiles
    from .checks import interpreting, kernel_cu_seqlens
    if op.sched.select is None:
        raise ValueError(f"spec '{op.name}' has no select stage")
    B, T, H, dims, pvals = op._check(tensors, params, True)
    cfg = choose_softmax_tiles(op.spec, dims, interpreting(), chunk=chunk)
    named_in = {d.name: x for d, x in zip(op.spec.inputs, tensors)}
    pre = op._prefix(named_in, pvals, H, cu_seqlens)
    leaves = [named_in[x] if x in named_in else pre[x] for x in op.sched.leaves]
    n_seq = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    _, _, _, longest, heads = op._layout(leaves, n_seq, cu_seqlens)
    first = leaves[0]
    named = op.stored_leaves(leaves, dims, first.dtype)
    named.update({f"p_{k}": v for k, v in pvals.items()})
    named.update(T=T, Q_LO=0, Q_HI=T, cu_ptr=kernel_cu_seqlens(cu_seqlens, first.device) if cu_seqlens is not None
                 else torch.empty(1, device=first.device))
    meta = op._meta(cfg.fwd, H, heads, dims, cu_seqlens, first.dtype)
    bufs = selection_buffers(op, cfg, named, meta, n_seq, longest, H, leaves, transpose=False)
    if op.sched.select.per_token:
        return _chosen_tokens(bufs, op.sched.select.block)
    sel = bufs["sel_ptr"].long().repeat_interleave(bufs["GROUP"], dim=-2)  # a row per head group -> per head
    nb = bufs["NKB"]
    chosen = torch.zeros(sel.shape[:3] + (nb + 1,), dtype=torch.bool, device=sel.device)
    return chosen.scatter(-1, torch.where(sel < 0, nb, sel), True)[..., :nb]


def _chosen_tokens(bufs: dict, block: int) -> torch.Tensor:
    """A choice of key tokens' bits -> (B, T, H, n) bool (n: the longest sequence's blocks x `block`)."""
    words = bufs["tmask_ptr"]  # (B, T, H / GROUP, NKB, NW) int32
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    bits = ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)[..., :block]  # ..., NKB, block
    return bits.repeat_interleave(bufs["GROUP"], dim=-3).flatten(-2)
