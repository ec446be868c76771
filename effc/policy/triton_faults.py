"""Miscompiles of the Triton versions effc supports (3.6 to 3.9), and the call-time choices that avoid them.

Triton 3.4 to 3.7.0 on Hopper (sm_90) miscompile kernels that chain several dots through transposed
accumulators (fla-org/flash-linear-attention#640, #984, #988). effc meets it in its gradient kernels:
- a transposed matmul result feeding another dot: passes.transpose_sink keeps it out of every kernel;
- at 8 warps, the long gradient kernels of the general transitions (rwkv7's dw/dkappa/da, hdla's dg/du:
  27 and more chained dots) came out wrong at D=64 and faulted at D=128 on the H200
  (tests/gpu/test_real_inputs.py); at 4 warps they are right. The other way round, zeros' gradient
  kernels (9 dots, looping over the split blocks) gave ds and dh 0.67 and 68x off at 4 warps and matched
  at 8 (2026-12-04, H200, bf16, D=128, chunk 64, block 64). So the backward runs 4 warps only for plans
  chaining more than FOUR_WARP_CHAIN dots; elsewhere 8, which spill less on sm_90 and which every kernel
  of 16 dots or fewer ran right at before the 4-warp rule (the delta rules: 15 and 16).
- a gradient kernel that chains many dots (hdla's dg and du: 72 and 63 dots) read outside shared memory
  at a 64-wide split block even at 4 warps (compute-sanitizer: an invalid __shared__ read in
  bwd_chunks_g at D=128); at a 32-wide block it ran and matched the oracle, and rwkv7's 27-dot kernels
  run right at 64. Such a plan runs 32-wide blocks there (`block_limit`).
- log_linear_attn (34 dots in one gradient kernel) and mesanet (47) faulted in their first GPU run
  (2026-12-04, H200, bf16 backward at D=128 with 64-wide blocks; an illegal memory access, the kernel not
  yet named; no access leaves its tensor under the bounds-checked interpreter): the chain length where
  the fault starts lies between rwkv7's 27 and 34, and LONG_DOT_CHAIN moved below 34.
  At 32-wide blocks they fault still (2026-12-04, second session; scripts/fault_probe.py names the kernel):
  mesanet in bwd_chunks_v_loop, bwd_chunks_k_loop or bwd_inject (compute-sanitizer: an out-of-range shared
  or local address) at blocks 16, 32 and 64, chunks 16 and 32, 4 and 8 warps, every partition, D=64 and
  128; log_linear_attn at blocks 32 and 64. What sets them apart is the state a gradient program holds:
  mesanet's [K, K] Gram state, which no block narrows, and log_linear_attn's 16 level states (65536
  elements at block 32, where zeros' three [128, 128] states, 49152, run right). `backward_fault` refuses
  those backwards there with the reason, instead of a fault that loses the process's CUDA context.
  Triton 3.7.1 does not fix it (2026-12-06, H100, carried by scripts/gpu_triton.sh): mesanet's backward
  faults there too (an illegal memory access), and log_linear_attn's, no longer narrowed to 32-wide blocks,
  asked 278528 bytes of shared memory for bwd_chunks_k_loop. So the refusal holds on sm_90 whatever the
  Triton version, while the other holds (4 warps, 32-wide blocks) end at 3.7.1.
  Run past the refusal again on 2026-12-07 (H100, Triton 3.6.0, 2x2048x16, D=128, scripts/grad_probe.py
  refused=run): mesanet faults in every partition it has (block, loop, cut, cut_each); log_linear_attn's
  kernels ask more shared memory than the GPU has at block 64 (286720 bytes, bwd_sums), and at block 32,
  where they fit (168 KB at most, compiled for sm_90 on the CPU), its cut_common partition faults.
  Spills do not tell them apart (ptxas on the CPU, scripts/ptxas_report.py): mesanet's bwd_inject spills
  16.4 KB a thread at 4 warps and 4.8 KB at 8, zeros' bwd_chunks_s_loop 12.4 KB and 4.9 KB, and zeros is
  right at 8 warps where mesanet faults.
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache

import torch
import triton

from ..ir import ops as O

_DOTS = ("matmul",) + O.DECAY  # a decay contraction runs a dot per sub-chunk anchor (passes.decay_dot)


@lru_cache(maxsize=None)
def hopper(device_index: int) -> bool:
    """Is this GPU sm_90 (H100, H200), where the faults of the module doc were seen?"""
    return torch.cuda.get_device_capability(device_index)[0] == 9


@lru_cache(maxsize=None)
def hopper_dot_miscompile(device_index: int) -> bool:
    """Does this GPU with the installed Triton miscompile chained dots (see the module doc)?"""
    return hopper(device_index) and triton_release() < (3, 7, 1)


def triton_version() -> str:
    return ".".join(triton.__version__.split("+")[0].split(".")[:3])


def triton_release() -> tuple[int, ...]:
    """The installed Triton's version as numbers, for comparisons: (3, 7, 1)."""
    return tuple(int(p) for p in triton_version().split(".") if p.isdigit())


TESTED_TRITON = ((3, 6), (3, 9))  # the README's range: the CPU suite runs on each (scripts/triton_range.sh)


