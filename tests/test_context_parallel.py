"""Context parallel (effc.distributed): ranks spawned with the gloo backend on CPU must reproduce the
float64 oracle (output, final state, every gradient through its autograd) and, where one exists, the
hand-written recurrence of tests/naive.py."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import effc
from effc.distributed import (ContextParallelOp, HybridContextParallel, SoftmaxContextParallel, causal_pairs,
                               context_parallel, shard_of, state_maps, unshard)
from effc.errors import ArgumentError
from effc.distributed.varlen import shard_layout
from effc.runtime.verify import random_inputs, random_state

import naive
import naive_softmax

WORKER = Path(__file__).with_name("cp_worker.py")
ROOT = Path(__file__).resolve().parents[1]
B, T, H, D = 1, 90, 2, 16  # 45 tokens per rank on 2 ranks, 22-23 on 4: never a multiple of the chunk


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _case(spec: str, seed: int, init: bool = True, bounds=None, cu=None, kw=None, batch: int = B,
          layout: str = "contiguous", schedule: str = "allgather", overlap: bool = True) -> dict:
    """A case; with `cu` (global cu_seqlens), one packed (1, T, H, D) stream and one initial state per document.
    `kw`: the spec's params (e.g. a window shorter than a shard). A spec with no state has no initial state."""
    op = effc.load(spec)
    kw = kw or {}
    dims = {d: D for s in op.spec.inputs for d in s.feature_dims}
    xs = random_inputs(op.spec, batch, T, H, dims, seed=seed)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    n_seq = batch if cu is None else len(cu) - 1
    stateful = bool(op.spec.states)
    s0 = random_state(op.spec, n_seq, H, dims, seed=seed + 1) if init and stateful else None
    s0 = (s0,) if torch.is_tensor(s0) else s0
    gen = torch.Generator().manual_seed(seed + 2)
    # only the shapes of o and the final states are needed here: the float64 oracle gives them without a
    # kernel launch (the interpreter); _check runs the op itself
    o, finals = op.reference(*xs, initial_state=s0, output_final_state=stateful, cu_seqlens=cu, **kw)
    finals = () if finals is None else (finals,) if torch.is_tensor(finals) else finals
    return {"spec": spec, "inputs": xs, "init": s0, "bounds": bounds, "cu_seqlens": cu, "kw": kw, "layout": layout,
            "schedule": schedule, "overlap": overlap,
            "grad_o": torch.randn(o.shape, generator=gen),
            "grad_final": tuple(torch.randn(f.shape, generator=gen) for f in finals)}


def _run_ranks(cases: list[dict], world: int, tmp_path, timeout: float = 300) -> list[list[dict]]:
    """Spawn `world` gloo ranks on the cases; per rank, the list of their results. A hang fails."""
    torch.save(cases, tmp_path / "cases.pt")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
           "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "cases.pt"), str(tmp_path)],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0].decode(errors="replace"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"context-parallel ranks did not finish within {timeout} s (a hang?)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _close(got, want, what):
    tol = 2e-4 * max(1.0, want.abs().max().item())
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


def _check(case: dict, per_rank: list[dict]):
    """Everything the ranks computed against the float64 oracle (output, final states, every gradient through
    its autograd) and the naive recurrence. The oracle, not the single-process op: the op matches the oracle
    in the rest of the suite, and its interpreted backward took half of these tests' time."""
    spec = case["spec"]
    op = effc.load(spec)
    xs = [x.detach().double().requires_grad_(True) for x in case["inputs"]]
    s0 = None if case["init"] is None else tuple(s.detach().double().requires_grad_(True) for s in case["init"])
    cu, kw = case.get("cu_seqlens"), case.get("kw", {})
    stateful = bool(case["grad_final"])
    o, finals = op.reference(*xs, initial_state=s0, output_final_state=stateful, cu_seqlens=cu, **kw)
    finals = () if finals is None else (finals,) if torch.is_tensor(finals) else finals
    loss = (o * case["grad_o"].double()).sum() + sum((f * g.double()).sum() for f, g in zip(finals, case["grad_final"]))
    loss.backward()
    layout = case.get("layout", "contiguous")
    last = 0 if layout == "zigzag" else len(per_rank) - 1  # the rank holding the last piece (and the final state)
    join = (lambda key, i=None: unshard([r[key] if i is None else r[key][i] for r in per_rank], layout=layout))
    o_cp = join("o")
    _close(o_cp, o.detach(), f"{spec}: output against the float64 oracle")
    for i, f in enumerate(finals):
        _close(per_rank[last]["finals"][i], f.detach(), f"{spec}: final state {i} against the float64 oracle")
    for i, x in enumerate(xs):
        _close(join("grads", i), x.grad, f"{spec}: grad of input {i}")
    if s0 is not None:  # varlen: each document's row comes back on the rank where it starts (zeros elsewhere)
        for i, s in enumerate(s0):
            got = per_rank[0]["init_grads"][i] if cu is None else sum(
                r["init_grads"][i] for r in per_rank if r["init_grads"][i] is not None)  # None: no start there
            _close(got, s.grad, f"{spec}: grad of initial state {i}")
    if spec in naive_softmax.NAIVE_SOFTMAX or (spec == "swax" and cu is None):
        n_o, n_s = _naive_softmax(spec, case["inputs"], case["init"], cu, kw)
        _close(o_cp, n_o, f"{spec}: output against the naive reference")
        if n_s is not None:
            _close(per_rank[last]["finals"][0], n_s, f"{spec}: final state against the naive reference")
    if spec in naive.NAIVE:
        n_o, n_s = _naive(spec, case["inputs"], case["init"], cu)
        _close(o_cp, n_o, f"{spec}: output against the naive recurrence")
        for i, s in enumerate((n_s,) if torch.is_tensor(n_s) else n_s):
            _close(per_rank[last]["finals"][i], s, f"{spec}: final state {i} against the naive recurrence")


