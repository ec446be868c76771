"""The TileLang programs' arithmetic, run on the CPU by tests/tilelang_emulator.py (no GPU, no TileLang
compile): decay_dot's two evaluations (the centred gemm for columns whose decay span fits the gemm dtype,
pair by pair for the others) against the spec-derived fp64 oracle and the hand-written token-by-token
references of tests/naive.py, with ragged chunks, several segments, packed sequences with an empty one,
fp16 (whose range sends ordinary gates to the pairwise path) and one decay per token ([C, 1] exponents)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import effc
import naive
from tilelang_emulator import emulated_forward

# swax's state branch alone (a scalar gate per token and head): decay_dot with [C, 1] exponents
SCALAR_GATE = """
spec scalar_gate_factored {
  input q: [B, T, H, K]
  input k: [B, T, H, K]
  input v: [B, T, H, V]
  input g: [B, T, H] logdecay
  output o: [B, T, H, V]
  state S: [K, V]
  param scale = K ** -0.5
  chunk 32
  intra {
    b = cumsum(g)
    qd = q * exp(b)[:, None] * scale
    o_intra = causal(qd @ (k * exp(-b)[:, None]).T) @ v
  }
  merge { o = o_intra + qd @ S }
  inter {
    bl = last(b)
    S = S * exp(bl) + (k * exp(bl - b)[:, None]).T @ v
  }
}
"""
K = 16


def _inputs(B, T, H, gain, per_channel=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, K, generator=gen) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, T, H, *((K,) if per_channel else ()), generator=gen)) * gain
    return q, k, v, g


def _max_span(g, chunk):
    """The widest range of the cumulative log decay over one chunk (what decides gemm vs pairs)."""
    T = g.shape[1]
    return max((g[:, c:c + chunk].cumsum(1).amax(1) - g[:, c:c + chunk].cumsum(1).amin(1)).max().item()
               for c in range(0, T, chunk))


def _close(got, want, tol):
    err = (got.double() - want).abs().max().item() / want.abs().max().item()
    assert err < tol, f"relative error {err:.2e} >= {tol}"


@pytest.mark.parametrize("gain, path", [(1.0, "gemm"), (16.0, "pairs")])
def test_gla_decay_dot_fp32(gain, path):
    op = effc.load("gla")
    q, k, v, g = _inputs(1, 80, 2, gain)  # 80 = 2.5 chunks of 32: the last is ragged
    span = _max_span(g, 32)
    assert (span <= 80.0) == (path == "gemm"), f"span {span:.0f}: the case does not reach the {path} path"
    s0 = torch.randn(1, 2, K, K)
    o, s = emulated_forward(op, (q, k, v, g), initial_state=s0)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    ref, ref_s = op.reference(q, k, v, g, initial_state=s0, output_final_state=True)
    hand, hand_s = naive.gla(q, k, v, g, initial_state=s0)
    for want, want_s in ((ref, ref_s), (hand, hand_s)):
        _close(o, want, 1e-5)
        _close(s, want_s, 1e-5)


def test_gla_fp16_mixes_gemm_and_pairwise_columns_over_segments():
    """fp16 holds e^7 factors only: ordinary gates put some columns of a chunk on each path. Two segments:
    the summary kernel runs and the walk folds it."""
    op = effc.load("gla")
    q, k, v, g = _inputs(1, 96, 1, 0.6, seed=1)
    assert _max_span(g, 32) > 14.0
    o, s = emulated_forward(op, tuple(x.half() for x in (q, k, v, g)), segments=2)
    assert torch.isfinite(o).all()
    want, want_s = naive.gla(*(x.half() for x in (q, k, v, g)))
    _close(o, want, 2e-2)
    _close(s, want_s, 2e-2)


def test_hgrn2_strong_gates_packed_with_an_empty_sequence():
    op = effc.load("hgrn2")
    q, _, _, g = _inputs(1, 70, 1, 24.0, seed=2)
    v = torch.randn(1, 70, 1, K, generator=torch.Generator().manual_seed(3))
    cu = torch.tensor([0, 37, 37, 70], dtype=torch.int32)
    o, _ = emulated_forward(op, (q, v, g), cu_seqlens=cu)
    assert torch.isfinite(o).all()
    want = torch.cat([naive.hgrn2(q[:, a:b], v[:, a:b], g[:, a:b])[0] for a, b in ((0, 37), (37, 70))], 1)
    _close(o, want, 1e-5)
    _close(o, op.reference(q, v, g, cu_seqlens=cu)[0], 1e-5)


@pytest.mark.parametrize("gain", [1.0, 40.0])
def test_one_decay_per_token(gain):
    op = effc.loads(SCALAR_GATE)
    walk = op.comp.plan.kernel("walk")
    dd = [o for o in walk.ops if o.kind == "decay_dot"]
    assert dd and walk.types(op.spec)[dd[0].args[2]].shape[1] == 1, "expected decay_dot with [C, 1] exponents"
    q, k, v, g = _inputs(2, 75, 1, gain, per_channel=False, seed=4)
    o, s = emulated_forward(op, (q, k, v, g))
    assert torch.isfinite(o).all()
    want, want_s = naive.simple_gla(q, k, v, g)
    _close(o, want, 1e-5)
    _close(s, want_s, 1e-5)
    _close(o, op.reference(q, k, v, g)[0], 1e-5)
