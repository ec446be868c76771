"""The serial kernels' own block of the split dim (TileConfig.walk_block): a general transition's walk and
adjoint scan run in narrower blocks than the chunk-parallel kernels when their programs leave the GPU idle.
The kernels (interpreter, fp32) with the serial block narrower than the main one against the same call with
both equal, the oracle (autograd through it) and the naive float64 recurrences; the model's choice at long
and short T; the knob's errors."""
import pytest
import torch

import effc
from effc.errors import ArgumentError, SpecError
from effc.policy.tiling import Problem, choose
from effc.runtime.launch import Launcher
from effc.runtime.verify import judge_fp32, random_inputs, random_state

from naive import NAIVE
from op_calls import as_tuple, assert_fp32_close, assert_matches_oracle_and_naive, outputs_and_grads

# a delta rule with a key normaliser: a general transition (not segmentable) and a state without V, whose
# adjoint the scan keeps per V block; written here, not in the library
HIDDEN = """
spec delta_norm {
  input q: [B, T, H, K] unitnorm
  input k: [B, T, H, K] unitnorm
  input v: [B, T, H, V]
  input beta: [B, T, H] unit
  output o: [B, T, H, V]
  state S: [K, V]
  state z: [K]
  param scale = K ** -0.5
  chunk 16

  intra {
    qn = q * scale
    kb = k * beta[:, None]
    t = unit_lower_inv(kb @ k.T)
    w = t @ kb
    u = t @ (v * beta[:, None])
    A = causal(qn @ k.T)
  }
  merge {
    den = 1 + abs(rowsum(qn * z[None, :]) + rowsum(A))
    o = (qn @ S + A @ (u - w @ S)) / den[:, None]
  }
  inter {
    S = S + k.T @ (u - w @ S)
    z = z + colsum(k)
  }
}
"""


def delta_norm(q, k, v, beta, initial_state=None):
    """S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, z_t = z_{t-1} + k_t,
    o_t = (s q_t)^T S_t / (1 + |(s q_t) . z_t|), s = K^-1/2; token by token, float64."""
    q, k, v, beta = (x.double() for x in (q, k, v, beta))
    B, T, H, K = q.shape
    if initial_state is None:
        S, z = q.new_zeros(B, H, K, v.shape[-1]), q.new_zeros(B, H, K)
    else:
        S, z = (x.double().clone() for x in initial_state)
    out = []
    for t in range(T):
        kt, bt = k[:, t], beta[:, t, :, None, None]
        S = S - bt * kt[..., :, None] * torch.einsum("bhk,bhkv->bhv", kt, S)[..., None, :]
        S = S + bt * kt[..., :, None] * v[:, t, :, None, :]
        z = z + kt
        qs = q[:, t] * K ** -0.5
        den = 1 + torch.einsum("bhk,bhk->bh", qs, z).abs()
        out.append(torch.einsum("bhk,bhkv->bhv", qs, S) / den[..., None])
    return torch.stack(out, 1), (S, z)


def _load(name):
    return effc.loads(HIDDEN) if name == "delta_norm" else effc.load(name)


def _naive(name):
    return delta_norm if name == "delta_norm" else NAIVE[name]


