"""A coarse walk refined in finer chunks (TileConfig.walk_chunk): the serial walk updates the state in chunks
of walk_chunk and keeps that history; each coarse chunk is walked again in chunks of `chunk`, in parallel,
from the state entering it, for the outputs (and, in the backward, for the fine history). Kernels under the
interpreter (fp32) against the same call without a coarse walk, the oracle and the naive float64
recurrences; the launches it makes and the history it keeps; the knob's errors."""
import pytest
import torch

import effc
from effc.errors import ArgumentError, SpecError
from effc.runtime.launch import Launcher
from effc.runtime.verify import judge_fp32, random_inputs, random_state

from naive import NAIVE
from op_calls import as_tuple, assert_fp32_close, assert_matches_oracle_and_naive, outputs_and_grads

# not in the library: a general transition (a decayed delta rule with a per-token output gate), so the
# walk is not segmentable and the refined walk is the only parallel one over the tokens
HIDDEN = """
spec gated_delta_gate {
  input q: [B, T, H, K] unitnorm
  input k: [B, T, H, K] unitnorm
  input v: [B, T, H, V]
  input beta: [B, T, H] unit
  input g: [B, T, H] logdecay
  output o: [B, T, H, V]
  state S: [K, V]
  param scale = K ** -0.5
  chunk 16

  intra {
    b = cumsum(g)
    kb = k * beta[:, None]
    d = exp(causal(b[:, None] - b[None, :], -inf))
    t = unit_lower_inv((kb @ k.T) * d)
    w = t @ (kb * exp(b)[:, None])
    u = t @ (v * beta[:, None])
    A = (q @ k.T) * d * scale
    qd = q * exp(b)[:, None] * scale
  }
  merge {
    o = (qd @ S + A @ (u - w @ S)) * sigmoid(rowsum(q))[:, None]
  }
  inter {
    kd = k * exp(last(b) - b)[:, None]
    S = S * exp(last(b)) + kd.T @ (u - w @ S)
  }
}
"""


def gated_delta_gate(q, k, v, beta, g, initial_state=None):
    """S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, a_t = exp(g_t);
    o_t = sigmoid(sum(q_t)) (s q_t)^T S_t, s = K^-1/2; token by token, float64."""
    q, k, v, beta, g = (x.double() for x in (q, k, v, beta, g))
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.double().clone()
    out = []
    for t in range(T):
        kt, bt = k[:, t], beta[:, t, :, None, None]
        S = S * g[:, t].exp()[..., None, None]
        S = S - bt * kt[..., :, None] * torch.einsum("bhk,bhkv->bhv", kt, S)[..., None, :]
        S = S + bt * kt[..., :, None] * v[:, t, :, None, :]
        o = torch.einsum("bhk,bhkv->bhv", q[:, t] * K ** -0.5, S)
        out.append(o * torch.sigmoid(q[:, t].sum(-1))[..., None])
    return torch.stack(out, 1), S


def _load(name):
    return effc.loads(HIDDEN) if name == "gated_delta_gate" else effc.load(name)


def _naive(name):
    return gated_delta_gate if name == "gated_delta_gate" else NAIVE[name]


@pytest.fixture
def launches(monkeypatch):
    """(kernel name, grid, chunk, FROM_COARSE) of every launch."""
    seen = []
    launch = Launcher._launch
    monkeypatch.setattr(Launcher, "_launch", lambda self, kp, grid, values, *a: (
        seen.append((kp.name, grid, values["C"], values.get("FROM_COARSE"))), launch(self, kp, grid, values, *a))[1])
    return seen


# mlstm_sig and retention: diagonal walks (the coarse walk in segments); mlstm, delta_net and the hidden
# spec: general ones (delta_net's prep runs at both chunk lengths); gla: factored decays, strong gates
@pytest.mark.parametrize("name,strong", [("gated_delta_gate", False), ("mlstm", False), ("delta_net", False),
                                         ("mlstm_sig", False), ("retention", False), ("gla", True)])
