"""bwd_inject of gated_delta_net at 2x8192 under other launch options: the model puts it near 0.2 ms, the
H100 measured 0.84 (the forward's out kernel, of the same grid and loads, 0.25).

usage: python scripts/inject_probe.py [SPEC] [BxT]   (prints one line per variant: warps, stages, ms)
"""
from __future__ import annotations

import sys

import torch

import effc
from effc.runtime import launch
from effc.runtime.verify import random_inputs

sys.path.insert(0, "scripts")
from kernel_profile import kernel_table  # noqa: E402


def main(spec: str = "gated_delta_net", shape: str = "2x8192") -> None:
    op = effc.load(spec)
    B, T = map(int, shape.split("x"))
    xs = random_inputs(op.spec, B, T, 16, {d: 128 for d in op.spec.dims}, torch.bfloat16, "cuda")
    leaves = [x.requires_grad_() if x.is_floating_point() else x for x in xs]

    def step():
        out, _ = op(*leaves)
        out.float().sum().backward()

    launch_options = launch.Launcher._launch
    for warps, stages in ((None, None), (4, 1), (4, 2), (8, 1), (8, 2), (4, 3)):
        def patched(self, kp, grid, values, options, warps=warps, stages=stages):
            if kp.name == "bwd_inject" and warps:
                options = {**options, "num_warps": warps, "num_stages": stages}
            return launch_options(self, kp, grid, values, options)
        launch.Launcher._launch = patched
        rows = kernel_table(step)
        inject = [r for r in rows if "bwd_inject" in r[0]]
        out = [r for r in rows if "_out_kernel" in r[0]]
        print(f"INJECT warps={warps or 'default'} stages={stages or 'default'}: bwd_inject "
              f"{inject[0][1] if inject else float('nan'):.3f} ms, out {out[0][1] if out else float('nan'):.3f} ms, "
              f"step {sum(r[1] for r in rows):.3f} ms (config {op.last_config})", flush=True)
    launch.Launcher._launch = launch_options


if __name__ == "__main__":
    main(*sys.argv[1:])
