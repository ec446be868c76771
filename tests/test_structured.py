"""Structured transitions and the mLSTM variants (interpreter, fp32): packed sequences and states for the specs
whose transition is diagonal plus low rank (rwkv7: rank 1, hdla: rank 2) and for mlstm_sig; mLSTM chunk sizes
as a tuning parameter; their benchmark peers. The generic checks (oracle == recurrence == naive reference,
kernel == oracle, gradients, AOT for sm_90) run over every library spec in test_kernels, test_backward, test_aot."""
import sys

import pytest
import torch

import effc
from effc.runtime.verify import judge_fp32, random_inputs, random_state

NEW = ["mlstm_sig", "hdla", "rwkv7"]
DIMS = {"K": 16, "V": 32}


def _tuple(s) -> tuple:
    return s if isinstance(s, tuple) else (s,)


def _setup(name, B, T, H, seed=0, n_states=None):
    op = effc.load(name)
    dims = {d: DIMS[d] for d in op.spec.dims}
    xs = random_inputs(op.spec, B, T, H, dims, seed=seed)
    s0 = _tuple(random_state(op.spec, n_states or B, H, dims))
    return op, xs, s0


def _grads(fn, leaves, d_o, d_s):
    o, s = fn()
    torch.autograd.backward([o, *_tuple(s)], [d_o, *d_s])
    g = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    return o.detach(), _tuple(s), g


def test_the_new_specs_are_in_the_linear_family():
    assert set(NEW) <= set(effc.library_names("linear"))
    assert not set(NEW) & set(effc.library_names("softmax") + effc.library_names("hybrid"))


@pytest.mark.parametrize("name", NEW)
def test_varlen_forward_backward_and_one_by_one(name):
    """Packed sequences of 1, 7, 16 and 23 tokens (chunk 16): outputs, final states and every gradient against
    the oracle, and each sequence alone through the kernels."""
    lengths = [1, 7, 16, 23]
    cu = torch.tensor([0, 1, 8, 24, 47], dtype=torch.int32)
    op, xs, s0 = _setup(name, 1, sum(lengths), 2, seed=3, n_states=len(lengths))
    xs = [x.requires_grad_() for x in xs]
    s0 = tuple(s.requires_grad_() for s in s0)
    d_o = torch.randn(1, sum(lengths), 2, DIMS["V"])
    d_s = tuple(torch.randn(s.shape) for s in s0)
    leaves = xs + list(s0)
    out, fin, g = _grads(lambda: op(*xs, initial_state=s0, output_final_state=True, cu_seqlens=cu, chunk=16),
                         leaves, d_o, d_s)
    ref, ref_fin, ref_g = _grads(lambda: op.reference(*xs, initial_state=s0, output_final_state=True,
                                                      cu_seqlens=cu), leaves, d_o.double(),
                                 tuple(d.double() for d in d_s))
    assert judge_fp32(out, ref).ok
    for a, b in zip(fin, ref_fin):
        assert a.shape[0] == len(lengths) and judge_fp32(a.detach(), b.detach()).ok
    names = [d.name for d in op.spec.inputs] + [f"initial {s.name}" for s in op.spec.states]
    for n, a, b in zip(names, g, ref_g):
        assert judge_fp32(a, b).ok, f"{name} d{n}: {judge_fp32(a, b)}"
    for i, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        o_i, f_i = op(*[x[:, a:b].detach() for x in xs], initial_state=tuple(s[i:i + 1].detach() for s in s0),
                      output_final_state=True, chunk=16)
        assert judge_fp32(out[:, a:b], o_i).ok
        for x, y in zip(_tuple(f_i), fin):
            assert judge_fp32(x, y[i:i + 1].detach()).ok


@pytest.mark.parametrize("name", NEW)
@pytest.mark.slow  # the full tier only (README: test tiers)
def test_final_state_continues_the_sequence(name):
    """[0:T1] then [T1:T] from its final state equals one run over [0:T]; the split is inside a chunk."""
    op, xs, s0 = _setup(name, 2, 50, 2)
    o_full, s_full = op(*xs, initial_state=s0, output_final_state=True, chunk=16)
    o1, s1 = op(*[x[:, :21] for x in xs], initial_state=s0, output_final_state=True, chunk=16)
    o2, s2 = op(*[x[:, 21:] for x in xs], initial_state=s1, output_final_state=True, chunk=16)
    assert judge_fp32(torch.cat([o1, o2], 1), o_full).ok
    for a, b in zip(_tuple(s2), _tuple(s_full)):
        assert judge_fp32(a, b).ok