def _naive_softmax(spec, inputs, init, cu, kw):
    """tests/naive_softmax.py's explicit-mask attention over the whole sequence, one document at a time for a
    packed stream (every document ends up with a final state only for swax, none of these tests packs it)."""
    if spec == "swax":
        assert cu is None
        return naive_softmax.swax(*inputs, initial_state=None if init is None else init[0], **kw)
    c = [0, inputs[0].shape[1]] if cu is None else cu.tolist()
    outs = [naive_softmax.NAIVE_SOFTMAX[spec](*[x[:, a:b] for x in inputs], **kw) for a, b in zip(c, c[1:]) if b > a]
    return torch.cat(outs, 1), None


def _naive(spec, inputs, init, cu):
    """tests/naive.py's recurrence, one document at a time for a packed stream (an empty one keeps its state)."""
    one = (lambda s: s if s is None or len(s) > 1 else s[0])
    if cu is None:
        return naive.NAIVE[spec](*inputs, initial_state=one(init))
    c = cu.tolist()
    outs, states = [], []  # per document, its final states as a tuple (one per state)
    for i, (a, b) in enumerate(zip(c, c[1:])):
        s_i = None if init is None else tuple(s[i:i + 1] for s in init)
        if a == b:
            states.append(s_i)
            continue
        o_i, st = naive.NAIVE[spec](*[x[:, a:b] for x in inputs], initial_state=one(s_i))
        outs.append(o_i)
        states.append((st,) if torch.is_tensor(st) else tuple(st))
    like = next(s for s in states if s is not None)
    states = [tuple(torch.zeros_like(x) for x in like) if s is None else tuple(x.double() for x in s) for s in states]
    per_state = tuple(torch.cat([s[j] for s in states], 0) for j in range(len(like)))
    return torch.cat(outs, 1), (per_state[0] if len(per_state) == 1 else per_state)


def _bytes(spec: str) -> int:
    """The summary one rank sends, written out by hand (fp32)."""
    state = B * H * D * D * 4
    return {"retention": state + B * H * 4,  # W [K, V] and one decay per head
            "gla": state + B * H * D * 4,  # W and a decay per key channel
            "delta_net": 2 * state,  # W and a [K, K] transition
            "rwkv7": 2 * state,
            "mlstm_sig": state + B * H * 4 + B * H * D * 4 + B * H * 4}[spec]  # C, n: W and a scalar decay each


FAST = ("retention", "gla", "delta_net", "mlstm_sig")

# the steps a dense all-gather call records (ContextParallelOp.schedule_taken), by piece
FIRST = ("run 0 from initial_state",)
CORRECT = "correct {}: o(0) + u @ S_in"
# 2 ranks, overlapped: rank 1 issues the collective before its run (from zeros and probe columns) and never
# walks again; rank 0 has nothing to overlap (its run is its summary)
OVERLAPPED_2 = (FIRST + ("all-gather issued", "all-gather waited"),
                ("all-gather issued", "probe 1 (overlapped)", "all-gather waited", CORRECT.format(1)))
SERIAL_2 = (FIRST + ("all-gather",), ("all-gather", "run 1 from the folded state"))


def _two_ranks_match_single_process():
    cases = [_case(s, seed=i) for i, s in enumerate(FAST)]

    def check(results):
        for i, case in enumerate(cases):
            _check(case, [r[i] for r in results])
            assert all(r[i]["plan_bytes"] == _bytes(case["spec"]) for r in results)
            # mlstm_sig's output reads C and n (and divides by the latter): its local run waits for the gather
            want = SERIAL_2 if case["spec"] == "mlstm_sig" else OVERLAPPED_2
            assert tuple(r[i]["schedule"] for r in results) == want, case["spec"]
            assert ("overlap: off (output o reads 2 states (C, n)" if case["spec"] == "mlstm_sig"
                    else "overlap: on (dense shards)") in results[1][i]["plan"]
    return cases, check


