"""A choice of key tokens (passes.select, per_token: a select score per (query, key token)): DSA's top-k
over a lightning-indexer score and a spec nobody wrote (a forced local window and a capped threshold). The
generated kernels (interpreter, fp32) against the spec-derived oracle and an independent naive reference
(tests/naive_softmax: the choice by explicit loops over sorted scores, then dense masked softmax), forward and
every gradient; the choice itself, bit for bit; T not a multiple of the block, grouped heads, packed
sequences with an empty one, ties at the cut-off, strong scores; and the refusals."""
from __future__ import annotations

import pytest
import torch
from naive_softmax import attend, causal, dsa, dsa_choice, token_choice

import effc
from effc.errors import SpecError
from effc.runtime.select_op import kernel_choice
from effc.runtime.verify import judge_fp32

# the library's DSA with 16-token blocks and k = 20, so the choice bites at test lengths
SMALL_DSA = '''
import "dsa.attn"
spec dsa_small extends dsa {
  select {
    block 16
    g = wi * relu(qi @ ki.T)
    mask kpos <= qpos
    shared sum
    topk(g, 20)
  }
}
'''
# not in the library: per head, the last 4 tokens always, then the keys scoring >= 0.25, at most 12 in all
WINDOW_THRESHOLD = '''
spec window_threshold {
  input q: [B, T, H, K]
  input k: [B, T, H, K] key
  input v: [B, T, H, V] key
  output o: [B, T, H, V]
  param scale = K ** -0.5
  select {
    block 16
    g = (q @ k.T) * scale
    mask kpos <= qpos
    force (kpos > qpos - 4) and (kpos <= qpos)   # the last 4 tokens, the query's own included
    threshold(g, 0.25, 12)
  }
  score {
    s = (q @ k.T) * scale
    mask kpos <= qpos
  }
  merge {
    o = softmax(s) @ v
  }
}
'''
CU = [0, 1, 9, 9, 25, 45, 61]  # one token, < a block, an empty sequence, a whole block, partial ones


def _dsa_inputs(T, H=4, hk=2, seed=0, strong=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, H, 16, generator=g)
    k, v = (torch.randn(1, T, hk, 16, generator=g) for _ in range(2))
    qi = torch.randn(1, T, H, 16, generator=g) * strong
    ki = torch.randn(1, T, hk, 16, generator=g)
    wi = torch.rand(1, T, H, generator=g)
    return [q, k, v, qi, ki, wi]


def _window_threshold_naive(q, k, v):
    T, D = q.shape[1], q.shape[-1]
    score = torch.einsum("bthd,bshd->bhts", q.double(), k.double()) * D ** -0.5
    i, j = torch.arange(T).reshape(T, 1), torch.arange(T).reshape(1, T)
    chosen = token_choice(score, 12, forced=(j > i - 4) & (j <= i), threshold=0.25)
    return attend(q, k, v, chosen & causal(T))[0], chosen


def _grads_agree(op, xs, naive_fn, out, trained=3):
    """The first `trained` inputs' gradients against the oracle's (float64 autograd) and the naive one's; the
    rest are read by the select stage only and get none (a discrete choice)."""
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, xs, g, allow_unused=True)
    assert all(x is None for x in grads[trained:])
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    ref, _ = op.reference(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in[:trained], g.double())
    nv_in = [x.detach().double().requires_grad_() for x in xs]
    nv_grads = torch.autograd.grad(naive_fn(*nv_in), nv_in[:trained], g.double())
    for i, (a, b, c) in enumerate(zip(grads, ref_grads, nv_grads)):
        assert judge_fp32(a, b).ok, (i, judge_fp32(a, b))
        assert judge_fp32(a, c).ok, (i, judge_fp32(a, c))


