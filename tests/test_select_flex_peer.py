"""The bench's FlexAttention peer for specs with a select stage (effc/tools/softmax_peers.py): a BlockMask
built from effc's own choice (op.select_blocks), with the per-token choice and causality in its mask_mod.
On CPU, FlexAttention runs eagerly (a dense masked softmax): its output must equal effc's kernels'
(interpreter, fp32) and the naive MoBA reference's, so the mask holds exactly effc's choice."""
from __future__ import annotations

import pytest
import torch
from naive_softmax import moba

import effc
from effc.runtime.verify import judge_fp32
from effc.tools.softmax_peers import PEERS_SOFTMAX, _causal_pairs, select_block_mask
from test_select import SMALL_MOBA as SMALL  # MoBA with 16-token blocks and k = 2

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _inputs(T, H=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, T, H, 16, generator=g) for _ in range(3)]


def _flex(xs, block_mask):
    from torch.nn.attention.flex_attention import flex_attention
    q, k, v = (x.transpose(1, 2).contiguous() for x in xs)
    return flex_attention(q, k, v, block_mask=block_mask).transpose(1, 2)


@pytest.mark.parametrize("q_block", [pytest.param(16, marks=pytest.mark.slow), 32])
def test_block_mask_holds_effcs_choice(q_block):
    op = effc.loads(SMALL, "moba_small")
    xs = _inputs(70)  # 5 key blocks, the last partial; query blocks of 16 or 32 tokens
    chosen = op.select_blocks(*xs)
    bm = select_block_mask(chosen, 16, _causal_pairs, q_block)
    visited = bm.kv_num_blocks + bm.full_kv_num_blocks  # (B, H, query blocks)
    n_qb = -(-70 // q_block)
    causal_blocks = sum(min(5, ((i + 1) * q_block - 1) // 16 + 1) for i in range(n_qb))
    assert int(visited[0, 0].sum()) < causal_blocks  # sparse: fewer blocks than causal attention walks
    o = _flex(xs, bm)
    mine, _ = op(*xs)
    assert judge_fp32(o, mine).ok, judge_fp32(o, mine)
    assert judge_fp32(o, moba(*xs, block=16, topk=2)).ok


def test_full_blocks_skip_the_mask_mod_only_where_it_keeps_everything():
    """The library's moba (k 16) at 200 tokens chooses every earlier block: those are full blocks."""
    op = effc.load("moba")
    xs = _inputs(200, seed=1)
    bm = select_block_mask(op.select_blocks(*xs), 64, _causal_pairs, 64)
    assert int(bm.full_kv_num_blocks.sum()) > 0 and int(bm.kv_num_blocks.sum()) > 0
    o = _flex(xs, bm)
    assert judge_fp32(o, moba(*xs)).ok


def _peer_row(spec: str, op, xs, inputs):
    """The Flex row as `effc bench` builds it for `spec` (the mask made in build, outside the timed call),
    with `op` (small blocks) as the bench's spec; its output beside effc's kernels'."""
    label, names, build = PEERS_SOFTMAX[spec][1]
    assert "FlexAttention" in label and names == inputs
    import effc.tools.softmax_peers as peers
    peers._FLEX_CACHE[f"effc {spec}"] = op
    try:
        run = build(xs, {"scale": 16 ** -0.5})
    finally:
        del peers._FLEX_CACHE[f"effc {spec}"]
    o = run()
    mine, _ = op(*xs)
    assert judge_fp32(o, mine).ok, judge_fp32(o, mine)
    return o


def test_the_bench_peer_row_computes_effcs_output():
    _peer_row("moba", effc.loads(SMALL, "moba_small"), _inputs(50, seed=2), ("q", "k", "v"))


@pytest.mark.parametrize("kv_block", [16, 32])  # 32: the mask's key blocks hold two chosen ones (training)
def test_the_pairs_the_mask_keeps_are_the_naive_ones(kv_block):
    """The pairs the BlockMask keeps (what Flex's backward walks too; it has no CPU backward): a visited block,
    then full or the mask_mod, equal the naive choice's pairs under causality."""
    from naive_softmax import block_choice
    op = effc.loads(SMALL, "moba_small")
    xs = _inputs(45, seed=3)
    bm = select_block_mask(op.select_blocks(*xs), 16, _causal_pairs, 32, kv_block=kv_block)
    i = torch.arange(45)[:, None]
    j = torch.arange(45)[None, :]
    n_kv = -(-45 // kv_block)
    blocks = torch.zeros(1, 2, 2, n_kv, dtype=torch.int8)  # (B, H, query blocks, key blocks): 0, 1 partial, 2 full
    for kind, n, idx in ((1, bm.kv_num_blocks, bm.kv_indices), (2, bm.full_kv_num_blocks, bm.full_kv_indices)):
        for h in range(2):
            for qb in range(2):
                for t in range(int(n[0, h, qb])):
                    blocks[0, h, qb, int(idx[0, h, qb, t])] = kind
    kind = blocks[:, :, i // 32, j // kv_block]  # (B, H, T, T)
    b, h = torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.arange(2).reshape(1, 2, 1, 1)
    kept = (kind == 2) | ((kind == 1) & bm.mask_mod(b, h, i, j))
    expect = block_choice(*xs[:2], 16, 2)[..., torch.arange(45) // 16] & (j <= i)
    assert torch.equal(kept, expect)


def test_the_nsa_peers_sliding_window():
    """The window FlexAttention runs for fla's parallel_nsa where flash-attn is missing (tools/peers.py):
    grouped heads, T not a multiple of FlexAttention's 128-token blocks, against effc's sink_window with no
    sink (the same causal window of 9 keys) and a dense masked softmax written here."""
    from effc.tools.softmax_peers import sliding_window
    T, H, Hk, W = 70, 4, 2, 9
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, T, h, 16, generator=g) for h in (H, Hk, Hk))
    o = sliding_window(T, W, "cpu")(q, k, v, 0.25)
    kk, vv = (x.repeat_interleave(H // Hk, 2).double() for x in (k, v))
    s = torch.einsum("bihd,bjhd->bhij", q.double(), kk) * 0.25
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    s = s.masked_fill(~((j <= i) & (i - j < W)), float("-inf"))
    naive = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), vv)
    assert judge_fp32(o, naive).ok, judge_fp32(o, naive)
    op = effc.load("sink_window")
    sink = torch.full((1, T, H), -1e4)  # a sink too small to take any weight
    ours, _ = op(q, k, v, sink, window=W, scale=0.25)
    assert judge_fp32(o, ours).ok, judge_fp32(o, ours)


def test_the_dsa_peer_row_walks_effcs_token_choice():
    """A choice of key tokens (DSA): the BlockMask visits the blocks holding a chosen token, its mask_mod
    keeps the chosen keys; eager Flex equals effc's kernels and the naive DSA."""
    from naive_softmax import dsa
    from test_select_tokens import SMALL_DSA, _dsa_inputs
    xs = _dsa_inputs(61, seed=5)
    o = _peer_row("dsa", effc.loads(SMALL_DSA, "dsa_small"), xs, ("q", "k", "v", "qi", "ki", "wi"))
    assert judge_fp32(o, dsa(*xs, topk=20)).ok