def _two_ranks_overlap_on_and_off_agree():
    """Dense shards, the overlapped schedule (the last rank runs from zeros while the all-gather is in flight,
    then adds u @ S_in) against overlap=False and the single-process op: uneven shards of 61 and 29 tokens
    (no multiple of the chunk), a general transition (rwkv7: u and A from the same probe columns), a spec
    reading positions, no initial state."""
    uneven = [(0, 61), (61, 90)]
    cases = [_case("gla", seed=160, bounds=uneven), _case("gla", seed=160, bounds=uneven, overlap=False),
             _case("rwkv7", seed=161), _case("retention_rope", seed=162, init=False, bounds=uneven),
             _case("gated_delta_net", seed=163)]

    def check(results):
        for i, case in enumerate(cases):
            _check(case, [r[i] for r in results])
            want = OVERLAPPED_2 if case["overlap"] else SERIAL_2
            assert tuple(r[i]["schedule"] for r in results) == want, case["spec"]
        assert "overlap: off (turned off (overlap=False))" in results[0][1]["plan"]
        for key in ("o", "finals"):  # the two schedules, the same numbers up to rounding
            got, want = results[1][0][key], results[1][1][key]
            for g, w in zip(*((got, want) if key == "finals" else ((got,), (want,)))):
                _close(g, w, f"gla overlapped against serial: {key}")
    return cases, check


def test_overlap_follows_the_spec():
    """Overlap needs o = o(0) + u @ S_in: one state read by the output, from the left, with a left-product
    transition. An output gate varying along V, two states in the output, reverse states and half-precision
    outputs (u is a difference of two outputs) keep the serial schedule, and the plan says why."""
    def why(name, dtype=torch.float32, spec=None):
        cp = context_parallel(spec or effc.load(name))
        return getattr(cp, "linear", cp)._why_not_overlapped(dtype)

    for name in ("retention", "gla", "delta_net", "gated_delta_net", "rwkv7", "hdla", "swax"):
        assert why(name) is None, name
    assert "output o reads 2 states (C, n)" in why("mlstm_sig")
    assert "reverse states" in why("lion")
    assert "torch.bfloat16 outputs" in why("gla", torch.bfloat16)
    gated = effc.loads("""
spec gated_out {
  input q: [B, T, H, K]
  input k: [B, T, H, K]
  input v: [B, T, H, V]
  input z: [B, T, H, V]
  output o: [B, T, H, V]
  state S: [K, V]
  chunk 16
  intra { a = causal(q @ k.T) @ v }
  merge { o = (a + q @ S) * z }
  inter { S = S + k.T @ v }
}""")
    assert "not linear in state S from the left" in why(None, spec=gated) and "trailing dim" in why(None, spec=gated)
    plan = context_parallel(effc.load("gla")).plan(*random_inputs(effc.load("gla").spec, B, 45, H, {"K": D, "V": D}))
    assert "overlap: on (dense shards)" in str(plan) and plan.bytes_per_rank == _bytes("gla")  # bytes unchanged


def _four_ranks_match_single_process():
    cases = [_case(s, seed=10 + i) for i, s in enumerate(FAST)]  # rwkv7 on 4 ranks: packed, and in a ring
    cases.append(_case("gla", seed=20, init=False))
    # uneven shards: 1, 40, 0 and 49 tokens (a rank with an empty shard passes its entering state on)
    cases.append(_case("delta_net", seed=21, bounds=[(0, 1), (1, 41), (41, 41), (41, 90)]))

    def check(results):
        for i, case in enumerate(cases):
            _check(case, [r[i] for r in results])
        # a middle rank: its one run (zeros and probe columns) gives the summary and o(0), u; no second walk
        assert results[1][0]["schedule"] == ("probe 1", "all-gather issued", "all-gather waited", CORRECT.format(1))
        assert results[3][0]["schedule"][:2] == ("all-gather issued", "probe 3 (overlapped)")
    return cases, check


# a packed stream of 90 tokens, 45 per rank on 2 ranks: a document inside rank 0, an empty one, one
# crossing the boundary (30..60), one inside rank 1; chunk 16 divides none of the pieces
PACKED = [0, 10, 30, 30, 60, 90]


def _two_ranks_varlen_documents_cross_the_boundary():
    cases = [_case("retention", seed=30, cu=PACKED), _case("gla", seed=31, cu=PACKED),
             _case("delta_net", seed=32, init=False, cu=[0, 44, 44, 46, 90])]  # 1 token either side of the boundary

    def check(results):
        for i, case in enumerate(cases):
            _check(case, [r[i] for r in results])
            # rank 0: the document running on is its summary; rank 1's continuation runs (from zeros and probe
            # columns) while the all-gather is in flight, as do the documents ending on either rank
            assert results[0][i]["schedule"] == ("run the document running on", "all-gather issued",
                                                 "documents ending here (overlapped)", "all-gather waited")
            assert results[1][i]["schedule"] == ("all-gather issued", "documents ending here (overlapped)",
                                                 "probe continuation (overlapped)", "all-gather waited",
                                                 "correct continuation: o(0) + u @ S_in")
    return cases, check