@pytest.mark.parametrize("T, chunk", [(50, 16), (61, 32)])  # neither a multiple of the 16-token block
def test_dsa_forward_gradients_and_choice(T, chunk):
    op = effc.loads(SMALL_DSA, "dsa_small")
    xs = [x.requires_grad_() for x in _dsa_inputs(T)]
    o, _ = op(*xs, chunk=chunk)
    plain = [x.detach() for x in xs]
    ref, _ = op.reference(*plain)
    naive = dsa(*plain, topk=20)
    assert judge_fp32(ref, naive).ok  # the oracle's choice and the naive one agree
    assert judge_fp32(o, ref).ok, judge_fp32(o, ref)
    assert judge_fp32(o, naive).ok, judge_fp32(o, naive)
    want = dsa_choice(*plain[3:], topk=20).permute(0, 2, 1, 3)  # (B, T, H, T)
    got = kernel_choice(op, plain, chunk=chunk)[..., :T]
    assert torch.equal(got, want)
    assert got.sum(-1).max() == 20 and got[:, :20].sum(-1).eq(torch.arange(1, 21).reshape(1, 20, 1)).all()
    _grads_agree(op, xs, lambda *a: dsa(*a, topk=20), o)


def test_dsa_ties_at_the_cut_off_go_to_the_lower_position():
    """Every indexer key the same: each query's scores all tie, so it keeps its first 20 keys; relu's zeros
    (negative indexer weights here) tie the same way."""
    op = effc.loads(SMALL_DSA, "dsa_small")
    xs = _dsa_inputs(45, seed=1)
    xs[4] = xs[4][:, :1].expand(-1, 45, -1, -1).contiguous()
    got = kernel_choice(op, xs)[..., :45]
    want = torch.ones(45, 45, dtype=torch.bool).tril() & (torch.arange(45) < 20)
    assert torch.equal(got[0, :, 0], want)
    xs = _dsa_inputs(45, seed=2)
    xs[5] = -xs[5]  # every weight negative: scores <= 0, most exactly 0 (relu)
    assert torch.equal(kernel_choice(op, xs)[..., :45], dsa_choice(*xs[3:], topk=20).permute(0, 2, 1, 3))


def test_dsa_strong_scores_and_grouped_heads_stay_exact():
    """Indexer queries scaled by 1e4 (scores ~1e5, far apart in their exponents) and 4 query heads on one
    key head (MQA: one choice for all)."""
    op = effc.loads(SMALL_DSA, "dsa_small")
    xs = _dsa_inputs(45, H=4, hk=1, seed=3, strong=1e4)
    o, _ = op(*xs)
    assert judge_fp32(o, dsa(*xs, topk=20)).ok
    choice = kernel_choice(op, xs)[..., :45]
    assert (choice == choice[:, :, :1]).all()  # every head of the group walks the group's choice


def test_dsa_packed_sequences_with_an_empty_one():
    op = effc.loads(SMALL_DSA, "dsa_small")
    xs = [x.requires_grad_() for x in _dsa_inputs(CU[-1], H=2, hk=1, seed=4)]
    cu = torch.tensor(CU, dtype=torch.int32)
    o, _ = op(*xs, cu_seqlens=cu, chunk=16)

    def naive(*ls):
        return torch.cat([dsa(*[x[:, a:b] for x in ls], topk=20) for a, b in zip(CU, CU[1:]) if b > a], 1)
    assert judge_fp32(o, naive(*[x.detach() for x in xs])).ok
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, xs[:3], g)
    nv = [x.detach().double().requires_grad_() for x in xs]
    for a, b in zip(grads, torch.autograd.grad(naive(*nv), nv[:3], g.double())):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)


@pytest.mark.parametrize("T", [45, 64])
def test_a_new_token_choice_compiles_with_no_new_python(T):
    """A forced local window and a capped threshold over per-token scores: a spec nobody wrote."""
    op = effc.loads(WINDOW_THRESHOLD, "window_threshold")
    g = torch.Generator().manual_seed(T)
    xs = [(torch.randn(1, T, 2, 16, generator=g)).requires_grad_() for _ in range(3)]
    o, _ = op(*xs, chunk=16)
    naive, chosen = _window_threshold_naive(*[x.detach() for x in xs])
    ref, _ = op.reference(*[x.detach() for x in xs])
    assert judge_fp32(ref, naive).ok and judge_fp32(o, naive).ok, judge_fp32(o, naive)
    assert torch.equal(kernel_choice(op, [x.detach() for x in xs])[..., :T], chosen.permute(0, 2, 1, 3))
    assert 4 < chosen.sum(-1).float().mean() < 12  # the threshold and the cap both bite
    _grads_agree(op, xs, lambda *a: _window_threshold_naive(*a)[0], o)


