"""passes.decay_dot: a score matmul of factored decays, (x * exp(b)) @ (y * exp(-b)).T under a causal mask,
is evaluated from its exponents, so strong gates give finite, accurate results (issue: gated exponentials
overflow). Checked with a spec written here (not in the library: an exclusive decay read strictly, a gate
computed in the spec) against a token-by-token float64 reference, and on the library's gla."""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

import effc
from effc.compiler import compile_text
from effc.ir.printer import print_op

# o_t = q_t^T S_{t-1} (the state before token t), S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, g = 4 logsigmoid(a)
SPEC = """
spec read_before {
  input q: [B, T, H, K]
  input k: [B, T, H, K]
  input v: [B, T, H, V]
  input a: [B, T, H, K]
  output o: [B, T, H, V]
  state S: [K, V]
  chunk 16
  intra {
    g = logsigmoid(a) * GAIN
    b = cumsum(g)
    qp = q * exp(b - g)
    kh = k * exp(-b)
    o_intra = strict(qp @ kh.T) @ v
  }
  merge { o = o_intra + qp @ S }
  inter {
    bl = last(b)
    S = S * exp(bl)[:, None] + (k * exp(bl[None, :] - b)).T @ v
  }
}
"""


def _spec(gain: str = "4.0", gate: str = "logsigmoid(a)") -> str:
    return SPEC.replace("logsigmoid(a) * GAIN", f"{gate} * {gain}")


def naive(q, k, v, a, gain=4.0):
    q, k, v, a = (x.double() for x in (q, k, v, a))
    g = F.logsigmoid(a) * gain
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1])
    out = []
    for t in range(T):
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
        S = g[:, t].exp()[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
    return torch.stack(out, 1), S


def _typed_ops(text: str) -> list[str]:
    return [print_op(op) for st in compile_text(textwrap.dedent(text)).typed.stages for op in st.ops]


def test_factored_decay_becomes_decay_dot():
    ops = _typed_ops(_spec())
    # exponents b - g (exclusive, read strictly: diag 0.0) and -b; the exp factors are taken off q and k
    # and the centre, half the chunk's cumulative decay, an IR value CSE shares with the state update
    assert ops[3:13] == ["_4 : [C, K] = sub(b, g)", "_5 : [C, K] = exp(_4)", "qp : [C, K] = mul(q, _5)",
                         "_7 : [C, K] = neg(b)", "_dd1 : [K] = last(b)", "_dd2 : [K] = mul(_dd1, 0.5)",
                         "_11 : [C, C] = decay_dot(q, k, _4, _7, 0.0, _dd2)",
                         "_12 : [C, C] = strict(_11)", "o_intra : [C, V] = matmul(_12, v)",
                         "_14 : [C, V] = matmul(qp, S)"], ops
    # the factored key operand and its transpose are gone; qp stays for merge's qp @ S
    assert not any(o.startswith(("kh ", "_8 ", "_9 ", "_10 ")) for o in ops)


def test_unproved_gate_keeps_the_matmul():
    """A gate of unknown sign may make exp(b) the large factor: nothing is proved, nothing is rewritten."""
    ops = _typed_ops(_spec(gate="a", gain="1.0"))
    assert not any("decay_dot" in o for o in ops) and any("matmul(qp" in o for o in ops)


def test_exclusive_decay_read_causally_is_not_rewritten():
    """With the diagonal kept, exp(b - g) * exp(-b) = exp(-g_i) >= 1 is not bounded: left as written."""
    ops = _typed_ops(_spec().replace("strict(qp @ kh.T)", "causal(qp @ kh.T)"))
    assert not any("decay_dot" in o for o in ops)


def test_plan_shows_where_it_applied():
    text = effc.loads(_spec()).comp.plan
    assert "decay_dot(" in str(text) and "decay_mm(" in str(text) and "decay_mm_t(" in str(text)


def _inputs(T, strength, seed=0, B=1, H=2, K=16, V=16):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, d, generator=gen) for d in (K, K, V))
    a = torch.randn(B, T, H, K, generator=gen) * 2 - strength  # logsigmoid(a) * 4: about -4 * strength per token
    return q, k, v, a


@pytest.mark.parametrize("T,strength", [(45, 0.0), (45, 6.0), (33, 25.0)])
def test_strong_gates_forward_and_gradients(T, strength):
    """Mild gates take the factored path, strong ones (chunk decay far past e^-88) the anchored one; both
    match the float64 reference to fp32 accuracy, T not a multiple of the chunk."""
    op = effc.loads(_spec())
    xs = [x.requires_grad_() for x in _inputs(T, strength)]
    o, final = op(*xs, output_final_state=True)
    ref, ref_final = naive(*xs)
    assert torch.isfinite(o).all()
    rms = lambda a, b: ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()
    assert rms(o, ref) < 1e-5 and rms(final, ref_final) < 1e-5
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, xs, do)
    want = torch.autograd.grad(ref, xs, do.double())
    # strong gates leave da ~0 (every cross-token term ~e^-100) while its terms are O(1) and cancel: judge
    # each gradient against the larger of its own size and dv's
    scale = want[2].norm()
    for name, g, w in zip(["q", "k", "v", "a"], got, want):
        assert torch.isfinite(g).all(), name
        err = ((g.double() - w).norm() / torch.maximum(w.norm(), scale)).item()
        assert err < 1e-4, (name, err)


def test_varlen_with_an_empty_sequence_and_strong_gates():
    op = effc.loads(_spec())
    q, k, v, a = _inputs(40, 8.0)
    cu = torch.tensor([0, 17, 17, 40])
    o, _ = op(q, k, v, a, cu_seqlens=cu)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e > s:
            ref, _ = naive(*(x[:, s:e] for x in (q, k, v, a)))
            assert ((o[:, s:e].double() - ref).norm() / ref.norm()).item() < 1e-5


def test_oracle_is_finite_where_the_factored_form_is_not():
    """effc's own oracle evaluates the rewritten IR pair by pair: finite and equal to the reference."""
    op = effc.loads(_spec())
    xs = _inputs(33, 25.0)
    o, _ = op.reference(*xs)
    ref, _ = naive(*xs)
    assert torch.isfinite(o).all() and ((o.double() - ref).norm() / ref.norm()).item() < 1e-6