def _two_ranks_packed_mlstm_sig_and_swax():
    """Issue 23's remaining packed cases on 2 ranks: mlstm_sig (two states, C and n, each per document, with
    initial states) and swax (its softmax branch's document masks and its state branch's continuation), a
    document crossing the boundary; swax's plan counts both branches."""
    cases = [_case("mlstm_sig", seed=165, cu=PACKED), _case("swax", seed=166, kw={"window": 12}, cu=PACKED),
             _case("swax", seed=167, kw={"window": 12})]

    def check(results):
        for i, case in enumerate(cases):
            _check(case, [r[i] for r in results])
        # swax dense: k and v of the shard (softmax branch) + W [K, V] and one decay per head (state branch)
        swax_bytes = _softmax_bytes(45) + B * H * (D * D + 1) * 4
        assert all(r[2]["plan_bytes"] == swax_bytes for r in results)
        assert f"both branches: {swax_bytes} bytes" in results[0][2]["plan"]
    return cases, check


def _four_ranks_softmax_attn_and_mlstm_sig_packed():
    """softmax_attn on 4 contiguous ranks (B = 2; uneven shards with an empty one), packed with a document
    through two middle shards; mlstm_sig packed the same way, with initial states."""
    uneven = [(0, 1), (1, 41), (41, 41), (41, 90)]
    cases = [_case("softmax_attn", seed=170, batch=2), _case("softmax_attn", seed=171, bounds=uneven),
             _case("softmax_attn", seed=172, cu=[0, 3, 3, 80, 90]), _case("mlstm_sig", seed=173, cu=[0, 3, 3, 80, 90])]

    def check(results):
        for i, case in enumerate(cases):
            _check(case, [r[i] for r in results])
        assert all(r[0]["plan_bytes"] == _softmax_bytes(r[0]["o"].shape[1], 2) for r in results)
    return cases, check


def _four_ranks_varlen():
    cases = [  # 22-23 tokens per rank: document 2 runs through ranks 1 and 2 (their summaries carry A)
        _case("gla", seed=40, cu=[0, 3, 3, 80, 90]),
        _case("delta_net", seed=41, cu=[0, 3, 3, 80, 90, 90]),
        # uneven shards, the empty one inside document 1 (its state passes through); empty documents
        _case("retention", seed=42, cu=[0, 5, 60, 60, 90, 90], bounds=[(0, 1), (1, 41), (41, 41), (41, 90)]),
        _case("rwkv7", seed=43, init=False, cu=[0, 1, 89, 90])]

    def check(results):
        for i, case in enumerate(cases):
            _check(case, [r[i] for r in results])
        # rank 1 lies inside document 2: one run gives its summary, o(0) and u
        assert results[1][0]["schedule"] == ("probe continuation", "all-gather issued", "all-gather waited",
                                             "correct continuation: o(0) + u @ S_in")
    return cases, check


def test_varlen_shard_layout():
    cu = [0, 10, 30, 30, 60, 90]
    r0, r1 = (shard_layout(cu, [(0, 45), (45, 90)], r) for r in (0, 1))
    assert (r0.cont, r0.owned, r0.owned_cu, r0.ends_here, r0.continues_out) == (
        None, range(0, 4), (0, 10, 30, 30, 45), (0, 1, 2), True)
    assert (r1.cont, r1.cont_len, r1.owned, r1.owned_cu, r1.ends_here, r1.continues_out) == (
        3, 15, range(4, 5), (0, 30), (3, 4), False)
    # an empty shard inside a document passes it on; a boundary at a shard start means no continuation
    bounds = [(0, 1), (1, 41), (41, 41), (41, 90)]
    lays = [shard_layout([0, 5, 41, 41, 60, 90, 90], bounds, r) for r in range(4)]
    assert [(x.cont, x.cont_len) for x in lays] == [(None, 0), (0, 4), (None, 0), (None, 0)]
    assert [x.owned for x in lays] == [range(0, 1), range(1, 2), range(2, 2), range(2, 6)]
    assert lays[3].owned_cu == (0, 0, 19, 49, 49) and lays[3].ends_here == (2, 3, 4, 5)
    mid = shard_layout([0, 5, 80, 90], bounds, 2)
    assert (mid.cont, mid.cont_len, mid.continues_out, mid.ends_here) == (1, 0, True, ())


def test_state_maps_follow_the_spec():
    def kinds(name):
        op = effc.load(name)
        return [(m.state, m.kind, m.keep) for m in state_maps(op.spec, op.comp.legality)]

    assert kinds("retention") == [("S", "diagonal", (False, False))]
    assert kinds("gla") == [("S", "diagonal", (True, False))]
    assert kinds("mlstm_sig") == [("C", "diagonal", (False, False)), ("n", "diagonal", (False,))]
    assert kinds("delta_net") == [("S", "matrix", (True, True))]
    assert kinds("hdla") == [("S", "matrix", (True, True))]


