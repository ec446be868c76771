"""The GPU probes (scripts/fault_probe.py, scripts/grad_probe.py) run on the CPU under the interpreter, so
they do not rot between GPU sessions: a knob parses, a gradient line prints per input and state."""
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _run(*args: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, str(SCRIPTS / args[0]), *args[1:]], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_grad_probe_prints_each_gradient_beside_the_reference():
    out = _run("grad_probe.py", "retention", "1x40x1", "dtype=fp32", "dim=16", "chunk=16", "bwd_warps=8")
    lines = [line.split() for line in out.splitlines() if line.startswith("  d")]
    assert [w[0] for w in lines] == ["dq", "dk", "dv", "dinitial"], out
    assert all(float(w[w.index("effc") + 1]) < 1e-5 for w in lines), out  # effc's error in fp32


def test_fault_probe_runs_forward_and_backward():
    out = _run("fault_probe.py", "linear_attn", "1x40x1", "dim=16", "partition=loop", "refused=run")
    assert "forward ok" in out and "backward ok" in out, out


def test_fault_probe_runs_the_unsplit_adjoint_scan_from_a_cache_of_its_own():
    """experiment=whole_scan takes the adjoint scan without bwd_inject (scripts/backward_experiments.py), so its module
    must not come from the cache the tree's own (split) module sits in."""
    import shutil
    import tempfile

    cache = Path(tempfile.gettempdir()) / "effc-cache-whole_scan"
    shutil.rmtree(cache, ignore_errors=True)
    out = _run("fault_probe.py", "delta_net", "1x40x1", "dim=16", "experiment=whole_scan")
    assert "backward ok" in out, out
    modules = list((cache / "kernels").glob("effc_gen_delta_net_*.py"))
    assert modules and all("bwd_inject" not in m.read_text() for m in modules), modules
