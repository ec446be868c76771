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

usage: python scripts/backward_experiments.py EXPERIMENT SPEC [BxT ...] (a cache of its own: the modules differ);
scripts/fault_probe.py takes the same experiments (`experiment=NAME`)
"""
import os
import sys
import tempfile

import effc.compiler.pipeline as pipeline
import effc.runtime.launch as launch

EXPERIMENTS = {
    "whole_scan": lambda: setattr(pipeline, "split_reverse_scan", lambda spec, fused, split=None: fused),
    "serial_stages3": lambda: setattr(launch, "SERIAL_STAGES", 3),
    "bwd_warps4": lambda: setattr(launch, "backward_warps", lambda num_warps, kernel, device: 4),
}


def apply(name: str) -> None:
    """Change effc as experiment `name` says, with a kernel cache of its own: the cache's key is the spec, not
    the compiler, so a changed pipeline would otherwise load the tree's modules."""
    if name not in EXPERIMENTS:
        sys.exit(f"unknown experiment {name!r}: {', '.join(EXPERIMENTS)}")
    os.environ["EFFC_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"effc-cache-{name}")
    EXPERIMENTS[name]()


if __name__ == "__main__":
    from kernel_profile import main  # this folder: scripts/

    apply(sys.argv[1])
    main(sys.argv[2], sys.argv[3:] or ["2x8192"])