def test_updates_that_are_not_affine_are_refused():
    with pytest.raises(NotImplementedError, match="state 'C' of mlstm reads state.* m"):
        context_parallel(effc.load("mlstm"))
    right = effc.loads("""
spec right_mult {
  input q: [B, T, H, K]
  input k: [B, T, H, K]
  input v: [B, T, H, V]
  output o: [B, T, H, V]
  state S: [K, V]
  chunk 16
  intra { a = causal(q @ k.T) @ v }
  merge { o = a + q @ S }
  inter { S = S @ (v.T @ v) + k.T @ v }
}""")
    with pytest.raises(NotImplementedError, match="not affine in the state.*matmul"):
        context_parallel(right)


def test_each_family_gets_its_path():
    assert isinstance(context_parallel(effc.load("softmax_attn")), SoftmaxContextParallel)
    assert isinstance(context_parallel(effc.load("swax")), HybridContextParallel)
    with pytest.raises(ArgumentError, match="linear family's path"):
        ContextParallelOp(effc.load("softmax_attn"))


def test_softmax_key_reach_and_gathered_inputs_follow_the_spec():
    """Causal masks read no key after the shard (reach 0), a full mask every key; k, v and whatever feeds
    the prefix stage (FoX's f) are gathered, query-side inputs (q, a gate) only padded."""
    def path(name):
        cp = context_parallel(effc.load(name))
        return cp.softmax if isinstance(cp, HybridContextParallel) else cp

    for name in ("softmax_attn", "sliding_window", "alibi", "softcap", "swax"):
        assert path(name).shift == 0, name
    assert path("softmax_full").shift is None
    assert path("forgetting_transformer").gathered == ("k", "v", "f")
    assert (path("gated_attention").gathered, path("gated_attention").padded) == (("k", "v"), ("q", "g"))
    plan = path("softmax_attn").plan(*random_inputs(effc.load("softmax_attn").spec, B, 45, H, {"K": D, "V": D}))
    assert plan.bytes_per_rank == _softmax_bytes(45) and f"{_softmax_bytes(45)} bytes" in str(plan)
    assert "gathered: k, v" in str(plan)


def _softmax_bytes(tokens: int, batch: int = B) -> int:
    """A rank's shard of k and v, written out by hand (fp32)."""
    return batch * tokens * H * (D + D) * 4


SOFTMAX_FAST = [("softmax_attn", {}, 2), ("sliding_window", {"window": 12}, 1), ("swax", {"window": 12}, 1)]


def _two_ranks_softmax_and_swax_match_single_process():
    """Causal attention (B = 2), a window shorter than a shard (rank 1 reads 11 keys of rank 0) and the
    hybrid with an initial state: 45 tokens per rank, not a multiple of any block."""
    cases = [_case(s, seed=50 + i, kw=kw, batch=b) for i, (s, kw, b) in enumerate(SOFTMAX_FAST)]
    cases.append(_case("softmax_attn", seed=55, bounds=[(0, 61), (61, 90)]))  # uneven shards
    # score modifiers reading the gathered positions (alibi), a param (softcap) and a per-query gate
    cases += [_case("alibi", seed=56), _case("softcap", seed=57, kw={"cap": 2.0}), _case("gated_attention", seed=58)]

    def check(results):
        for i, case in enumerate(cases):
            _check(case, [r[i] for r in results])
        for (spec, _, b), r0 in zip(SOFTMAX_FAST[:2], results[0]):
            assert r0["plan_bytes"] == _softmax_bytes(45, b), spec
    return cases, check


def _two_ranks_softmax_varlen_documents_cross_the_boundary():
    """Document masking over ranks: a document of 30 tokens crossing the boundary, positions restarting per
    document (FoX's prefix cumsum too), an empty document."""
    cases = [_case("softmax_attn", seed=60, cu=PACKED), _case("forgetting_transformer", seed=61, cu=PACKED)]

    def check(results):
        for i, case in enumerate(cases):
            _check(case, [r[i] for r in results])
    return cases, check


def _two_ranks_select_stage():
    """A select stage over ranks: each rank's queries choose among every gathered key block and walk only
    theirs (the forward's queries=(lo, hi)); 16-token blocks, so the choice bites at 90 tokens; a packed
    stream with a document crossing the boundary; InfLLM-V2's group-shared choice."""
    moba = str(ROOT / "tests" / "specs" / "moba_max_window.attn")
    cases = [_case(moba, seed=80), _case(moba, seed=81, cu=PACKED), _case("infllm_v2", seed=82)]

    def check(results):
        for i, case in enumerate(cases):
            _check(case, [r[i] for r in results])
    return cases, check