@pytest.mark.parametrize("name", ["mlstm_sig", "rwkv7"])
def test_step_equals_the_chunked_forward(name):
    op, xs, s0 = _setup(name, 2, 12, 2)
    full, final = op(*xs, initial_state=s0, output_final_state=True)
    state = s0
    for t in range(12):
        o_t, state = op.step(*(x[:, t] for x in xs), state=state)
        assert judge_fp32(o_t, full[:, t]).ok
    for a, b in zip(_tuple(state), _tuple(final)):
        assert judge_fp32(a, b).ok


@pytest.mark.slow  # the full tier only (README: test tiers)
def test_hdla_without_decay_is_linear_attention():
    """With a = 1 the transition H H is the identity (a reflection squared): hdla is linear attention."""
    from naive import linear_attn
    op, (q, k, v, g, u), _ = _setup("hdla", 2, 40, 2)
    o, s = op.reference(q, k, v, torch.zeros_like(g), u, output_final_state=True)
    n, ns = linear_attn(q, k, v)
    # up to the 1e-6 inside the normalisation of u (H H = I - 4e-6 u u^T / |u|^2 per step)
    assert (o - n).abs().max() < 1e-5 * n.abs().max() and (s - ns).abs().max() < 1e-5 * ns.abs().max()
    # and with a decay the reflection matters: a different u changes the output
    o1, _ = op.reference(q, k, v, g, u)
    o2, _ = op.reference(q, k, v, g, u.flip(-1))
    assert (o1 - o2).abs().max() > 1e-3


def test_mlstm_variants_match_mlstm_kernels_native_references():
    """Our oracles against mlstm_kernels' own PyTorch parallel forms (when that package is installed):
    mlstm (exponential input gate: i is its log) and mlstm_sig (sigmoid input gate, eps 1e-6)."""
    fw = pytest.importorskip("mlstm_kernels.torch.parallel.native.fw")
    sig = pytest.importorskip("mlstm_kernels.torch.parallel.native_siging.fw")
    for name, ref in (("mlstm", lambda *a: fw.mlstm_parallel_fw(*a, eps=0.0)[0]),
                      ("mlstm_sig", lambda *a: sig.mlstm_siging_parallel_fw(*a, eps=1e-6)[0])):
        op, xs, _ = _setup(name, 2, 100, 3, seed=3)
        o, _ = op.reference(*xs)
        h = ref(*(x.transpose(1, 2).double() for x in xs)).transpose(1, 2)
        assert (o - h).abs().max() < 1e-9 * max(1.0, h.abs().max().item())


# ---- mLSTM: the chunk size is a tuning parameter -----------------------------------------------------------

@pytest.mark.parametrize("name", ["mlstm", "mlstm_sig"])
@pytest.mark.parametrize("chunk", [128, 256])
@pytest.mark.slow  # the full tier only (README: test tiers)
def test_mlstm_large_chunks(name, chunk, monkeypatch):
    """chunk=128 and 256 (the `chunk` knob of effc tune's Candidate.overrides) run the fused walk: T=300 gives a
    partial last chunk, the initial and final states pass through, and with merge fused in the walk and no
    gradients (or save_states=False) the forward writes no per-chunk states."""
    from effc.runtime.launch import Launcher
    stored = []  # (chunk, whether the forward writes per-chunk states)
    forward = Launcher.forward

    def spy(self, cfg, lay, xs, pvals, init, store_final, store_history, **kw):
        stored.append((cfg.chunk, store_history or cfg.defer_merge))
        return forward(self, cfg, lay, xs, pvals, init, store_final, store_history, **kw)
    monkeypatch.setattr(Launcher, "forward", spy)
    op, xs, s0 = _setup(name, 1, 300, 1)
    fused = {"defer_merge": False} if op.comp.plan.deferrable else {}
    o, s = op(*xs, initial_state=s0, output_final_state=True, chunk=chunk, **fused)
    assert op.last_config.chunk == chunk and stored == [(chunk, False)]
    ref, ref_s = op.reference(*xs, initial_state=s0, output_final_state=True)
    assert judge_fp32(o, ref).ok, judge_fp32(o, ref)
    for a, b in zip(_tuple(s), _tuple(ref_s)):
        assert judge_fp32(a, b).ok
    # the backward at a large chunk too, recomputing the states instead of keeping them
    leaves = [x.requires_grad_() for x in xs]
    d_o = torch.randn_like(ref)
    o = op(*leaves, chunk=chunk, save_states=False, **fused)[0]
    assert stored[-1] == (chunk, False)  # the forward keeps none; the backward's own walk recomputes them
    g = torch.autograd.grad(o, leaves, d_o.float())
    ref_g = torch.autograd.grad(op.reference(*leaves)[0], leaves, d_o)
    for d, a, b in zip(op.spec.inputs, g, ref_g):
        assert judge_fp32(a, b).ok, f"d{d.name}: {judge_fp32(a, b)}"


