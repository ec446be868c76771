"""Miscompiles of the Triton versions effc supports (3.6 to 3.9), and the call-time choices that avoid them.

Triton 3.4 to 3.7.0 on Hopper (sm_90) miscompile kernels that chain several dots through transposed
accumulators (fla-org/flash-linear-attention#640, #984, #988). effc meets it in its gradient kernels:
- a transposed matmul result feeding another dot: passes.transpose_sink keeps it out of every kernel;
- at 8 warps, the long gradient kernels of the general transitions (rwkv7's dw/dkappa/da, hdla's dg/du)
  came out wrong at D=64 and faulted at D=128 on the H200 (tests/gpu/test_real_inputs.py); at 4 warps
  they are right. There the backward runs 4 warps; elsewhere 8, which spill less on sm_90.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton


@lru_cache(maxsize=None)
def hopper_dot_miscompile(device_index: int) -> bool:
    """Does this GPU with the installed Triton miscompile chained dots (see the module doc)?"""
    major, _ = torch.cuda.get_device_capability(device_index)
    version = tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:3] if p.isdigit())
    return major == 9 and version < (3, 7, 1)


def backward_warps(num_warps: int, device: torch.device) -> int:
    """Warps of the gradient kernels: 8 (4 spill on sm_90), 4 where 8 is miscompiled."""
    if device.type == "cuda" and hopper_dot_miscompile(device.index or 0):
        return 4
    return max(8, num_warps)