def _four_ranks_softmax_family():
    uneven = [(0, 1), (1, 41), (41, 41), (41, 90)]  # a one-token shard, an empty one
    # the score modifiers alone (alibi, softcap, gated_attention; FoX packed and zig-zag) run on 2 ranks: on 4
    # what is new is a window over a one-token and an empty shard, and documents through the middle ranks
    cases = [_case("sliding_window", seed=75, kw={"window": 30}, bounds=uneven),
             _case("swax", seed=76, kw={"window": 30}, bounds=uneven),
             _case("swax", seed=77, init=False, kw={"window": 7}),
             _case("swax", seed=78, kw={"window": 9}, cu=[0, 3, 3, 80, 90]),
             _case("softmax_full", seed=79, cu=[0, 3, 3, 80, 90])]

    def check(results):
        for i, case in enumerate(cases):
            _check(case, [r[i] for r in results])
    return cases, check


def test_plan_prints_the_bytes_per_rank():
    cp = context_parallel(effc.load("gla"))
    xs = random_inputs(cp.spec, B, 45, H, {"K": D, "V": D})
    plan = cp.plan(*xs)
    assert plan.bytes_per_rank == _bytes("gla")
    assert f"{_bytes('gla')} bytes" in str(plan) and "state S: diagonal" in str(plan)


@pytest.mark.slow
@pytest.mark.parametrize("spec,sent,n_errs", [("gla", "2176 bytes", 10), ("softmax_attn", "11520 bytes", 8)])
def test_example_runs_under_torchrun(spec, sent, n_errs):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(_free_port()), str(ROOT / "examples" / "context_parallel.py"),
                        "--spec", spec], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    # the two ranks share one pipe, so a line may arrive cut by the other rank's: take the numbers, not lines
    errs = [float(e) for e in re.findall(r"\d\.\d+e[-+]\d+", p.stdout)]
    assert sent in p.stdout and len(errs) >= n_errs and max(errs) < 1e-3


# -- zig-zag layout ----------------------------------------------------------------------------------------

def test_zigzag_shards_round_trip_and_balance_causal_work():
    x = torch.arange(2 * 91).reshape(2, 91)  # 91 tokens: 8 pieces of 11-12 on 4 ranks
    for world in (2, 4):
        shards = [shard_of(x, world, r, layout="zigzag") for r in range(world)]
        assert torch.equal(unshard(shards, layout="zigzag"), x)
        # rank 0 holds the first and the last piece
        assert shards[0][0, 0] == 0 and shards[0][0, -1] == 90
    # 91 tokens in 8 pieces: three of 12 (ranks 0-2 hold one each), five of 11
    assert [s.shape[1] for s in (shard_of(x, 4, r, layout="zigzag") for r in range(4))] == [23, 23, 23, 22]
    for world in (2, 4, 8):
        contiguous, zigzag = causal_pairs(4096, world), causal_pairs(4096, world, "zigzag")
        assert sum(contiguous) == sum(zigzag) == 4096 * 4097 // 2
        # contiguous: the last rank does (2N - 1) / N times the mean; zigzag: within 0.1% of it
        assert max(contiguous) / (sum(contiguous) / world) > (2 * world - 1) / world - 0.01
        assert max(zigzag) / min(zigzag) < 1.001
    from effc.distributed.layout import rank_pieces
    with pytest.raises(ArgumentError, match="layout='zigzag' expects.*shard lengths \\[45, 45\\]; got \\[46, 44\\]"):
        rank_pieces("zigzag", [46, 44])
    with pytest.raises(ArgumentError, match="layout must be one of"):
        context_parallel(effc.load("gla"), layout="ring")


def test_zigzag_with_packed_documents_is_refused_for_states():
    for name in ("gla", "swax"):
        cp = context_parallel(effc.load(name), layout="zigzag")
        xs = random_inputs(cp.spec, 1, 8, H, {"K": D, "V": D})
        with pytest.raises(NotImplementedError, match="cu_seqlens with layout='zigzag'"):
            cp(*xs, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32), window=4)


def _two_ranks_zigzag_match_single_process():
    """Pieces of 23 and 22 tokens: causal attention (B = 2, q zero-padded around two pieces), FoX (the prefix
    cumsum over gathered f), the hybrid and a linear spec with an initial state (the final state on rank 0),
    and a packed stream whose document 30..60 crosses three pieces."""
    cases = [_case("softmax_attn", seed=80, batch=2, layout="zigzag"),
             _case("forgetting_transformer", seed=81, layout="zigzag"),
             _case("swax", seed=82, kw={"window": 12}, layout="zigzag"),
             _case("gla", seed=83, layout="zigzag"),
             _case("softmax_attn", seed=84, cu=PACKED, layout="zigzag")]

    def check(results):
        for i, case in enumerate(cases):
            _check(case, [r[i] for r in results])
        # gla: rank 0 holds pieces 0 and 3; the last piece (3) runs while the all-gather is in flight
        assert results[0][3]["schedule"] == FIRST + ("all-gather issued", "probe 3 (overlapped)",
                                                     "all-gather waited", CORRECT.format(3))
        assert results[1][3]["schedule"] == ("probe 1", "probe 2", "all-gather issued", "all-gather waited",
                                             CORRECT.format(1), CORRECT.format(2))
        assert results[1][2]["schedule"][-1] == CORRECT.format(2)  # swax's state branch
    return cases, check


