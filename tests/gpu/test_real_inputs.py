"""On the GPU: real inputs that broke effc (issue: no crash, no silent wrong answer).

- Every library spec at head dims 32, 64, 128, 256 and lengths 63, 64, 2048 (not multiples of the chunk
  too), forward and gradients in bf16, each spec in its own process (tests/gpu/sweep_one.py) so that a
  kernel fault is a failed row, not a lost session.
- delta_net at B=4, T=2048, H=8, D=64 (16-bit, unit-norm q and k, an initial state): it faulted with an
  illegal memory access in the k-gradient kernel (Triton < 3.7.1 miscompiles a transposed wgmma
  accumulator that feeds another dot on Hopper; passes/transpose_sink.py).
- delta_net_l2's tilings agree: the default and chunk=16 at T=63, chunk=64 and chunk=16 at T=64 (the same
  miscompile gave dk off by 0.73 and dq, dk off by 1.3 in RMS). chunk=64 at D=32 is still wrong on the
  H200 with Triton 3.6 (dq 0.72) after both workarounds: an xfail there until it is found.
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import effc

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# SWEEP_DIMS / SWEEP_LENGTHS (comma-separated) narrow the sweep when device time is short
DIMS = tuple(int(x) for x in os.environ.get("SWEEP_DIMS", "32,64,128,256").split(","))
LENGTHS = tuple(int(x) for x in os.environ.get("SWEEP_LENGTHS", "63,64,2048").split(","))
SPECS = effc.library_names()
_HERE = Path(__file__).parent


def _run_spec(name: str) -> list[dict]:
    cmd = [sys.executable, str(_HERE / "sweep_one.py"), name, ",".join(map(str, DIMS)), ",".join(map(str, LENGTHS))]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=int(os.environ.get("SWEEP_TIMEOUT", 480)))
        out, tail = p.stdout, (p.stderr or "")[-1500:]
    except subprocess.TimeoutExpired as e:
        out, tail = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timed out"
    rows = [json.loads(line[len("SWEEP "):]) for line in out.splitlines() if line.startswith("SWEEP ")]
    seen = {(r["D"], r["T"]) for r in rows}
    rows += [dict(spec=name, D=D, T=T, ok=False, error=f"no result (process ended): {tail}")
             for D in DIMS for T in LENGTHS if (D, T) not in seen]
    if os.environ.get("OUT"):  # as each spec finishes, so a sweep cut short by a time limit still reports
        with open(Path(os.environ["OUT"], "sweep.jsonl"), "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


@pytest.fixture(scope="module")
def sweep():
    with ThreadPoolExecutor(int(os.environ.get("SWEEP_JOBS", 8))) as pool:
        results = dict(zip(SPECS, pool.map(_run_spec, SPECS)))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "sweep.json").write_text(json.dumps(results, indent=1))
    return results


@pytest.mark.parametrize("name", SPECS)
def test_every_head_dim_and_length(sweep, name):
    bad = [r for r in sweep[name] if r["ok"] is False]  # None: refused here (policy.triton_faults)
    for r in sweep[name]:
        if r["ok"] is None:
            print(name, r["D"], r["T"], "refused", r["refused"][:300])
            continue
        print(name, r["D"], r["T"], "ok" if r["ok"] else "FAIL", r.get("error", "")[:300] or
              "; ".join(f"{n} {c['error']:.2e}/{c['bound']:.2e}" for n, c in r["checks"].items() if not c["ok"]))
    assert not bad, f"{name}: {len(bad)} of {len(sweep[name])} cases failed: " + "; ".join(
        f"D={r['D']} T={r['T']}: {r.get('error') or [n for n, c in r['checks'].items() if not c['ok']]}"[:400]
        for r in bad)
    if all(r["ok"] is None for r in sweep[name]):
        pytest.skip(sweep[name][0]["refused"])


_FAULT = r"""
import torch, effc
torch.manual_seed(0)
op = effc.load("delta_net")
B, T, H, D = 4, 2048, 8, 64
for dt in (torch.float16, torch.bfloat16):
    unit = lambda: torch.nn.functional.normalize(torch.randn(B, T, H, D, device="cuda"), dim=-1).to(dt).requires_grad_()
    q, k = unit(), unit()
    v = torch.randn(B, T, H, D, device="cuda").to(dt).requires_grad_()
    beta = torch.randn(B, T, H, device="cuda").sigmoid().to(dt).requires_grad_()
    s0 = torch.randn(B, H, D, D, device="cuda").requires_grad_()
    o, s = op(q, k, v, beta, scale=0.1, initial_state=s0, output_final_state=True)
    (o.float().sum() + s.sum()).backward()
    torch.cuda.synchronize()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v, beta, s0))
print("done")
"""


def test_delta_net_d64_does_not_fault():
    p = subprocess.run([sys.executable, "-c", _FAULT], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "done" in p.stdout, p.stderr[-3000:]


def _open_miscompile():
    from effc.policy.triton_faults import hopper_dot_miscompile
    return pytest.mark.xfail(torch.cuda.is_available() and hopper_dot_miscompile(0), strict=True,
                             reason="chunk=64 at D=32: dq wrong on Hopper with Triton < 3.7.1, cause not found")


@pytest.mark.parametrize("T, D, dtype, configs", [
    (63, 64, torch.float16, [{}, dict(chunk=16, segments=1, defer_merge=False)]),
    (63, 64, torch.bfloat16, [{}, dict(chunk=16, segments=1, defer_merge=False)]),
    (64, 32, torch.bfloat16, [dict(chunk=16)]),
    pytest.param(64, 32, torch.bfloat16, [dict(chunk=64)], marks=_open_miscompile())])
def test_delta_net_tilings_agree(T, D, dtype, configs):
    op = effc.load("delta_net_l2")  # the inputs are not unit-norm: the spec that normalises them
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, T, 1, D, generator=gen) for _ in range(3)] + [torch.rand(1, T, 1, generator=gen)]
    leaves = [x.clone().requires_grad_() for x in xs]
    ref, _ = op.reference(*leaves, scale=1.0, dtype=torch.float64)
    ref_g = torch.autograd.grad(ref, leaves, torch.ones_like(ref))
    rms = lambda x: x.double().pow(2).mean().sqrt().item()
    ratios = {}
    for cfg in configs:
        leaves = [x.to("cuda", dtype).requires_grad_() for x in xs]
        o, _ = op(*leaves, scale=1.0, **cfg)
        got = torch.autograd.grad(o.float(), leaves, torch.ones_like(o, dtype=torch.float32))
        for n, a, b in zip("o q k v beta".split(), (o,) + got, (ref,) + ref_g):
            ratios[f"{cfg} {'d' * (n != 'o')}{n}"] = rms(a.detach().cpu().double() - b.detach()) / rms(b.detach())
    print(T, D, dtype, {k: round(v, 4) for k, v in ratios.items()})
    assert all(r < 0.02 for r in ratios.values()), f"RMS(diff)/RMS(ref) above 0.02: {ratios}"
