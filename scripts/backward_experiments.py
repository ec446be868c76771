"""Experiments on the kernels' structure, each a kernel_profile.py run with one compiler choice changed from
outside the package (nothing here is a knob of effc):

- `whole_scan`: no bwd_inject: the adjoint scan keeps the cotangents' terms in its serial loop
  (passes.reverse_scan's split undone), as fla's dhu kernel does;
- `serial_stages3`: the serial kernels (walk, adjoint scan) pipelined over 3 stages, not 2 (runtime.launch.
  SERIAL_STAGES): fla's state walk autotunes 2 to 4; ptxas at sm_90 puts gated_delta_net's walk at block 32 at
  124 registers and 118,792 B of shared memory with 3 (134 and 81,924 with 2);
- `bwd_warps4`: every backward kernel at 4 warps where the model gives 8 (policy.triton_faults.backward_warps);
  ptxas (sm_90, gated_delta_net, chunk 64): bwd_inject 166 -> 223 registers, no spill at either; the after
  kernels mostly spill at 4.

usage: python scripts/backward_experiments.py EXPERIMENT SPEC [BxT ...] (a cache of its own: the modules differ)
"""
import os
import sys
import tempfile

os.environ["EFFC_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"effc-cache-{sys.argv[1]}")

import effc.compiler.pipeline as pipeline  # noqa: E402
import effc.runtime.launch as launch  # noqa: E402
from kernel_profile import main  # noqa: E402

if sys.argv[1] == "whole_scan":
    pipeline.split_reverse_scan = lambda spec, fused: fused
elif sys.argv[1] == "serial_stages3":
    launch.SERIAL_STAGES = 3
elif sys.argv[1] == "bwd_warps4":
    launch.backward_warps = lambda num_warps, kernel, device: 4
else:
    sys.exit(f"unknown experiment {sys.argv[1]!r}: whole_scan, serial_stages3 or bwd_warps4")

if __name__ == "__main__":
    main(sys.argv[2], sys.argv[3:] or ["2x8192"])