def _four_ranks_zigzag():
    cases = [_case("softmax_attn", seed=90, layout="zigzag"),
             _case("sliding_window", seed=92, kw={"window": 30}, layout="zigzag"),  # a window over 3 pieces
             _case("swax", seed=93, init=False, kw={"window": 7}, layout="zigzag"),
             _case("delta_net", seed=94, layout="zigzag"),
             _case("forgetting_transformer", seed=96, cu=[0, 3, 3, 80, 90], layout="zigzag")]

    def check(results):
        for i, case in enumerate(cases):
            _check(case, [r[i] for r in results])
    return cases, check


# -- specs that read positions -----------------------------------------------------------------------------

def _two_ranks_specs_reading_positions():
    """RoPE in the kernel: retention_rope reads `pos` (each shard's calls get its first position as
    pos_offset; in a packed stream the continuation's offset is its place in its document), softmax_rope reads
    qpos/kpos (absolute in the gathered sequence), contiguous and zig-zag."""
    cases = [_case("retention_rope", seed=100), _case("retention_rope", seed=101, cu=PACKED),
             _case("retention_rope", seed=102, layout="zigzag"),
             _case("softmax_rope", seed=103), _case("softmax_rope", seed=104, layout="zigzag")]

    def check(results):
        for i, case in enumerate(cases):
            _check(case, [r[i] for r in results])
    return cases, check


def _four_ranks_specs_reading_positions():
    cases = [_case("retention_rope", seed=110, bounds=[(0, 1), (1, 41), (41, 41), (41, 90)]),
             _case("retention_rope", seed=111, init=False, cu=[0, 3, 3, 80, 90]),
             _case("retention_rope", seed=112, layout="zigzag")]

    def check(results):
        for i, case in enumerate(cases):
            _check(case, [r[i] for r in results])
    return cases, check


def _two_ranks_level_states():
    """log_linear_attn: 16 level states whose resets read `pos`, each shard at its offset; initial states."""
    cases = [_case("log_linear_attn", seed=115)]

    def check(results):
        _check(cases[0], [r[0] for r in results])
    return cases, check


# -- reverse states ------------------------------------------------------------------------------------------

def _two_ranks_reverse_states():
    """LION: forward states S, Z from the ranks before, reverse states R, ZR (scanned right to left) from the
    ranks after; initial states of both directions (the reverse ones enter at the end), every final state on
    the last piece's rank; lion_s with its decays, contiguous and zig-zag."""
    cases = [_case("lion", seed=120), _case("lion_s", seed=121), _case("lion_s", seed=122, layout="zigzag")]

    def check(results):
        for i, case in enumerate(cases):
            _check(case, [r[i] for r in results])
        sizes = B * H * (D * D + D) * 4  # one S-like and one Z-like state
        lion_summary = 2 * (sizes + 2 * B * H * 4)  # W of all four states, one decay per head each
        assert results[0][0]["plan_bytes"] == lion_summary + 2 * sizes  # and the initial states
    return cases, check


def _four_ranks_reverse_states():
    cases = [_case("lion", seed=130, init=False), _case("lion_s", seed=131, bounds=[(0, 1), (1, 41), (41, 41), (41, 90)]),
             _case("lion_s", seed=132, layout="zigzag")]

    def check(results):
        for i, case in enumerate(cases):
            _check(case, [r[i] for r in results])
    return cases, check


def test_reverse_states_with_packed_documents_are_refused():
    cp = context_parallel(effc.load("lion"))
    xs = random_inputs(cp.spec, 1, 8, H, {"K": D, "V": D})
    with pytest.raises(NotImplementedError, match="cu_seqlens with reverse states \\(R, ZR\\)"):
        cp(*xs, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))


# -- the ring pass of states (schedule="ring") ---------------------------------------------------------------

def _two_ranks_ring_pass_of_states():
    """Rank 0 runs from the initial state and sends its final state to rank 1, which runs from it; the backward
    sends the entering state's gradient back. 45 tokens per rank (chunk 16 divides neither), a general
    transition (delta_net) among them; the plan's bytes are one state, not a summary."""
    cases = [_case(s, seed=140 + i, schedule="ring") for i, s in enumerate(("retention", "gla", "delta_net"))]

    def check(results):
        for i, case in enumerate(cases):
            _check(case, [r[i] for r in results])
            assert all(r[i]["plan_bytes"] == B * H * D * D * 4 for r in results)  # W only: no A
    return cases, check


