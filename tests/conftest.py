import os

import torch

# Without a GPU, run generated kernels in Triton's interpreter; Triton reads this when a kernel module
# is imported, so set it before any test imports one. With a GPU (tests/gpu) keep the real compiler.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
