"""Where a training step's time goes beyond its kernels: the bench's own step timing (peers.time_training_step)
against the sum of the step's kernel times (torch.profiler), the host time to issue one step, and the
compiled-form choices (runtime.launch.spill_free) made per step once warm; with --cprofile, then where the host
time goes (cProfile of 10 warm steps: a step whose host time exceeds its kernels' is launch bound).

usage: python scripts/step_gap.py SPEC [BxT] [--cprofile] (bf16, H=16, D=128)
"""
from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import time

import torch

import effc
from effc.runtime import launch
from effc.runtime.verify import random_inputs
from effc.tools.peers import time_training_step
from kernel_profile import kernel_table


def main(spec: str, shape: str, host_profile: bool = False) -> None:
    B, T = map(int, shape.split("x"))
    op = effc.load(spec)
    xs = random_inputs(op.spec, B, T, 16, {d: 128 for d in op.spec.dims}, torch.bfloat16, "cuda")
    leaves = [x.requires_grad_() if x.is_floating_point() else x for x in xs]
    grad = torch.randn_like(op(*xs)[0])

    def step():
        op(*leaves)[0].backward(grad)

    ms, peak = time_training_step(lambda: op(*leaves)[0], leaves, grad)
    forms = len(launch._SPILL_FREE)
    host = []
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    rows = kernel_table(step)
    kernels = sum(r[1] for r in rows)
    print(f"GAP {spec} {shape}: bench step {ms:.3f} ms, kernels {kernels:.3f} ms ({sum(r[2] for r in rows)} launches), "
          f"host issue {statistics.median(host):.3f} ms, peak {peak:.0f} MiB, compiled forms {forms} -> "
          f"{len(launch._SPILL_FREE)} after 25 more steps; config {op.last_config}", flush=True)
    for name, t, n in rows[:14]:
        print(f"  {t:8.3f} ms  x{n:<3d} {name[:90]}", flush=True)
    if host_profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(28)
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--cprofile"]
    main(args[0], args[1] if len(args) > 1 else "2x8192", "--cprofile" in sys.argv)