def test_mlstm_chunk_256_is_pruned_by_the_register_model():
    """What `effc tune mlstm --dry-run` says of C=256 when asked for it: every configuration is over the
    register model (it counts a whole [C, C] fp32 tile live per program: no inner tiling of a chunk yet);
    C=64 and C=128 stay candidates."""
    from effc.policy.search import search_space
    from effc.policy.tiling import Problem
    op = effc.load("mlstm")
    space = search_space(op.spec, op.comp.legality, Problem(2, 8192, 16, (("K", 128), ("V", 128))),
                         chunks=(64, 128, 256))
    chunks = {c.chunk for c in space.candidates}
    assert {64, 128} <= chunks and 256 not in chunks
    at_256 = [p for p in space.pruned if p.candidate.chunk == 256]
    assert at_256 and all("registers:" in p.reason for p in at_256)


# ---- benchmark peers --------------------------------------------------------------------------------------

def test_peers_take_inputs_their_spec_has():
    from effc.tools.peers import PEERS, peer_scale
    library = set(effc.library_names())
    for spec, peers in PEERS.items():
        if spec not in library:
            continue
        inputs = [d.name for d in effc.load(spec).spec.inputs]
        for p in peers:
            assert set(p.inputs) <= set(inputs), f"{p.label}: {p.inputs} not all inputs of {spec} ({inputs})"
    assert [p.label for p in PEERS["mlstm"]] == ["mlstm_kernels chunkwise--triton_xl_chunk",
                                                 "mlstm_kernels chunkwise--triton_limit_chunk"]
    # mlstm_kernels reads q, k, v, then the input gate (i) before the forget gate (f)
    assert all(p.inputs == ("q", "k", "v", "i", "f") for p in PEERS["mlstm"] + PEERS["mlstm_sig"])
    assert peer_scale(effc.load("mlstm"), 128) == 128 ** -0.5
    assert peer_scale(effc.load("rwkv7"), 128) == 1.0  # RWKV-7 does not scale r k^T


DELTA_RULES = {"delta_net": ("delta_rule", "chunk_delta_rule"), "gated_delta_net": ("gated_delta_rule",
                                                                             "chunk_gated_delta_rule")}


@pytest.mark.parametrize("name", [n + s for n in DELTA_RULES for s in ("", "_l2")])
def test_delta_rule_peers_call_fla_as_their_spec_normalises(name, monkeypatch):
    """Each delta rule races fla called the same way: the plain spec against fla's default (q, k as given), the
    _l2 spec against use_qk_l2norm_in_kernel=True. A stand-in for fla (the naive recurrence, reading the flag
    with fla's default) must give the spec's own output on q and k far from unit norm."""
    import types

    from effc.tools.peers import PEERS
    from naive import gated_delta_rule

    base = name.removesuffix("_l2")
    module, fn = DELTA_RULES[base]
    calls = []

    def fake(q, k, v, *rest, scale, use_qk_l2norm_in_kernel=False):
        calls.append(use_qk_l2norm_in_kernel)
        g, beta = rest if len(rest) == 2 else (torch.zeros_like(rest[0]), rest[0])
        assert scale == q.shape[-1] ** -0.5
        return gated_delta_rule(q, k, v, g, beta, l2=use_qk_l2norm_in_kernel)
    monkeypatch.setitem(sys.modules, f"fla.ops.{module}", types.SimpleNamespace(**{fn: fake}))
    op, xs, _ = _setup(name, 1, 20, 2, seed=4)
    by_name = {d.name: x for d, x in zip(op.spec.inputs, xs)}
    by_name["q"], by_name["k"] = by_name["q"] * 0.3, by_name["k"] * 0.3  # norm ~1.2 (l2) or 0.3: both stable
    (peer,) = PEERS[name]
    out = peer.make(1, 20, 2, 16)(*[by_name[n] for n in peer.inputs], scale=16 ** -0.5)
    assert calls == [name.endswith("_l2")]
    ref = op.reference(*[by_name[d.name] for d in op.spec.inputs])[0]
    assert judge_fp32(out, ref).ok, judge_fp32(out, ref)


