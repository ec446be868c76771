"""effc.route_to_memories: a mixture of memories (MoM / sparse state expansion) from a linear-family op,
against a naive per-memory recurrence written here: tokens to their top-k memories, a state per (row,
memory), outputs weighted by the softmax of the top-k router logits."""
import pytest
import torch
import torch.nn.functional as F

import effc
from effc.errors import ArgumentError

B, T, H, D, M = 2, 37, 2, 16, 3  # T: not a multiple of the chunk


def naive(q, k, v, g, logits, top_k, s0):
    """o[b, t] = sum over the token's memories m of w * q_t S_m, with S_m <- exp(g_t) S_m + k_t^T v_t
    updated only at tokens routed to m (simple_gla's recurrence, scale D^-0.5)."""
    top, mem = logits.topk(top_k, -1)
    w = top.softmax(-1)
    rows = [[torch.zeros(H, D, dtype=torch.float64) for _ in range(T)] for _ in range(B)]
    S = [[s0[b, m] for m in range(M)] for b in range(B)]  # rebound, never written in place (autograd)
    for b in range(B):
        for t in range(T):
            for slot in range(top_k):
                m = int(mem[b, t, slot])
                S[b][m] = torch.exp(g[b, t])[:, None, None] * S[b][m] + k[b, t, :, :, None] * v[b, t, :, None, :]
                rows[b][t] = rows[b][t] + w[b, t, slot] * torch.einsum("hk,hkv->hv", q[b, t] * D ** -0.5, S[b][m])
    return torch.stack([torch.stack(r) for r in rows]), torch.stack([torch.stack(r) for r in S])


@pytest.fixture(scope="module")
def op():
    return effc.load("simple_gla")


def _inputs(seed, strong_router=False):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=gen, dtype=torch.float64) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64))
    logits = torch.randn(B, T, M, generator=gen, dtype=torch.float64) * (10 if strong_router else 1)
    if strong_router:  # memory 2 is never chosen by row 1: an empty packed sequence
        logits[1, :, 2] = -1e3
    s0 = torch.randn(B, M, H, D, D, generator=gen, dtype=torch.float64)
    return q, k, v, g, logits, s0


@pytest.mark.parametrize("top_k,strong", [(1, False), (2, False), (2, True)])
def test_matches_a_naive_mixture_forward_and_backward(op, top_k, strong):
    q, k, v, g, logits, s0 = _inputs(top_k + 10 * strong, strong)
    ref_o, ref_s = naive(q, k, v, g, logits, top_k, s0)
    leaves = [x.float().requires_grad_() for x in (q, k, v, g, logits, s0)]
    o, s = effc.route_to_memories(op, leaves[4], *leaves[:4], top_k=top_k, initial_state=leaves[5],
                                  output_final_state=True)
    assert o.shape == (B, T, H, D) and s.shape == (B, M, H, D, D)
    assert torch.allclose(o.double(), ref_o, atol=2e-4, rtol=1e-3), (o.double() - ref_o).abs().max()
    assert torch.allclose(s.double(), ref_s, atol=2e-4, rtol=1e-3), (s.double() - ref_s).abs().max()
    if strong:  # row 1 never reaches memory 2: its state passes through untouched
        assert torch.equal(s[1, 2], leaves[5][1, 2])
    gen = torch.Generator().manual_seed(5)
    d_o, d_s = torch.randn(o.shape, generator=gen), torch.randn(s.shape, generator=gen)
    torch.autograd.backward([o, s], [d_o, d_s])
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, g, logits, s0)]
    o2, s2 = naive(*ref_leaves[:4], ref_leaves[4], top_k, ref_leaves[5])
    torch.autograd.backward([o2, s2], [d_o.double(), d_s.double()])
    for name, a, b in zip(("q", "k", "v", "g", "router_logits", "initial_state"), leaves, ref_leaves):
        assert torch.allclose(a.grad.double(), b.grad, atol=1e-3, rtol=1e-3), (name, (a.grad.double() - b.grad).abs().max())


def test_bad_arguments_are_named(op):
    q, k, v, g, logits, s0 = (x.float() for x in _inputs(0))
    with pytest.raises(ArgumentError, match=r"router_logits must be \[B, T, M\]"):
        effc.route_to_memories(op, logits[0], q, k, v, g)
    with pytest.raises(ArgumentError, match="top_k must be an integer from 1 to the number of memories"):
        effc.route_to_memories(op, logits, q, k, v, g, top_k=4)
    with pytest.raises(ArgumentError, match="input 1 must be"):
        effc.route_to_memories(op, logits, q, k[:, :5], v, g)
    with pytest.raises(ArgumentError, match=r"initial_state must be \[B, M, ...\]"):
        effc.route_to_memories(op, logits, q, k, v, g, initial_state=s0[:, 0])