@pytest.mark.parametrize("save_states", [True, False])
def test_coarse_walk_matches_one_walk_and_oracle(name, strong, save_states, launches):
    op = _load(name)
    dims = {d: 16 for d in op.spec.dims}
    # at walk_chunk 32: two whole coarse chunks and a partial one of 13 tokens; one sequence of two heads (the
    # coarse history is per program, B * H of them; several sequences' offsets: the varlen test below)
    B, T, H = 1, 77, 2
    xs = [x.requires_grad_() for x in random_inputs(op.spec, B, T, H, dims, seed=2, strong_gates=strong)]
    s0 = tuple(s.requires_grad_() for s in as_tuple(random_state(op.spec, B, H, dims)))
    s0 = s0 if len(s0) > 1 else s0[0]
    gen = torch.Generator().manual_seed(5)
    d_o = torch.randn((B, T, H, dims["V"]), generator=gen)
    d_s = [torch.randn(s.shape, generator=gen) for s in as_tuple(s0)]

    coarse = outputs_and_grads(op, xs, s0, d_o, d_s, chunk=16, walk_chunk=32, save_states=save_states)
    assert (op.last_config.chunk, op.last_config.walk_chunk, op.last_config.serial_chunk) == (16, 32, 32)
    walks = [(g, c, f) for n, g, c, f in launches if n == "walk"]
    # the coarse walk (3 chunks of 32 a sequence), the refined one for the outputs (a program per coarse
    # chunk), and the backward's refined one for the fine history (with save_states=False the coarse walk
    # again first)
    assert walks[0][1:] == (32, False) and walks[1] == ((walks[1][0][0], B * H, 3), 16, True), walks
    assert walks[-1] == walks[1] and len(walks) == (3 if save_states else 4), walks
    assert not any(n == "out" for n, *_ in launches)
    launches.clear()
    one = outputs_and_grads(op, xs, s0, d_o, d_s, chunk=16, save_states=save_states)
    assert op.last_config.serial_chunk == 16 and all(c == 16 for n, _, c, _ in launches if n == "walk")
    assert_fp32_close(op.spec, coarse, one, "one walk")
    assert_matches_oracle_and_naive(op, coarse, _naive(name), xs, s0, d_o, d_s)


def test_coarse_walk_varlen_with_empty_and_short_sequences():
    """Packed sequences (one token, empty, shorter than a fine chunk, several coarse chunks with a partial
    last one): each sequence's coarse chunks start at its own offset in the coarse history."""
    op = _load("gated_delta_gate")
    cu = [0, 1, 1, 10, 81]
    dims = {"K": 16, "V": 16}
    xs = [x.requires_grad_() for x in random_inputs(op.spec, 1, cu[-1], 2, dims, seed=4)]
    s0 = torch.randn(len(cu) - 1, 2, 16, 16, generator=torch.Generator().manual_seed(6)).requires_grad_()
    cu_t = torch.tensor(cu, dtype=torch.int32)
    d_o = torch.randn(1, cu[-1], 2, 16, generator=torch.Generator().manual_seed(7))
    got, want = ([*op(*xs, initial_state=s0, output_final_state=True, cu_seqlens=cu_t, chunk=16, walk_chunk=w)]
                 for w in (32, None))
    g_got, g_want = (torch.autograd.grad([o], xs + [s0], [d_o]) for o in (got[0], want[0]))
    for a, b in zip([got[0], got[1], *g_got], [want[0], want[1], *g_want]):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        init = s0[i:i + 1].detach()
        n_o, n_s = gated_delta_gate(*[x[:, a:b].detach() for x in xs], initial_state=init) if b > a else (None, init)
        if n_o is not None:
            assert judge_fp32(got[0][:, a:b], n_o).ok, (i, judge_fp32(got[0][:, a:b], n_o))
        assert judge_fp32(got[1][i:i + 1], n_s).ok, (i, judge_fp32(got[1][i:i + 1], n_s))


