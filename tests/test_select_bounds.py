"""The select kernel's work bounds (passes.select): the key blocks a query block may choose, derived from the
mask and force lines over qblock and kblock (the chunks score no others), and a shared score linear in the
query side scored once from the group's summed query tiles. The schedule's facts, then a spec nobody wrote
(top-2 among the last three blocks, shared by grouped heads) whose query blocks start scoring past block 0,
against a naive choice written here and the oracle, forward and gradients."""
from __future__ import annotations

import math

import pytest
import sympy
import torch
from test_select_criteria import _spec, naive_attention

import effc
from effc.compiler import compile_text
from effc.passes.blocksparse import NEG
from effc.passes.select import QB0, QB1
from effc.runtime import select_op
from effc.runtime.verify import judge_fp32

WINDOWED = _spec("    g = q @ blockmean(k).T\n    mask kblock < qblock\n    mask kblock >= qblock - 3\n"
                 "    force kblock == qblock\n    shared sum\n    topk(g, 2)", name="windowed")


def _select(text: str):
    return compile_text(text).legality.select


def test_the_blocks_a_query_block_may_choose():
    sel = _select(WINDOWED)
    assert (sel.blocks.lo, sel.blocks.hi) == (QB0 - 3, QB1)
    moba_like = _select(_spec("    g = q @ blockmean(k).T\n    mask kblock < qblock\n    force kblock == 0\n"
                              "    topk(g, 2)"))
    assert moba_like.blocks.lo == NEG and moba_like.blocks.hi == sympy.Max(0, QB1 - 1)
    # a mask over a select value bounds nothing: every block is scored
    opaque = _select(_spec("    g = q @ blockmean(k).T\n    mask g > 0\n    topk(g, 2)"))
    assert opaque.blocks.lo == NEG and opaque.blocks.hi == sympy.oo
    assert "kb in [qb0 - 3, qb1]" in "\n".join(sel.describe())


@pytest.mark.parametrize("score, linear", [
    ("g = q @ blockmean(k).T", True),
    ("g = (q @ blockmean(k).T) * scale", True),
    ("g = (q * 2 - q) @ blockmean(k).T", True),
    ("g = relu(q @ blockmean(k).T)", False),
    ("g = q @ blockmean(k).T + 1", False),  # affine: the group's sum adds the constant once a head
    ("g = (q * q) @ blockmean(k).T", False),
    ("g = q @ blockmean(q).T", False),  # a pool of a query-side value differs between the heads
])
def test_a_shared_score_linear_in_the_query_side(score, linear):
    text = _spec(f"    {score}\n    mask kblock < qblock\n    force kblock == qblock\n    shared sum\n    topk(g, 2)")
    sel = _select(text)
    assert sel.summed_query is linear
    src = compile_text(text).source()
    assert ("sum_q += lq_q" in src) is linear
    assert "for c0 in range(kb_lo, kb_hi, CB)" in src


def _naive_choice(q, k, block: int, k_top: int, back: int) -> torch.Tensor:
    """(B, H, T, nb) bool by loops: query i in block qb takes qb, then the `k_top - 1` best of blocks
    qb - back .. qb - 1 by the gate summed over its key head's query heads (ties: the lower index)."""
    B, T, H, _ = q.shape
    hk = k.shape[2]
    nb = -(-T // block)
    pooled = torch.stack([k[:, b * block:(b + 1) * block].double().mean(1) for b in range(nb)], 1)  # B nb hk D
    gate = torch.zeros(B, H, T, nb, dtype=torch.float64)
    for h in range(H):
        gate[:, h] = (q[:, :, h, None, :].double() * pooled[:, None, :, h // (H // hk)]).sum(-1)
    gate = gate.reshape(B, hk, H // hk, T, nb).sum(2, keepdim=True).expand(B, hk, H // hk, T, nb).reshape(B, H, T, nb)
    chosen = torch.zeros(B, H, T, nb, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                qb = i // block
                rest = sorted(range(max(0, qb - back), qb), key=lambda x: (-gate[b, h, i, x].item(), x))
                for x in [qb] + rest[:k_top - 1]:
                    chosen[b, h, i, x] = True
    return chosen


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(select_op, "select_chunk", lambda bm, n_kb, interpreting: 4)


def test_a_windowed_shared_choice_scores_only_its_window(small_chunks):
    """T = 150 in 16-token blocks (10 blocks, the last partial), 4 query heads over 2 key heads, chunks of 4
    blocks: late query blocks start their chunks past block 0 and the group's score is its summed queries'."""
    op = effc.loads(WINDOWED)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 150, h, 16, generator=g) for h in (4, 2, 2))
    chosen = op.select_blocks(q, k, v).permute(0, 2, 1, 3)
    want = _naive_choice(q, k, 16, 2, 3)
    assert torch.equal(chosen, want)
    assert torch.equal(chosen[:, 0], chosen[:, 1]) and not torch.equal(chosen[:, 1], chosen[:, 2])
    xs = [x.requires_grad_() for x in (q, k, v)]
    o = op(*xs)[0]
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    ref = op.reference(*ref_in)[0]
    nv_in = [x.detach().double().requires_grad_() for x in xs]
    nv = naive_attention(*nv_in, want, 16)
    assert judge_fp32(o, ref).ok and judge_fp32(o, nv).ok, (judge_fp32(o, ref), judge_fp32(o, nv))
    d_o = torch.randn_like(o)
    for name, a, b, c in zip("qkv", torch.autograd.grad(o, xs, d_o), torch.autograd.grad(ref, ref_in, d_o.double()),
                             torch.autograd.grad(nv, nv_in, d_o.double())):
        assert judge_fp32(a, b).ok and judge_fp32(a, c).ok, (name, judge_fp32(a, b), judge_fp32(a, c))
    assert math.isfinite(o.sum().item())
