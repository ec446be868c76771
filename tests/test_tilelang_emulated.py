"""The TileLang programs' arithmetic, run on the CPU by tests/tilelang_emulator.py (no GPU, no TileLang
compile): decay_dot's two evaluations (the centred gemm for columns whose decay span fits the gemm dtype,
pair by pair for the others) against the spec-derived fp64 oracle and the hand-written token-by-token
references of tests/naive.py, with ragged chunks, several segments, packed sequences with an empty one,
fp16 (whose range sends ordinary gates to the pairwise path) and one decay per token ([C, 1] exponents);
feature dims that are not powers of two (tiles of the padded size, masked columns), with a feature map that
is 1 on padded columns (elu(0) + 1), so an unmasked sum over features would show in the output."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import effc
import naive
from tilelang_emulator import EmulatedLauncher, emulated_forward

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


# -- feature dims that are not powers of two ------------------------------------------------------------------
# elu(x) + 1 is 1 on a padded column (inputs read 0 there), so the state S and the normaliser z carry padding
# of their own (sums of v, token counts): a gemm, matvec or colsum over features that let a padded column
# through would add it to every output. Two states, rowsum, colsum and a matvec (qf @ z[:, None]).
from test_new_specs import NORMALIZED  # noqa: E402  (elu(x)+1 linear attention with its normaliser)

# the same normaliser as a sum over the feature axis (T.reduce_sum over K, not a matvec)
NORMALIZED_ROWSUM = NORMALIZED.replace("spec normalized_linear", "spec normalized_rowsum").replace(
    "qf @ z[:, None]", "rowsum(qf * z[None, :])[:, None]")


def _normalized_by_hand(q, k, v):
    """Katharopoulos et al. eq. 5, token by token: o_t = sum_s<=t phi(q_t).phi(k_s) v_s / sum_s<=t phi(q_t).phi(k_s)."""
    phi = (lambda x: F.elu(x.double()) + 1)
    qf, kf, v = phi(q), phi(k), v.double()
    B, T, H, K = q.shape
    S, z, out = qf.new_zeros(B, H, K, v.shape[-1]), qf.new_zeros(B, H, K), []
    for t in range(T):
        S = S + kf[:, t, :, :, None] * v[:, t, :, None, :]
        z = z + kf[:, t]
        out.append(torch.einsum("bhk,bhkv->bhv", qf[:, t], S) / torch.einsum("bhk,bhk->bh", qf[:, t], z)[..., None])
    return torch.stack(out, 1), S


def _qkv(B, T, H, K, V, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen),
            torch.randn(B, T, H, V, generator=gen), gen)


def _ran_masked(launcher, dims):
    """The masked program ran (its tiles are padded), and it is not the plain one."""
    want = frozenset(dims)
    assert want in launcher.sources, f"no program with masked dims {sorted(want)} ran: {list(launcher.sources)}"
    assert launcher.sources[want] != launcher.sources[frozenset()]


# (K, V, block): 48 is a 64-column tile; V = 48 in blocks of 32 leaves the second block half masked; 96 is a
# 128-column tile (V = 96 splits into 16-column blocks exactly: no split mask)
PADDED = [(48, 48, 32), (96, 96, 16)]


@pytest.mark.parametrize("K_, V, block", PADDED, ids=["48", "96"])
def test_gla_padded_dims_over_segments(K_, V, block):
    op = effc.load("gla")
    q, k, v, gen = _qkv(1, 45, 2, K_, V, 5)  # 45: the last chunk is ragged
    g = F.logsigmoid(torch.randn(1, 45, 2, K_, generator=gen))
    s0 = torch.randn(1, 2, K_, V, generator=gen)
    launcher = EmulatedLauncher(op.spec, op.comp.plan)
    o, s = emulated_forward(op, (q, k, v, g), initial_state=s0, block=block, segments=2, launcher=launcher)
    _ran_masked(launcher, {"K", "V"} if V % block else {"K"})
    assert o.shape == v.shape and s.shape == s0.shape
    ref, ref_s = op.reference(q, k, v, g, initial_state=s0, output_final_state=True)
    hand, hand_s = naive.gla(q, k, v, g, initial_state=s0)
    for want, want_s in ((ref, ref_s), (hand, hand_s)):
        _close(o, want, 1e-5)
        _close(s, want_s, 1e-5)


@pytest.mark.parametrize("K_, V, block", PADDED, ids=["48", "96"])
def test_retention_padded_dims(K_, V, block):
    op = effc.load("retention")
    q, k, v, gen = _qkv(2, 75, 2, K_, V, 6)  # chunk 64: one whole chunk and a ragged one
    launcher = EmulatedLauncher(op.spec, op.comp.plan)
    o, s = emulated_forward(op, (q, k, v), block=block, launcher=launcher)
    _ran_masked(launcher, {"K", "V"} if V % block else {"K"})
    hand, hand_s = naive.retention(q, k, v)
    _close(o, hand, 1e-5)
    _close(s, hand_s, 1e-5)
    _close(o, op.reference(q, k, v)[0], 1e-5)


@pytest.mark.parametrize("text", [NORMALIZED, NORMALIZED_ROWSUM], ids=["matvec", "rowsum"])
@pytest.mark.parametrize("K_, V, block", PADDED + [(60, 100, 64)], ids=["48", "96", "60x100"])
def test_feature_map_nonzero_on_padding_stays_out_of_real_columns(K_, V, block, text):
    op = effc.loads(text)
    if text is NORMALIZED_ROWSUM:
        assert any(o.kind == "rowsum" and op.comp.plan.kernel("walk").types(op.spec)[o.args[0]].shape[1] != 1
                   for o in op.comp.plan.kernel("walk").ops), "expected a rowsum over the feature axis"
    q, k, v, _ = _qkv(1, 37, 2, K_, V, 7)
    launcher = EmulatedLauncher(op.spec, op.comp.plan)
    o, s = emulated_forward(op, (q, k, v), block=block, segments=2, launcher=launcher)
    _ran_masked(launcher, {"K", "V"} if V % block else {"K"})
    hand, hand_s = _normalized_by_hand(q, k, v)
    _close(o, hand, 1e-5)
    _close(s, hand_s, 1e-5)
    _close(o, op.reference(q, k, v)[0], 1e-5)


@pytest.mark.parametrize("K_, V", [(48, 96), (96, 48)])
def test_padded_dims_packed_with_an_empty_sequence(K_, V):
    op = effc.load("gla")
    q, k, v, gen = _qkv(1, 61, 1, K_, V, 8)
    g = F.logsigmoid(torch.randn(1, 61, 1, K_, generator=gen)) * 4.0  # strong gates: pairwise columns too
    cu = torch.tensor([0, 30, 30, 61], dtype=torch.int32)
    o, s = emulated_forward(op, (q, k, v, g), cu_seqlens=cu, block=32)
    assert torch.isfinite(o).all()
    parts = [naive.gla(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b]) for a, b in ((0, 30), (30, 61))]
    _close(o, torch.cat([p[0] for p in parts], 1), 1e-5)
    assert (s[1] == 0).all(), "the empty sequence's final state is its (zero) initial state"
    _close(s[0::2], torch.cat([p[1] for p in parts], 0), 1e-5)
    _close(o, op.reference(q, k, v, g, cu_seqlens=cu)[0], 1e-5)
