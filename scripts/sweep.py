"""Time a grid of tile configs for one spec and shape on the GPU (a manual precursor of `effc tune`).
usage: python scripts/sweep.py SPEC BxT [BxT ...]"""
import itertools
import sys

import torch
from triton.testing import do_bench

import effc
from effc.runtime.verify import random_inputs

name, shapes = sys.argv[1], [tuple(map(int, s.split("x"))) for s in sys.argv[2:]]
op = effc.load(name)
H, D = 16, 128
for B, T in shapes:
    xs = random_inputs(op.spec, B, T, H, {d: D for d in op.spec.dims}, torch.bfloat16, "cuda")
    op(*xs)
    auto = op.last_config
    ref, _ = op(*xs)
    rows = []
    for chunk, warps, stages, pmul, block in itertools.product((32, 64), (4, 8), (1, 2, 3), (1, 2), (64,)):
        try:
            seg = max(1, auto.segments * pmul * (64 // chunk)) if auto.segments > 1 else 1
            f = lambda: op(*xs, chunk=chunk, num_warps=warps, num_stages=stages, segments=seg, block=block)
            out, _ = f()
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            ms = do_bench(f, warmup=10, rep=50, return_mode="median")
            rows.append((ms, f"C={chunk} warps={warps} stages={stages} P={seg} block={block} err={err:.1e}"))
        except Exception as e:
            rows.append((1e9, f"C={chunk} warps={warps} stages={stages} pmul={pmul}: {type(e).__name__} {str(e)[:80]}"))
    rows.sort()
    print(f"== {name} {B}x{T} auto={auto.chunk}/{auto.num_warps}/{auto.num_stages}/P{auto.segments}")
    for ms, desc in rows[:8]:
        print(f"  {ms:.3f} ms  {desc}")
    print(f"  worst: {rows[-1][0]:.3f} {rows[-1][1]}")
