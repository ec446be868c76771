"""Kernels of one training step under other launch options (warps, stages), each kernel alone: what the
tiling model's defaults leave on the table, kernel by kernel (torch.profiler CUDA times), and how far each
variant's output and gradients are from the default launch's (bf16: ~1e-2 is rounding; a miscompile is O(1)).

usage: python scripts/launch_probe.py [SPEC] [BxT]   (env KERNELS="bwd_inject walk bwd_scan": the plan's kernel
       names; prints one line per kernel and variant: warps, stages, that kernel's ms, the step's ms)
"""
from __future__ import annotations

import os
import sys

import torch

import effc
from effc.runtime import launch
from effc.runtime.verify import random_inputs

sys.path.insert(0, "scripts")
from kernel_profile import kernel_table  # noqa: E402

VARIANTS = ((None, None), (4, 1), (4, 2), (4, 3), (8, 1), (8, 2))


def main(spec: str = "gated_delta_net", shape: str = "2x8192") -> None:
    op = effc.load(spec)
    B, T = map(int, shape.split("x"))
    xs = random_inputs(op.spec, B, T, 16, {d: 128 for d in op.spec.dims}, torch.bfloat16, "cuda")
    leaves = [x.requires_grad_() if x.is_floating_point() else x for x in xs]

    def step():
        for x in leaves:
            x.grad = None
        out, _ = op(*leaves)
        out.float().sum().backward()
        return [out.detach().float()] + [x.grad.float() for x in leaves if x.grad is not None]

    def off(values, base) -> float:  # the largest relative RMS difference from the default launch's
        return max(float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))
                   for a, b in zip(values, base))

    base = step()

    original = launch.Launcher._launch
    for kernel in os.environ.get("KERNELS", "bwd_inject walk bwd_scan").split():
        for warps, stages in VARIANTS:
            def patched(self, kp, grid, values, options, warps=warps, stages=stages, kernel=kernel):
                if kp.name == kernel and warps:
                    options = {**options, "num_warps": warps, "num_stages": stages}
                return original(self, kp, grid, values, options)
            launch.Launcher._launch = patched
            try:
                diff = off(step(), base)  # a miscompile shows here, before any time is read
                rows = kernel_table(step)
            except Exception as e:  # a variant past the GPU's resources: say so, go on
                print(f"PROBE {spec} {shape} {kernel} warps={warps} stages={stages}: {type(e).__name__}: "
                      f"{str(e)[:120]}", flush=True)
                continue
            mine = [ms for name, ms, _ in rows if f"_{kernel}_kernel" in name]
            print(f"PROBE {spec} {shape} {kernel} warps={warps or 'default'} stages={stages or 'default'}: "
                  f"{mine[0] if mine else float('nan'):.3f} ms, step {sum(r[1] for r in rows):.3f} ms, "
                  f"output and gradients within {diff:.1e} of the default launch's "
                  f"(config {op.last_config})", flush=True)
    launch.Launcher._launch = original


if __name__ == "__main__":
    main(*sys.argv[1:])