# V=32 in blocks of 32: the serial kernels run 2 blocks of 16 in one main block; V=48: 3 serial blocks of 16
# against 2 main blocks of 32 (the last one half masked), so the scan's per-block adjoints of states
# without V are summed into the main blocks with an empty serial block padding the last
@pytest.mark.parametrize("name,V", [("delta_net", 32), ("gated_delta_net", 32), ("mlstm", 48), ("delta_norm", 48)])
def test_narrow_walk_block_matches_wide_and_oracle(name, V, monkeypatch):
    op = _load(name)
    grids = []  # (kernel role, programs along V) of each launch
    launch = Launcher._launch
    monkeypatch.setattr(Launcher, "_launch", lambda self, kp, grid, *a: (grids.append((kp.role, grid[0])),
                                                                         launch(self, kp, grid, *a))[1])
    assert not op.comp.legality.segmentable  # a general transition: the walk's block is free
    dims = {"K": 16, "V": V}
    B, T, H = 2, 45, 2  # T = 45 at chunk 16: a partial last chunk
    xs = [x.requires_grad_() for x in random_inputs(op.spec, B, T, H, dims, seed=1)]
    s0 = tuple(s.requires_grad_() for s in as_tuple(random_state(op.spec, B, H, dims)))
    s0 = s0 if len(s0) > 1 else s0[0]
    d_o = torch.randn(B, T, H, V)
    d_s = [torch.randn(s.shape) for s in as_tuple(s0)]

    narrow = outputs_and_grads(op, xs, s0, d_o, d_s, chunk=16, block=32, walk_block=16)
    assert op.last_config.block == 32 and op.last_config.walk_block == 16
    serial, parallel = -(-V // 16), -(-V // 32)
    # bwd_inject has no serial dependence: the main block, unless it injects into a state without V (its
    # per-block terms are laid out by the scan's blocks)
    injected = {s for kp in op.comp.plan.kernels if kp.role == "bwd_scan" for s, _ in kp.injected}
    inject = parallel if all("V" in op.spec.decl(s).feature_dims for s in injected) else serial
    injects = any(kp.role == "bwd_inject" for kp in op.comp.plan.kernels)  # state-sized or per-token terms
    assert {r: n for r, n in grids if r in ("walk", "bwd_scan", "bwd_inject", "out")} == {
        "walk": serial, "bwd_scan": serial, "out": parallel, **({"bwd_inject": inject} if injects else {})}, grids
    assert {n for r, n in grids if r == "bwd_chunks"} <= {1, parallel}  # 1: a kernel looping over the blocks
    wide = outputs_and_grads(op, xs, s0, d_o, d_s, chunk=16, block=32, walk_block=32)
    assert op.last_config.serial_block == 32
    assert_fp32_close(op.spec, narrow, wide, "walk_block=block")
    assert_matches_oracle_and_naive(op, narrow, _naive(name), xs, s0, d_o, d_s)


def test_narrow_walk_block_varlen_with_an_empty_sequence():
    """Packed sequences (one token, shorter than a chunk, empty, partial) through narrow serial blocks."""
    op = _load("delta_norm")
    cu = [0, 1, 9, 9, 30]
    dims = {"K": 16, "V": 48}
    xs = random_inputs(op.spec, 1, cu[-1], 2, dims, seed=4)
    s0 = tuple(torch.cat([s] * 2) for s in random_state(op.spec, 2, 2, dims))
    o, finals = op(*xs, initial_state=s0, output_final_state=True, cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                   chunk=16, block=32, walk_block=16)
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        init = tuple(s[i:i + 1] for s in s0)
        n_o, n_s = delta_norm(*[x[:, a:b] for x in xs], initial_state=init) if b > a else (None, init)
        if n_o is not None:
            assert judge_fp32(o[:, a:b], n_o).ok, (i, judge_fp32(o[:, a:b], n_o))
        for f, r in zip(finals, n_s):
            assert judge_fp32(f[i:i + 1], r).ok, (i, judge_fp32(f[i:i + 1], r))


def _choice(name, B, T, H=16, D=128, **knobs):
    op = effc.load(name)
    return choose(op.spec, op.comp.legality, Problem(B, T, H, tuple((d, D) for d in sorted(op.spec.dims))), **knobs)


def test_model_narrows_the_walk_only_when_its_programs_leave_the_gpu_idle():
    # 1 x 16 heads x 2 blocks of 64 = 32 walk programs for 264 slots: narrower blocks, as narrow as runs right
    # (mlstm's C=64: Triton 3.6 miscompiles narrow serial kernels there, on the H200 at 32 too: tiling's
    # NARROW_FAULT_MIN_BLOCK)
    long_delta = _choice("gated_delta_net", 1, 32768, chunk=32)
    assert (long_delta.chunk, long_delta.block, long_delta.walk_block) == (32, 64, 16)
    assert any("walk and adjoint scan in blocks of 16" in r and "32 programs" in r for r in long_delta.reasons)
    long_mlstm = _choice("mlstm", 1, 32768)
    assert (long_mlstm.chunk, long_mlstm.block, long_mlstm.serial_block) == (64, 64, 64)
    # at C=64 a plan whose states all have the split dim narrows to 32, no further (Triton's narrow-block
    # miscompile); mlstm's above holds states without it (n: [K], m: []), which faulted at 32
    assert _choice("gated_delta_net", 2, 8192).serial_block == 32
    assert _choice("gated_delta_net", 1, 32768).serial_block == 32
    # 8 x 16 x 2 = 256 programs: one wave already, a narrower block would need two
    short = _choice("gated_delta_net", 8, 2048, chunk=32)
    assert short.walk_block == short.block == 64
    assert any("would need more waves" in r for r in short.reasons)
    # a segmentable walk: its segments fill the GPU, the serial kernels keep the block
    gla = _choice("gla", 1, 32768)
    assert gla.walk_block == 0 and gla.serial_block == gla.block and gla.segments > 1
    # the block given narrower: the walk's never wider
    assert _choice("gated_delta_net", 1, 32768, block=32, chunk=32).walk_block == 16
    assert _choice("gated_delta_net", 1, 32768, block=16, chunk=32).walk_block == 16


def test_walk_block_knob_errors():
    op = effc.load("delta_net")
    dims = {"K": 16, "V": 32}
    xs = random_inputs(op.spec, 1, 20, 1, dims)
    with pytest.raises(ArgumentError, match="walk_block must be a power of two >= 16, got 24"):
        op(*xs, walk_block=24)
    with pytest.raises(SpecError, match="walk_block=32 is wider than block=16"):
        op(*xs, block=16, walk_block=32)
    gla = effc.load("gla")
    with pytest.raises(SpecError, match="segmentable walk"):
        gla(*random_inputs(gla.spec, 1, 20, 1, dims), block=32, walk_block=16)
    # the model's own choice obeys both, and one equal to the block is always accepted
    assert _choice("gla", 1, 32768, walk_block=64).serial_block == 64