def _four_ranks_ring_pass_of_states():
    cases = [_case(s, seed=150 + i, schedule="ring") for i, s in enumerate(("gla", "rwkv7"))]
    cases.append(_case("mlstm_sig", seed=155, schedule="ring"))  # two states in one message
    cases.append(_case("gla", seed=156, init=False, schedule="ring"))  # rank 0 from zeros
    # uneven shards with an empty middle one (the states pass through it) and a one-token first one
    cases.append(_case("delta_net", seed=157, bounds=[(0, 1), (1, 41), (41, 41), (41, 90)], schedule="ring"))
    cases.append(_case("retention_rope", seed=158, bounds=[(0, 30), (30, 31), (31, 90), (90, 90)], schedule="ring"))
    cases.append(_case("swax", seed=159, schedule="ring"))  # the state branch of a hybrid
    cases.append(_case("mlstm", seed=160, schedule="ring"))  # not affine in its state: no summary, still a ring

    def check(results):
        for i, case in enumerate(cases):
            _check(case, [r[i] for r in results])
        assert results[1][2]["plan_bytes"] == B * H * (D * D + D) * 4  # mlstm_sig: C [K, V] and n [K]
    return cases, check


def test_ring_schedule_refusals():
    with pytest.raises(ArgumentError, match="schedule must be one of allgather, ring"):
        context_parallel(effc.load("gla"), schedule="pipeline")
    with pytest.raises(NotImplementedError, match="schedule='ring' with layout='zigzag'"):
        context_parallel(effc.load("gla"), layout="zigzag", schedule="ring")
    with pytest.raises(NotImplementedError, match="schedule='ring' with reverse states"):
        context_parallel(effc.load("lion"), schedule="ring")
    with pytest.raises(NotImplementedError, match="mlstm reads state"):  # the all-gather needs A S + W per state
        context_parallel(effc.load("mlstm"))
    assert context_parallel(effc.load("mlstm"), schedule="ring").maps[0].kind == "passed"
    with pytest.raises(NotImplementedError, match="ring attention"):
        context_parallel(effc.load("softmax_attn"), schedule="ring")
    cp = context_parallel(effc.load("gla"), schedule="ring")
    xs = random_inputs(cp.spec, 1, 8, H, {"K": D, "V": D})
    with pytest.raises(NotImplementedError, match="cu_seqlens with schedule='ring'"):
        cp(*xs, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
    plan = cp.plan(*xs)
    assert plan.bytes_per_rank == 1 * H * D * D * 4 and "ring pass of the states" in str(plan)


def test_async_gather_is_autograd_aware(tmp_path):
    """start_gather on a one-rank gloo group (in process): the result after wait() is the stacked input and
    its backward returns this rank's rows of the gradient (the all-reduce path gloo takes)."""
    import torch.distributed as dist
    from effc.distributed.collectives import start_gather
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        x = torch.randn(2, 3, requires_grad=True)
        pending = start_gather(x * 2, None)
        got = pending.wait()
        assert got.shape == (1, 2, 3) and torch.equal(got[0], x.detach() * 2)
        g = torch.randn(1, 2, 3)
        (got * g).sum().backward()
        assert torch.allclose(x.grad, 2 * g[0])
    finally:
        dist.destroy_process_group()


def _run_groups(make_groups, world: int, tmp_path):
    """The groups' cases in one world of `world` ranks; each group's checks on its slice of the results."""
    groups = [(g.__name__, *g()) for g in make_groups]
    results = _run_ranks([c for _, cases, _ in groups for c in cases], world, tmp_path, timeout=1200)
    at = 0
    for name, cases, check in groups:
        try:
            check([r[at:at + len(cases)] for r in results])
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from e
        at += len(cases)


# every 2-rank group above, run in one world of 2 ranks (one spawn: the ranks start once and compile each spec
# once, where a world per group paid both again for every group)
TWO_RANKS = (_two_ranks_match_single_process, _two_ranks_overlap_on_and_off_agree,
             _two_ranks_varlen_documents_cross_the_boundary, _two_ranks_packed_mlstm_sig_and_swax,
             _two_ranks_softmax_and_swax_match_single_process, _two_ranks_softmax_varlen_documents_cross_the_boundary,
             _two_ranks_select_stage, _two_ranks_zigzag_match_single_process, _two_ranks_specs_reading_positions,
             _two_ranks_level_states, _two_ranks_reverse_states, _two_ranks_ring_pass_of_states)

# every 4-rank group above, run in one world of 4 ranks (one spawn: the ranks start and compile once)
FOUR_RANKS = (_four_ranks_match_single_process, _four_ranks_softmax_attn_and_mlstm_sig_packed, _four_ranks_varlen,
              _four_ranks_softmax_family, _four_ranks_zigzag, _four_ranks_specs_reading_positions,
              _four_ranks_reverse_states, _four_ranks_ring_pass_of_states)


@pytest.mark.slow
def test_two_ranks(tmp_path):
    """The 2-rank groups' cases in one world of 2 ranks; each group's checks on its slice of the results."""
    _run_groups(TWO_RANKS, 2, tmp_path)


@pytest.mark.slow
def test_four_ranks(tmp_path):
    """The 4-rank groups' cases in one world of 4 ranks; each group's checks on its slice of the results."""
    _run_groups(FOUR_RANKS, 4, tmp_path)