def test_coarse_walk_keeps_the_coarse_history(monkeypatch):
    """What the forward keeps for the backward is the coarse walk's history: walk_chunk / chunk times fewer
    states (and the memory rule counts those)."""
    op = effc.load("mlstm")
    dims = {"K": 16, "V": 16}
    xs = [x.requires_grad_() for x in random_inputs(op.spec, 1, 128, 1, dims)]
    kept = {}
    forward = Launcher.forward

    def spy(self, cfg, *a, **kw):
        outs, finals, hist = forward(self, cfg, *a, **kw)
        if cfg.serial_chunk != cfg.chunk:
            kept.update({n: tuple(h.shape) for n, h in hist.items()})
        return outs, finals, hist

    monkeypatch.setattr(Launcher, "forward", spy)
    op(*xs, chunk=16, walk_chunk=64, save_states=True)
    assert kept == {"C": (2, 1, 16, 16), "n": (2, 1, 16), "m": (2, 1)}, kept


def test_walk_chunk_knob_errors():
    op = effc.load("delta_net")
    dims = {"K": 16, "V": 16}
    xs = random_inputs(op.spec, 1, 20, 1, dims)
    with pytest.raises(ArgumentError, match="walk_chunk must be a power of two >= 16, got 48"):
        op(*xs, walk_chunk=48)
    with pytest.raises(SpecError, match="walk_chunk=16 is shorter than chunk=32"):
        op(*xs, chunk=32, walk_chunk=16)
    with pytest.raises(SpecError, match="no out kernel to defer to"):
        op(*xs, chunk=16, walk_chunk=32, defer_merge=True)
    lion = effc.load("lion_s")
    with pytest.raises(SpecError, match="reverse state"):
        lion(*random_inputs(lion.spec, 1, 20, 1, dims), chunk=16, walk_chunk=32)
    # one equal to the chunk is no coarse walk
    op(*xs, chunk=16, walk_chunk=16)
    assert op.last_config.walk_chunk == 0 and op.last_config.serial_chunk == 16


def test_walk_chunk_is_not_lowered_by_tilelang():
    pytest.importorskip("tilelang")
    op = effc.load("retention", backend="tilelang")
    xs = random_inputs(op.spec, 1, 20, 1, {"K": 16, "V": 16})
    with pytest.raises(NotImplementedError, match="walk_chunk=32 .* runs on the Triton backend"):
        op(*xs, chunk=16, walk_chunk=32)


# ---- the search space and tuning ----------------------------------------------------------------------

def test_search_space_holds_coarse_walks_the_register_model_fits():
    """mLSTM's state update holds no [C, C] tile, so coarse walks of 256 survive the register model at D=128
    (every C = 256 config did not before); the delta rule's in-chunk inverse is [C, C] in its coarse walk too,
    which prunes 256 there. A backend without merge-free walks (TileLang) gets none."""
    from effc.policy.search import search_space
    from effc.policy.tiling import Problem

    problem = Problem(1, 32768, 16, (("K", 128), ("V", 128)))
    mlstm = effc.load("mlstm_sig")
    space = search_space(mlstm.spec, mlstm.comp.legality, problem)
    assert any(c.walk_chunk == 256 for c in space.candidates)
    assert all(not c.defer_merge and c.walk_chunk in (2 * c.chunk, 4 * c.chunk)
               for c in space.candidates if c.walk_chunk)
    delta = effc.load("delta_net")
    space = search_space(delta.spec, delta.comp.legality, problem)
    assert not any(c.walk_chunk == 256 for c in space.candidates)
    assert any("coarse walk at C=256: registers" in p.reason for p in space.pruned if p.candidate.walk_chunk == 256)
    tilelang = search_space(mlstm.spec, mlstm.comp.legality, problem, merge_modes=(False,))
    assert not any(c.walk_chunk for c in tilelang.candidates)


def test_a_tuned_coarse_walk_is_what_later_calls_run(tmp_path, monkeypatch):
    """A coarse walk recorded by `effc tune` is read back by the op; a call giving its own chunk drops it (the
    coarse walk was timed for the tuned chunk)."""
    from effc.policy.tiling import Problem
    from effc.policy.tuning import TuningKey, store

    monkeypatch.setenv("EFFC_CACHE_DIR", str(tmp_path))
    op = effc.load("mlstm_sig")
    dims = {"K": 16, "V": 16}
    problem = Problem(2, 40, 2, tuple(dims.items()))
    config = {"chunk": 16, "block": 16, "segments": 1, "num_warps": 4, "num_stages": 1, "defer_merge": 0,
              "walk_chunk": 32}
    store(TuningKey.of(op, problem, "cpu", torch.float32), config, 0.5, config, 1.0, {"B": 2, "T": 40, "H": 2})
    cpu = torch.device("cpu")
    cfg = effc.load("mlstm_sig").config(2, 40, 2, dims, cpu, dtype=torch.float32)
    assert (cfg.chunk, cfg.walk_chunk) == (16, 32) and cfg.reasons[0].startswith("tuned")
    assert effc.load("mlstm_sig").config(2, 40, 2, dims, cpu, dtype=torch.float32, chunk=32).walk_chunk == 0


