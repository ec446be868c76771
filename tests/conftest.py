import os

import pytest
import torch

# Without a GPU, run generated kernels in Triton's interpreter; Triton reads this when a kernel module
# is imported, so set it before any test imports one. With a GPU (tests/gpu) keep the real compiler.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
