"""tests/gpu/conftest.py: a test marked `isolated` runs in a fresh process, so a crash there (a lost CUDA
context on the GPU; here os._exit) fails that test and leaves the next one to run. Checked on the CPU on a
copy of the conftest over two small tests."""
import shutil
import subprocess
import sys
from pathlib import Path

BODY = '''
import os
import pytest

pytestmark = pytest.mark.isolated


def test_crashes():
    print("about to crash")
    os._exit(3)


def test_runs_after_the_crash():
    print("verdict: ok")
    assert os.environ["EFFC_ISOLATED_CHILD"] == "1"
'''


def test_a_crash_fails_its_test_alone(tmp_path):
    shutil.copy(Path(__file__).parent / "gpu" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_two.py").write_text(BODY)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-p", "no:xdist",
                        str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    assert "FAILED test_two.py::test_crashes" in out and "exit 3" in out, out
    assert "PASSED test_two.py::test_runs_after_the_crash" in out and "verdict: ok" in out, out
