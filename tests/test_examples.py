"""The examples folder stays runnable: its specs (not in library/) compile, and a training step through each
matches the oracle (the script's --small mode: fp32 under Triton's interpreter)."""
import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_examples_train_step_runs_and_matches_the_oracle(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "EFFC_CACHE_DIR": str(tmp_path)}
    p = subprocess.run([sys.executable, str(EXAMPLES / "train_step.py"), "--small"], capture_output=True, text=True,
                       env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    specs = sorted(f.stem for f in EXAMPLES.glob("*.attn"))
    assert sorted({ln.split()[0] for ln in lines}) == specs
    assert len(lines) == 17 and all(ln.endswith(" ok") for ln in lines)  # o + 5 grads, o + 4 grads, o + 5 grads
