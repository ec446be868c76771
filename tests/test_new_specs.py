"""Mechanisms that are not in library/: written here as .attn text, they must compile to kernels
that match their oracle and a naive recurrence, with no new Python in effc."""
import torch
import torch.nn.functional as F

import effc
from effc.runtime.verify import judge_fp32, max_err, random_inputs, random_state

from naive import diagonal_recurrence, retention

GLA_FEATURE_MAP = """
# GLA with a softplus feature map on q and k
spec gla_softplus {
  input q: [B, T, H, K]
  input k: [B, T, H, K]
  input v: [B, T, H, V]
  input g: [B, T, H, K] logdecay
  output o: [B, T, H, V]
  state S: [K, V]
  param scale = K ** -0.5
  chunk 16
  intra {
    b = cumsum(g)
    qf = softplus(q)
    kf = softplus(k)
    qd = qf * exp(b) * scale
    o_intra = causal(qd @ (kf * exp(-b)).T) @ v
  }
  merge { o = o_intra + qd @ S }
  inter {
    bl = last(b)
    S = S * exp(bl)[:, None] + (kf * exp(bl[None, :] - b)).T @ v
  }
}
"""

GATED_RETENTION = """
import "retention.attn"
# retention whose output passes through a sigmoid gate r (a new input)
spec gated_retention extends retention {
  input r: [B, T, H, V]
  merge { o = (o_intra + (qs * exp(b)[:, None]) @ S) * sigmoid(r) }
}
"""

NORMALIZED = """
# linear attention with the normaliser of Katharopoulos et al. (eq. 5), feature map elu(x)+1
def elu1(x) = relu(x) + exp(minimum(x, 0))
spec normalized_linear {
  input q: [B, T, H, K]
  input k: [B, T, H, K]
  input v: [B, T, H, V]
  output o: [B, T, H, V]
  state S: [K, V]
  state z: [K]
  chunk 16
  intra {
    qf = elu1(q)
    kf = elu1(k)
    A = causal(qf @ kf.T)
    num = A @ v
    den = rowsum(A)
  }
  merge { o = (num + qf @ S) / (den[:, None] + qf @ z[:, None]) }
  inter {
    S = S + kf.T @ v
    z = z + colsum(kf)
  }
}
"""


def _inputs(op, T=37, B=2, H=2, seed=0):
    dims = {"K": 16, "V": 32}
    return random_inputs(op.spec, B, T, H, dims, seed=seed), random_state(op.spec, B, H, dims)


def _check_kernel(op, xs, s0, naive_out, naive_state=None):
    for segments in (1, 2):
        o, s = op(*xs, initial_state=s0, output_final_state=True, segments=segments)
        ref, ref_s = op.reference(*xs, initial_state=s0, output_final_state=True)
        assert judge_fp32(o, ref).ok, judge_fp32(o, ref)
        assert judge_fp32(o, naive_out).ok
        if naive_state is not None:
            assert judge_fp32(s, naive_state).ok


def test_gla_with_feature_map():
    op = effc.loads(GLA_FEATURE_MAP)
    (q, k, v, g), s0 = _inputs(op)
    n, ns = diagonal_recurrence(F.softplus(q), F.softplus(k), v, g.exp(), 16 ** -0.5, s0)
    _check_kernel(op, [q, k, v, g], s0, n, ns)


def test_retention_with_sigmoid_output_gate(tmp_path):
    spec = tmp_path / "gated.attn"
    spec.write_text(GATED_RETENTION)  # imports retention.attn from the library
    op = effc.load(spec)
    assert [d.name for d in op.spec.inputs] == ["q", "k", "v", "r"]
    (q, k, v, r), s0 = _inputs(op)
    n, ns = retention(q, k, v, s0)
    _check_kernel(op, [q, k, v, r], s0, n * torch.sigmoid(r.double()), ns)


def test_two_states_with_normaliser():
    op = effc.loads(NORMALIZED)
    assert op.comp.legality.segmentable and op.comp.legality.split_dims == ("V",)
    (q, k, v), _ = _inputs(op)
    qf, kf = (F.elu(x.double()) + 1 for x in (q, k))
    S = torch.cumsum(kf[..., :, None] * v.double()[..., None, :], 1)  # (B, T, H, K, V)
    z = torch.cumsum(kf, 1)
    n = torch.einsum("bthk,bthkv->bthv", qf, S) / torch.einsum("bthk,bthk->bth", qf, z)[..., None]
    for segments in (1, 3):
        o, (s_S, s_z) = op(q, k, v, output_final_state=True, segments=segments, block=16)
        assert judge_fp32(o, n).ok, judge_fp32(o, n)
        assert max_err(s_z, z[:, -1]) < 1e-4 * z.abs().max().item()
        assert max_err(s_S, S[:, -1]) < 1e-4 * S.abs().max().item()


GATED_DELTA_OUTPUT = """
import "delta_net.attn"
# the delta rule with a sigmoid output gate r (a new input that only merge reads)
spec delta_gated_output extends delta_net {
  input r: [B, T, H, V]
  chunk 16
  merge { o = (qn @ S + causal(qn @ kn.T) @ (u - w @ S)) * sigmoid(r) }
}
"""


def test_delta_rule_with_sigmoid_output_gate(tmp_path):
    """A general transition from a spec not in the library: prep (the UT inverse, w, u), the walk (which
    skips the gate's load when merge is deferred), out and bwd_inject, against the naive delta rule."""
    from naive import delta_net
    spec = tmp_path / "delta_gate.attn"
    spec.write_text(GATED_DELTA_OUTPUT)
    op = effc.load(spec)
    assert [k.name for k in op.comp.plan.kernels][:3] == ["prep", "walk", "out"]
    (q, k, v, beta, r), s0 = _inputs(op)
    n, ns = delta_net(q, k, v, beta, s0)
    n = n * torch.sigmoid(r.double())
    leaves = [x.requires_grad_() for x in (q, k, v, beta, r)]
    d_o = torch.randn(n.shape)
    for defer in (True, False):
        o, s = op(*leaves, initial_state=s0, output_final_state=True, defer_merge=defer)
        assert judge_fp32(o, n).ok and judge_fp32(s, ns).ok, (defer, judge_fp32(o, n))
        g = torch.autograd.grad(o, leaves, d_o)
        ref_g = torch.autograd.grad(op.reference(*leaves, initial_state=s0)[0], leaves, d_o.double())
        for x, a, b in zip("q k v beta r".split(), g, ref_g):
            assert judge_fp32(a, b).ok, f"d{x} (defer_merge={defer}): {judge_fp32(a, b)}"