def test_effc_check_runs_a_coarse_walk():
    from typer.testing import CliRunner

    from effc.tools.cli import app
    r = CliRunner().invoke(app, ["check", "retention", "--shape", "1,50,1", "--dims", "K=16,V=16", "--chunk", "16",
                                 "--walk-chunk", "32"])
    assert r.exit_code == 0, r.output
    assert "walk_chunk=32" in r.output and "grad q:" in r.output and "FAIL" not in r.output.upper()


def test_effc_memory_counts_the_coarse_history():
    """What the forward keeps shrinks by the coarse walk's history: mlstm_sig at 2x8192, H=16, D=128 keeps its
    outputs (64 MiB) and a history of 32 chunks a sequence of [128, 128] bf16 + [128] fp32 states a head (32
    MiB) at walk_chunk=256, against 128 chunks (130 MiB) at chunk 64; the backward re-walks the fine history,
    which then lives beside the coarse one."""
    from effc.tools.memory import training_memory
    op = effc.load("mlstm_sig")
    dims = {"K": 128, "V": 128}
    fine = training_memory(op, 2, 8192, 16, dims, chunk=64, partition="loop")
    coarse = training_memory(op, 2, 8192, 16, dims, chunk=64, walk_chunk=256, partition="loop")
    history = 2 * 16 * (128 * 128 * 2 + 128 * 4) / 2 ** 20  # MiB a chunk of every sequence
    assert fine.kept_mib == pytest.approx(64 + 128 * history, abs=1)
    assert coarse.kept_mib == pytest.approx(64 + 32 * history, abs=1)
    assert coarse.peak_mib == pytest.approx(fine.peak_mib + 32 * history, abs=1)


def test_coarse_walk_with_a_dim_in_parts():
    """K = 48 runs as parts of 32 and 16 (passes.dim_parts): the coarse history holds each part's states."""
    op = effc.load("gla")
    xs = [x.requires_grad_() for x in random_inputs(op.spec, 1, 70, 2, {"K": 48, "V": 48}, seed=1)]

    def run(**knobs):
        o, _ = op(*xs, chunk=16, **knobs)
        return [o.detach(), *torch.autograd.grad(o, xs, torch.ones_like(o))]

    one = run()
    coarse = run(walk_chunk=64)
    assert op.last_dim_parts == "parts: K=48 as 32 + 16" and op.last_config.walk_chunk == 64
    for a, b in zip(coarse, one):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)


def test_coarse_walk_under_torch_compile():
    """The custom op's fake forward sizes the kept history by the coarse walk's chunk (traced, fullgraph)."""
    op = effc.load("mlstm_sig")
    xs = [x.requires_grad_() for x in random_inputs(op.spec, 1, 40, 2, {"K": 16, "V": 16}, seed=3)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss(*xs):
        o, _ = op(*xs, chunk=16, walk_chunk=32, save_states=True)
        return (o * o).sum()

    got = torch.autograd.grad(loss(*xs), xs)
    o, _ = op.reference(*xs)
    want = torch.autograd.grad((o * o).sum(), xs)
    for a, b in zip(got, want):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)


def test_a_softmax_op_says_walk_chunk_is_not_its_knob():
    op = effc.load("softmax_attn")
    xs = random_inputs(op.spec, 1, 20, 1, {"K": 16, "V": 16})
    with pytest.raises(ArgumentError, match=r"no parameter\(s\) \['walk_chunk'\].*walk_chunk: knobs of a linear "
                                            r"spec's op, not of this one"):
        op(*xs, walk_chunk=32)