def test_the_plan_says_what_it_chooses():
    plan = str(effc.load("dsa").comp.plan) if hasattr(effc.load("dsa"), "comp") else ""
    text = str(effc.load("dsa").sched)
    assert "key tokens" in text and "ties: the lower position" in text
    assert "select_pool" not in plan and "16-way search" in plan


def test_refusals_name_the_construct():
    topp = WINDOW_THRESHOLD.replace("threshold(g, 0.25, 12)", "topp(g, 0.9, 12)")
    with pytest.raises(NotImplementedError, match=r"topp\(g, 0.9, 12\).*over key tokens is not lowered"):
        effc.loads(topp, "window_threshold")
    mixed = WINDOW_THRESHOLD.replace("g = (q @ k.T) * scale", "g = q @ blockmean(k).T + kpos")
    with pytest.raises(SpecError, match=r"10:9: error: cannot broadcast \[C, NB\] with \[1, CK\]"):
        effc.loads(mixed, "window_threshold")


def test_the_select_kernel_scans_the_keys_its_masks_allow():
    """passes.select derives the keys a query block may choose from the masks and force lines (their
    position formulas): causal DSA scans keys up to the block's last query; a window bounds both sides."""
    from effc.passes.blocksparse import I0, I1, NEG
    assert effc.load("dsa").sched.select.keys.hi == I1 and effc.load("dsa").sched.select.keys.lo == NEG
    window = effc.loads(WINDOW_THRESHOLD.replace("mask kpos <= qpos\n    force", "mask (kpos <= qpos) and "
                                                 "(kpos > qpos - 32)\n    force"), "window_threshold")
    keys = window.sched.select.keys
    assert (keys.lo, keys.hi) == (I0 - 31, I1)  # forced keys lie inside the candidates' window
    assert "keys scanned for a query block [i0, i1]: j in [i0 - 31, i1]" in str(window.sched)


@pytest.mark.parametrize("H, hk, walk", [(16, 1, "head rows"), (4, 2, "token rows")])
def test_decoding_chooses_tokens_of_the_cache(H, hk, walk):
    """DSA decoding: each new token chooses its 20 keys of the request's cache (the indexer key `ki` cached
    beside k and v) and walks them: gathered with head rows when 9 or more query heads share a key head, the
    blocks holding them with token rows otherwise. Requests of different lengths, one with an empty
    context; against the oracle on each request's whole sequence and the naive reference."""
    from test_softmax_decode import _filled_cache
    op = effc.loads(SMALL_DSA, "dsa_small")
    assert op.cache_names == ("k", "v", "ki")
    g = torch.Generator().manual_seed(4)
    xs = [torch.cat([x, x[:1] + torch.randn(x[:1].shape, generator=g)], 0) for x in _dsa_inputs(60, H, hk, seed=4)]
    lens, tq = torch.tensor([0, 55], dtype=torch.int32), 3
    tokens, cache = _filled_cache(op, xs, lens, tq, 64, H, {})
    o = op.decode(*tokens, cache=cache, cache_seqlens=lens)
    assert f"({walk})" in op.last_decode["kernels"]
    for b in range(2):
        n = int(lens[b]) + tq
        whole = [x[b:b + 1, :n] for x in xs]
        ref, _ = op.reference(*whole, dtype=torch.float32, queries=(n - tq, n))
        assert judge_fp32(o[b], ref[0, n - tq:]).ok, (b, judge_fp32(o[b], ref[0, n - tq:]))
        assert judge_fp32(o[b], dsa(*whole, topk=20)[0, n - tq:]).ok
