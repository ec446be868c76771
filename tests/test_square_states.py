"""Square states ([K, K]) and the `gram` annotation, through the library's mesanet: a per-token solve of
(G_t + lam I) x = q_t by conjugate gradient, against a naive token-by-token reference written here."""
import pytest
import torch
import torch.nn.functional as F

import effc
from effc.dsl import parse
from effc.dsl.pyfront import parse_function
from effc.errors import SpecError
from naive import mesanet

B, H, D = 2, 2, 4  # K = 4: four CG steps solve exactly


def naive_mesanet(q, k, v, g, beta, G0, S0):
    o, (G, S) = mesanet(q, k, v, g, beta, initial_state=(G0, S0))
    return o, G, S


def _inputs(T, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (F.normalize(torch.randn(B, T, H, D, generator=gen, dtype=torch.float64), dim=-1) for _ in range(2))
    v = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64) + 2)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64))
    x = torch.randn(B, H, D, D, generator=gen, dtype=torch.float64)
    G0 = x @ x.transpose(-1, -2) / D  # a Gram matrix, as the annotation promises
    S0 = torch.randn(B, H, D, D, generator=gen, dtype=torch.float64)
    return q, k, v, g, beta, G0, S0


@pytest.mark.parametrize("T", [45, 64])  # 45: the last chunk has padded tokens (divisions by 0 there)
def test_mesanet_matches_a_naive_per_token_solve(T):
    op = effc.load("mesanet")
    xs = _inputs(T)
    leaves = [x.float().requires_grad_() for x in xs]
    o, (G, S) = op(*leaves[:5], initial_state=(leaves[5], leaves[6]), output_final_state=True)
    ref = [x.clone().requires_grad_() for x in xs]
    ro, rG, rS = naive_mesanet(*ref)
    for got, want in ((o, ro), (G, rG), (S, rS)):
        assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4), (got.double() - want).abs().max()
    gen = torch.Generator().manual_seed(3)
    seeds = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in (ro, rG, rS)]
    torch.autograd.backward([o, G, S], [s.float() for s in seeds])
    torch.autograd.backward([ro, rG, rS], seeds)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "G0", "S0"), leaves, ref):
        assert torch.isfinite(a.grad).all(), name
        assert torch.allclose(a.grad.double(), b.grad, atol=2e-3, rtol=2e-3), (name, (a.grad.double() - b.grad).abs().max())


def test_four_steps_solve_exactly_at_four_features():
    """The reference itself: CG in K steps is the exact solve, so the op is MesaNet's o_t, not an
    approximation of it, at K = 4."""
    q, k, v, g, beta, G0, S0 = _inputs(9, seed=1)
    o, _, _ = naive_mesanet(q, k, v, g, beta, G0, S0)
    G, S, want = G0, S0, []
    for t in range(9):
        G = torch.exp(g[:, t])[..., None, None] * G + beta[:, t][..., None, None] * k[:, t, :, :, None] * k[:, t, :, None, :]
        S = torch.exp(g[:, t])[..., None, None] * S + beta[:, t][..., None, None] * k[:, t, :, :, None] * v[:, t, :, None, :]
        x = torch.linalg.solve(G + torch.eye(D, dtype=G.dtype), q[:, t].unsqueeze(-1)).squeeze(-1)
        want.append(torch.einsum("bhk,bhkv->bhv", x, S))
    assert torch.allclose(o, torch.stack(want, 1), atol=1e-8)


def test_the_oracle_keeps_gradients_finite_through_divisions_on_padded_tokens():
    op = effc.load("mesanet")
    ref = [x.clone().requires_grad_() for x in _inputs(45)]
    o, _ = op.reference(*ref[:5], initial_state=(ref[5], ref[6]))
    o.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in ref)


def test_gram_only_on_square_states():
    base = "spec s {\n  input q: [B, T, H, K]\n  input v: [B, T, H, V]\n  output o: [B, T, H, V]\n%s\n" \
           "  merge { o = q @ S }\n  inter { S = S + q.T @ v }\n}\n"
    with pytest.raises(SpecError, match=r"gram on state 'S' \[K, V\]: only a square state"):
        effc.loads(base % "  state S: [K, V] gram")
    with pytest.raises(SpecError, match=r"gram on input 'q'"):
        effc.loads(base.replace("input q: [B, T, H, K]", "input q: [B, T, H, K] gram") % "  state S: [K, V]")
    with pytest.raises(SpecError, match="repeats a dim"):
        effc.loads(base.replace("input v: [B, T, H, V]", "input v: [B, T, H, K, K]") % "  state S: [K, V]")
    assert parse(base % "  state S: [K, K] gram").specs[0].decls[-1].annotations == ("gram",)


def test_python_front_end_declares_a_gram_state():
    from effc.dsl.pyfront import Input, Output, State, inter, merge  # noqa: F401

    def gram_attention(q: Input("B", "T", "H", "K"), k: Input("B", "T", "H", "K")) -> Output("o", "B", "T", "H", "K"):
        G = State("K", "K", "gram")
        with merge:
            o = q @ G  # noqa: F841
        with inter:
            G = G + k.T @ k  # noqa: F841

    decl = parse_function(gram_attention, 16).specs[0].decls[-1]
    assert (decl.kind, decl.shape, decl.annotations) == ("state", ("K", "K"), ("gram",))
