"""GPU tests marked `isolated` run their body in a fresh Python process (pytest on the test's own id), so an
illegal memory access, which loses the process's CUDA context, fails that test alone instead of every test
after it (the 2026-12-04 run lost nine specs' gradient checks to mesanet's fault)."""
import os
import subprocess
import sys
import pytest

CHILD = "EFFC_ISOLATED_CHILD"  # set in the fresh process: there the body runs as usual


def pytest_configure(config):
    config.addinivalue_line("markers", "isolated: runs its body in a fresh process (tests/gpu/conftest.py)")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if pyfuncitem.get_closest_marker("isolated") is None or os.environ.get(CHILD):
        return None
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "--tb=short", pyfuncitem.nodeid]
    timeout = int(os.environ.get("ISOLATED_TIMEOUT", 600))
    try:
        p = subprocess.run(cmd, cwd=pyfuncitem.config.rootpath, env={**os.environ, CHILD: "1"}, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{pyfuncitem.nodeid}: no result in {timeout} s (ISOLATED_TIMEOUT) in its fresh process",
                    pytrace=False)
    out = p.stdout + p.stderr
    sys.stdout.write(out[-6000:])  # the verdicts the body prints (pytest -s shows them)
    if p.returncode == 5:
        pytest.fail(f"{pyfuncitem.nodeid}: the fresh process collected no test", pytrace=False)
    if p.returncode != 0:
        pytest.fail(f"{pyfuncitem.nodeid} failed in its fresh process (exit {p.returncode}):\n{out[-3000:]}",
                    pytrace=False)
    return True
