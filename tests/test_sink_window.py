"""library/sink_window (gpt-oss's learned attention sinks over a sliding window): the sink written as
`sigmoid(logsumexp(s) - sink)` in merge, no new Python; checked against the naive form (one more softmax
column holding the sink logit), with a per-head (H,) logit expanded as a model holds it, grouped heads and
packed sequences with an empty one, and the two limits (a sink of -inf is plain sliding-window attention;
a huge one takes all the weight)."""
import pytest
import torch

import effc
from effc.runtime.verify import judge_fp32

from naive_softmax import sink_window as naive

B, T, H, D = 2, 45, 4, 16


def _qkv(seed, T=T, B=B, Hk=H):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, h, D, generator=g) for h in (H, Hk, Hk)]


def test_a_per_head_logit_expanded_and_its_gradient():
    op = effc.load("sink_window")
    q, k, v = (x.requires_grad_() for x in _qkv(0))
    logit = torch.tensor([-1.0, 0.0, 1.5, 3.0], requires_grad=True)       # (H,): a model's parameter
    o, _ = op(q, k, v, logit.expand(B, T, H), window=20, chunk=16)
    ref = naive(q.detach(), k.detach(), v.detach(), logit.detach().expand(B, T, H), window=20)
    assert judge_fp32(o, ref).ok, judge_fp32(o, ref)
    w = torch.randn_like(o)
    ours = torch.autograd.grad(o, (q, k, v, logit), w)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, logit)]
    theirs = torch.autograd.grad(naive(*leaves[:3], leaves[3].expand(B, T, H), window=20), leaves, w.double())
    for name, a, b in zip("qkvs", ours, theirs):
        assert judge_fp32(a, b).ok, f"d{name}: {judge_fp32(a, b)}"


def test_grouped_heads_and_packed_sequences_with_an_empty_one():
    op = effc.load("sink_window")
    q, k, v = _qkv(1, T=50, B=1, Hk=2)
    sink = torch.randn(1, 50, H)
    cu = torch.tensor([0, 20, 20, 50], dtype=torch.int32)
    o, _ = op(q, k, v, sink, cu_seqlens=cu, window=8, chunk=16)
    ref = torch.cat([naive(q[:, a:b], k[:, a:b], v[:, a:b], sink[:, a:b], window=8)
                     for a, b in ((0, 20), (20, 50))], 1)
    assert judge_fp32(o, ref).ok, judge_fp32(o, ref)


@pytest.mark.parametrize("logit, expect", [(float("-inf"), "window"), (60.0, "zero")])
def test_the_two_limits(logit, expect):
    op = effc.load("sink_window")
    q, k, v = _qkv(2)
    o, _ = op(q, k, v, torch.full((B, T, H), logit), window=20, chunk=16)
    if expect == "window":
        plain, _ = effc.load("sliding_window")(q, k, v, window=20, chunk=16)
        assert judge_fp32(o, plain).ok, judge_fp32(o, plain)
    else:
        assert o.abs().max() < 1e-12
