"""Replay every candidate of `effc tune`'s search space for one shape, one at a time, each timed the way the
tuner's final round times it (do_bench 25/100) and synchronized, to find a config that faults on the GPU
(an illegal memory access poisons the CUDA context, so the first failure is the culprit).

usage: python scripts/tune_replay.py SPEC BxT [H] [D]
"""
from __future__ import annotations

import sys

import torch
from triton.testing import do_bench

import effc
from effc.policy.search import search_space
from effc.policy.tiling import Problem
from effc.runtime.verify import random_inputs, rel_err


def main(spec: str, shape: str, H: int = 16, D: int = 128) -> int:
    op = effc.load(spec)
    B, T = map(int, shape.split("x"))
    dims = {d: D for d in op.spec.dims}
    props = torch.cuda.get_device_properties(0)
    problem = Problem(B, T, H, tuple(sorted(dims.items())), props.multi_processor_count)
    space = search_space(op.spec, op.comp.legality, problem, dtype_bytes=2,
                         smem_limit=props.shared_memory_per_block_optin)
    xs = random_inputs(op.spec, B, T, H, dims, torch.bfloat16, "cuda")
    ref = op(*xs, **space.default.overrides())[0].float()
    for group in space.groups():
        for c in group:
            kw = c.overrides()
            try:
                out = op(*xs, **kw)[0]
                torch.cuda.synchronize()
                err = rel_err(out.float(), ref)
                ms = do_bench(lambda: op(*xs, **kw), warmup=25, rep=100, return_mode="median")
                torch.cuda.synchronize()
                print(f"{c}  {ms:.3f} ms  err {err:.1e}", flush=True)
            except Exception as e:  # noqa: BLE001 - the row that faults is what this script looks for
                print(f"{c}  FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])))
