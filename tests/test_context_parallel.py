"""Context parallel (effc.distributed): ranks spawned with the gloo backend on CPU must reproduce the
single-process op (output, final state, every gradient), the float64 oracle and, where one exists, the
hand-written recurrence of tests/naive.py."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import effc
from effc.distributed import context_parallel, state_maps
from effc.runtime.verify import random_inputs, random_state

import naive

WORKER = Path(__file__).with_name("cp_worker.py")
ROOT = Path(__file__).resolve().parents[1]
B, T, H, D = 1, 90, 2, 16  # 45 tokens per rank on 2 ranks, 22-23 on 4: never a multiple of the chunk


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _case(spec: str, seed: int, init: bool = True, bounds=None) -> dict:
    op = effc.load(spec)
    dims = {d: D for s in op.spec.inputs for d in s.feature_dims}
    xs = random_inputs(op.spec, B, T, H, dims, seed=seed)
    s0 = random_state(op.spec, B, H, dims, seed=seed + 1) if init else None
    s0 = (s0,) if torch.is_tensor(s0) else s0
    gen = torch.Generator().manual_seed(seed + 2)
    o, finals = op(*xs, initial_state=s0, output_final_state=True)
    finals = (finals,) if torch.is_tensor(finals) else finals
    return {"spec": spec, "inputs": xs, "init": s0, "bounds": bounds,
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
    """Everything the ranks computed against the single-process op, the oracle and the naive recurrence."""
    spec = case["spec"]
    op = effc.load(spec)
    xs = [x.detach().clone().requires_grad_(True) for x in case["inputs"]]
    s0 = None if case["init"] is None else tuple(s.detach().clone().requires_grad_(True) for s in case["init"])
    o, finals = op(*xs, initial_state=s0, output_final_state=True)
    finals = (finals,) if torch.is_tensor(finals) else finals
    loss = (o * case["grad_o"]).sum() + sum((f * g).sum() for f, g in zip(finals, case["grad_final"]))
    loss.backward()
    o_cp = torch.cat([r["o"] for r in per_rank], 1)
    _close(o_cp, o.detach(), f"{spec}: output")
    for i, f in enumerate(finals):
        _close(per_rank[-1]["finals"][i], f.detach(), f"{spec}: final state {i}")
    for i, x in enumerate(xs):
        _close(torch.cat([r["grads"][i] for r in per_rank], 1), x.grad, f"{spec}: grad of input {i}")
    if s0 is not None:
        for i, s in enumerate(s0):
            _close(per_rank[0]["init_grads"][i], s.grad, f"{spec}: grad of initial state {i}")
    ref, ref_finals = op.reference(*case["inputs"], initial_state=case["init"], output_final_state=True)
    _close(o_cp, ref, f"{spec}: output against the float64 oracle")
    if spec in naive.NAIVE:
        init = case["init"] if case["init"] is None or len(case["init"]) > 1 else case["init"][0]
        n_o, n_s = naive.NAIVE[spec](*case["inputs"], initial_state=init)
        _close(o_cp, n_o, f"{spec}: output against the naive recurrence")
        for i, s in enumerate((n_s,) if torch.is_tensor(n_s) else n_s):
            _close(per_rank[-1]["finals"][i], s, f"{spec}: final state {i} against the naive recurrence")


def _bytes(spec: str) -> int:
    """The summary one rank sends, written out by hand (fp32)."""
    state = B * H * D * D * 4
    return {"retention": state + B * H * 4,  # W [K, V] and one decay per head
            "gla": state + B * H * D * 4,  # W and a decay per key channel
            "delta_net": 2 * state,  # W and a [K, K] transition
            "rwkv7": 2 * state,
            "mlstm_sig": state + B * H * 4 + B * H * D * 4 + B * H * 4}[spec]  # C, n: W and a scalar decay each


FAST = ("retention", "gla", "delta_net", "mlstm_sig")


def test_two_ranks_match_single_process(tmp_path):
    cases = [_case(s, seed=i) for i, s in enumerate(FAST)]
    results = _run_ranks(cases, 2, tmp_path)
    for i, case in enumerate(cases):
        _check(case, [r[i] for r in results])
        assert all(r[i]["plan_bytes"] == _bytes(case["spec"]) for r in results)


@pytest.mark.slow
def test_four_ranks_match_single_process(tmp_path):
    specs = FAST + ("rwkv7",)
    cases = [_case(s, seed=10 + i) for i, s in enumerate(specs)]
    cases.append(_case("gla", seed=20, init=False))
    # uneven shards: 1, 40, 0 and 49 tokens (a rank with an empty shard passes its entering state on)
    cases.append(_case("delta_net", seed=21, bounds=[(0, 1), (1, 41), (41, 41), (41, 90)]))
    results = _run_ranks(cases, 4, tmp_path)
    for i, case in enumerate(cases):
        _check(case, [r[i] for r in results])


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


def test_unsupported_calls_name_the_missing_feature():
    with pytest.raises(NotImplementedError, match="softmax family"):
        context_parallel(effc.load("softmax_attn"))
    with pytest.raises(NotImplementedError, match="hybrid family"):
        context_parallel(effc.load("swax"))
    cp = context_parallel(effc.load("gla"))
    xs = random_inputs(cp.spec, 1, 8, H, {"K": D, "V": D})
    with pytest.raises(NotImplementedError, match="cu_seqlens"):
        cp(*xs, cu_seqlens=torch.tensor([0, 8]))


def test_plan_prints_the_bytes_per_rank():
    cp = context_parallel(effc.load("gla"))
    xs = random_inputs(cp.spec, B, 45, H, {"K": D, "V": D})
    plan = cp.plan(*xs)
    assert plan.bytes_per_rank == _bytes("gla")
    assert f"{_bytes('gla')} bytes" in str(plan) and "state S: diagonal" in str(plan)


@pytest.mark.slow
def test_example_runs_under_torchrun():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(_free_port()), str(ROOT / "examples" / "context_parallel.py")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    errs = [float(e) for line in p.stdout.splitlines() if "max |cp" in line
            for e in line.replace(",", " ").split() if "e-" in e or "e+" in e]
    assert "2176 bytes" in p.stdout and len(errs) >= 10 and max(errs) < 1e-3
