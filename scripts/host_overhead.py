"""Where a forward call's time goes on the GPU: the do_bench median of the op and the host time per
call (the op is launch-bound when that exceeds the kernels' time).

usage: python scripts/host_overhead.py [SPEC] [BxT ...]
"""
from __future__ import annotations

import sys
import time

import torch
from triton.testing import do_bench

import effc
from effc.runtime.verify import random_inputs


def measure(spec: str, shapes, H: int = 16, D: int = 128):
    op = effc.load(spec)
    for shape in shapes:
        B, T = map(int, shape.split("x"))
        xs = random_inputs(op.spec, B, T, H, {d: D for d in op.spec.dims}, torch.bfloat16, "cuda")
        op(*xs)
        torch.cuda.synchronize()
        ms = do_bench(lambda: op(*xs), warmup=25, rep=100, return_mode="median")
        t0 = time.perf_counter()
        for _ in range(50):
            op(*xs)
        host = (time.perf_counter() - t0) / 50 * 1e3
        torch.cuda.synchronize()
        print(f"HOST {spec} {shape}: do_bench {ms:.3f} ms, host per call {host:.3f} ms, "
              f"config {op.last_config.chunk}/{op.last_config.block}/P{op.last_config.segments}", flush=True)


if __name__ == "__main__":
    measure(sys.argv[1] if len(sys.argv) > 1 else "retention", sys.argv[2:] or ["8x2048", "2x8192"])