@lru_cache(maxsize=None)
def warn_untested_triton() -> None:
    """Warn once per process where the installed Triton is outside the range effc is tested with: not an
    error (a newer one may well run), but its generated kernels and the holds above were never checked there."""
    low, high = TESTED_TRITON
    if not low <= triton_release()[:2] <= high:
        warnings.warn(f"effc is tested with Triton {low[0]}.{low[1]} to {high[0]}.{high[1]}; this is Triton "
                      f"{triton_version()}: its kernels may fail to compile or miscompile (README: Install)",
                      RuntimeWarning, stacklevel=3)


# dots in one gradient kernel above which an affected GPU runs the backward at 4 warps: between the longest
# chain seen right at 8 (gated_delta_net_l2's 16) and the shortest seen wrong there (rwkv7's 27)
FOUR_WARP_CHAIN = 20


def backward_warps(num_warps: int, kernel, device: torch.device) -> int:
    """Warps of one backward kernel: 8 (4 spill on sm_90), 4 where its dot chain is long enough to be
    miscompiled at 8 (see the module doc). Per kernel: one long kernel of a plan (gated_delta_net's 23-dot
    dg) does not put the plan's short ones at 4 warps, where their fp32 tiles take twice the registers."""
    if (device.type == "cuda" and hopper_dot_miscompile(device.index or 0)
            and dot_chain(kernel) > FOUR_WARP_CHAIN):
        return 4
    return max(8, num_warps)


def parts_fault(spec, dims) -> str | None:
    """Why a call on a GPU keeps the padded tile rather than running `dims` in parts (runtime.dim_parts):
    mlstm_sig's backward with K=96 as 64 + 32 gave every gradient wrong in bf16 on the H200 (2026-12-05,
    Triton 3.6: 7 checks over their bound at T=63, an illegal address at T=2048), where the fp32 interpreter
    matches the oracle and gla, delta_net_l2 and gated_delta_net pass in parts; what sets it apart is its
    vector state n: [K], split too. Forced on and off in one run: padded, mlstm_sig and mlstm pass; in parts
    both fail (mlstm faults at D=96), and compute-sanitizer sees no bad access at T=63. The kernel at fault is
    not found yet: such a split waits for it."""
    for s in spec.states:
        if len(s.dims) == 1 and s.dims[0] in dims:
            return (f"padded tiles on the GPU: the vector state {s.name}: [{s.dims[0]}] in parts gave wrong bf16 "
                    "gradients on the H200 (2026-12-05), not diagnosed yet (policy.triton_faults.parts_fault)")
    return None


# dots in one gradient kernel above which the split block stays at most 32 wide on an affected GPU: between
# the longest chain seen right at 64 (rwkv7's 27) and the shortest seen faulting (log_linear_attn's 34)
LONG_DOT_CHAIN = 30


def dot_chain(kernel) -> int:
    """The matmuls of one kernel (the softmax family's kernels list no ops: 0)."""
    return sum(op.kind in _DOTS for op in kernel.ops)


def longest_dot_chain(kernels) -> int:
    """The most matmuls in one gradient kernel of a plan."""
    return max((dot_chain(k) for k in kernels if k.backward), default=0)


# matrix-state elements one gradient program holds above which an affected GPU faults: the most seen running
# right (zeros at block 128: three [128, 128] states), below log_linear_attn's 16 [128, 32] level states
HELD_STATE_LIMIT = 3 * 128 * 128


def backward_fault(states, dims: dict[str, int], split_dim: str | None, block: int, device) -> str | None:
    """Why the gradient kernels of a plan with these states would fault on `device` (see the module doc), or
    None. `dims`: the call's feature dim sizes; the split dim is held `block` columns at a time."""
    if device.type != "cuda" or not hopper(device.index or 0):
        return None
    return sm90_backward_fault(states, dims, split_dim, block)


def sm90_backward_fault(states, dims: dict[str, int], split_dim: str | None, block: int) -> str | None:
    """backward_fault's reason on sm_90, whatever GPU this process has (the AOT checks compile for sm_90)."""
    where = (f"on this GPU (sm_90; Triton {triton_version()}): its gradient kernels fault there (an illegal "
             "memory access at every tile config tried, with Triton 3.6.0 and 3.7.1; policy/triton_faults.py). "
             "The forward runs; a GPU other than sm_90 may run the backward (not tried)")
    square = [s for s in states if len(s.feature_dims) == 2 and s.feature_dims[0] == s.feature_dims[1]]
    if square:
        named = ", ".join(f"{s.name}: [{', '.join(s.feature_dims)}]" for s in square)
        return f"the backward of a square state ({named}) " + where
    matrices = [s for s in states if len(s.feature_dims) == 2]
    held = sum(math.prod(block if d == split_dim else dims[d] for d in s.feature_dims) for s in matrices)
    if held > HELD_STATE_LIMIT:
        return (f"a backward whose programs hold {held} state elements ({len(matrices)} matrix states at block "
                f"{block}; at most {HELD_STATE_LIMIT} run) " + where)
    return None


def block_limit(kernels, device) -> int | None:
    """The widest split block this plan's gradient kernels run right at on `device`; None: no limit."""
    if device.type != "cuda" or not hopper_dot_miscompile(device.index or 0):
        return None
    return 32 if longest_dot_chain(kernels) > LONG_DOT_CHAIN else None
