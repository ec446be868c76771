import os

import pytest
import torch

# Without a GPU, run generated kernels in Triton's interpreter; Triton reads this when a kernel module
# is imported, so set it before any test imports one. With a GPU (tests/gpu) keep the real compiler.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


if os.environ.get("TRITON_INTERPRET") == "1":
    from interpreter_speed import patch_language_once_a_launch
    patch_language_once_a_launch()


@pytest.fixture(autouse=True)
def _bounds_checked_interpreter():
    """Under the interpreter, every load and store a kernel makes must stay inside its tensor arguments
    (tests/memcheck.py): where a GPU would fault, the interpreter reads whatever lies past the tensor."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from memcheck import checked_memory
    with checked_memory():
        yield


_SLOW = os.path.join(os.path.dirname(__file__), "slow_tests.txt")


def pytest_collection_modifyitems(config, items):
    """The tests listed in slow_tests.txt (scripts/tier_tests.py: measured >= 1 s on 2 cores) run in the full
    tier only, as if marked `slow`: the fast tier (`-m "not slow"`) stays under 3 minutes on the CI's 2 cores."""
    with open(_SLOW) as f:
        listed = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    for item in items:
        if item.nodeid in listed:
            item.add_marker(pytest.mark.slow)