@pytest.mark.parametrize("name", list(DELTA_RULES))
def test_the_l2_delta_rules_normalise_q_and_k_the_plain_ones_do_not(name):
    """The _l2 spec is the plain one on L2-normalised q and k (fla's eps, 1e-6 under the root); on q and k of
    other norms the two differ. `unitnorm` makes the plain spec's random q and k unit vectors, the _l2 spec's
    are drawn as any vectors."""
    plain, l2 = effc.load(name), effc.load(name + "_l2")
    xs = random_inputs(l2.spec, 1, 40, 2, DIMS, seed=6)
    q, k = xs[0], xs[1]
    assert not torch.allclose(k.norm(dim=-1), torch.ones(1, 40, 2))
    assert torch.allclose(random_inputs(plain.spec, 1, 40, 2, DIMS, seed=6)[1].norm(dim=-1), torch.ones(1, 40, 2))

    def normalised(x):
        return x / (x.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
    o_l2, s_l2 = l2(*xs, output_final_state=True, chunk=16)
    o_plain, s_plain = plain(normalised(q), normalised(k), *xs[2:], output_final_state=True, chunk=16)
    assert judge_fp32(o_l2, o_plain).ok and judge_fp32(s_l2, s_plain).ok
    o_raw = plain(q * 0.3, k * 0.3, *xs[2:], chunk=16)[0]
    assert (o_raw - o_l2).abs().max() > 0.1 * o_l2.abs().max()


def test_a_peer_process_that_aborts_is_the_rows_error():
    """TFLA's xl_chunk kernel aborts its process on triton 3.6 (an LLVM assertion): the row records it."""
    from effc.tools.bench import run_peer_process
    crash = ("import os, sys; sys.stderr.write(\"python: SIRemoveRegisters.cpp:99: void f(): Assertion "
             "`isReg' failed.\\n\"); sys.stderr.flush(); os.abort()")
    res = run_peer_process([sys.executable, "-c", crash], timeout=60)
    assert res["error"].startswith("peer process killed by SIGABRT: ") and "Assertion `isReg' failed" in res["error"]
    res = run_peer_process([sys.executable, "-c", "import sys; print('x'); sys.exit(3)"], timeout=60)
    assert res == {"error": "peer process exited 3: "}
    res = run_peer_process([sys.executable, "-c", "print('EFFC_PEER_RESULT {\"ms\": 1.5}')"], timeout=60)
    assert res == {"ms": 1.5}


FAST_FORGET = """
spec fast_forget {
  input q: [B, T, H, K]
  input k: [B, T, H, K]
  input v: [B, T, H, V]
  input f: [B, T, H]
  output o: [B, T, H, V]
  state S: [K, V]
  chunk 16
  intra {
    b = cumsum(logsigmoid(f) - 8.0)      # padded tokens (f = 0) keep lowering b: exp(last(b) - b) overflows there
    qd = q * exp(b)[:, None]
  }
  merge { o = qd @ S + (causal(q @ k.T) * exp(causal(b[:, None] - b[None, :], -inf))) @ v }
  inter { S = S * exp(last(b)) + (k * exp(last(b) - b)[:, None]).T @ v }
}
"""


def test_a_gate_that_overflows_on_padded_tokens_does_not_reach_the_state():
    """A gate that overflows on padded tokens (exp(last(b) - b) past the last one) must not reach the state:
    the Triton printer gives such ops 0 on padded rows (inf * 0 = nan in the matmul over tokens otherwise)."""
    op = effc.loads(FAST_FORGET)
    xs = random_inputs(op.spec, 1, 17, 2, DIMS)  # one real token in the second chunk, 15 padded ones
    s0 = random_state(op.spec, 1, 2, DIMS)
    o, s = op(*xs, initial_state=s0, output_final_state=True)
    ref, ref_s = op.reference(*xs, initial_state=s0, output_final_state=True)
    assert torch.isfinite(s).all() and judge_fp32(o, ref).ok and judge_fp32(s, ref_s).ok


def test_a_peer_past_its_time_is_killed_with_what_it_started(tmp_path):
    """A timed-out peer's children (compile workers, a GPU process) must not outlive it into later rows."""
    import os
    import signal
    import sys
    import time

    from effc.tools.bench import run_peer_process
    pidfile = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
              f"open({str(pidfile)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    res = run_peer_process([sys.executable, "-c", script], timeout=3)
    assert res["error"].startswith("no result within 3 s")
    child = int(pidfile.read_text())
    for _ in range(50):  # reaped by init shortly after the kill
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{child}/stat") as f:
            if f.read().split()[2] == "Z":
                break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the peer's child outlived the timeout")


GENERAL = ["delta_net", "delta_net_l2", "gated_delta_net", "gated_delta_net_l2", "hdla", "rwkv7", "mlstm"]


@pytest.mark.parametrize("deferred", [True, False], ids=["merge-deferred", "merge-fused"])
@pytest.mark.parametrize("name", GENERAL)
@pytest.mark.slow  # the full tier only (README: test tiers)
def test_general_transitions_in_both_merge_modes(name, deferred):
    """The walk with merge fused, and the walk updating the state alone with `out` evaluating merge per chunk:
    outputs, final states and gradients against the oracle; T = 45 is not a multiple of C = 16. One sequence
    of two heads: the merge modes differ per chunk, not per sequence (B = 2: test_kernels, every library spec)."""
    op, xs, s0 = _setup(name, 1, 45, 2, seed=5)
    assert op.comp.plan.deferrable
    xs = [x.requires_grad_() for x in xs]
    d_o = torch.randn(1, 45, 2, DIMS["V"])
    d_s = tuple(torch.randn(s.shape) for s in s0)
    out, fin, g = _grads(lambda: op(*xs, initial_state=s0, output_final_state=True, chunk=16, defer_merge=deferred),
                         xs, d_o, d_s)
    assert op.last_config.defer_merge == deferred
    ref, ref_fin, ref_g = _grads(lambda: op.reference(*xs, initial_state=s0, output_final_state=True), xs,
                                 d_o.double(), tuple(d.double() for d in d_s))
    assert judge_fp32(out, ref).ok
    for a, b in zip(fin, ref_fin):
        assert judge_fp32(a.detach(), b.detach()).ok
    for d, a, b in zip(op.spec.inputs, g, ref_g):
        assert judge_fp32(a, b).ok, f"{name} d{d.name}: {judge_fp32(a, b)}"


def test_recomputing_the_history_skips_merge(monkeypatch):
    """save_states=False: the backward's second forward only rebuilds the per-chunk states, so a deferrable
    plan runs the walk without merge and no out kernel; the gradients still match the oracle."""
    from effc.runtime.launch import Launcher
    launched = []
    fn = Launcher._fn

    def spy(self, kernel):
        launched.append(kernel)
        return fn(self, kernel)
    monkeypatch.setattr(Launcher, "_fn", spy)
    op, xs, _ = _setup("delta_net", 1, 40, 2, seed=2)
    xs = [x.requires_grad_() for x in xs]
    o, _ = op(*xs, chunk=16, defer_merge=False, save_states=False)
    launched.clear()
    g = torch.autograd.grad(o, xs, torch.ones_like(o))
    assert launched[:2] == ["prep", "walk"] and "out" not in launched, launched
    ref_g = torch.autograd.grad(op.reference(*xs)[0], xs, torch.ones_like(o).double())
    for d, a, b in zip(op.spec.inputs, g, ref_g):
        assert judge_fp32(a, b).ok, f"d{d.name}: {judge_fp32(a, b)}"
