"""Sweep the softmax family's kernel tiles on the GPU, forward and backward walks separately, to calibrate
the model in passes/softmax.py `choose_softmax_tiles` (the forward's tiles are also `effc tune`'s job;
the backward's are the model's alone).

usage: python scripts/softmax_sweep.py [SPEC] [BxT ...]     prints one line per config, then the best
       env ONLY=dkv (or fwd, dq): sweep that kernel alone, the others at the model's tiles;
       env CONFIGS="32,64,4,3;64,64,4,2": only these (BM, BN, warps, stages) for it
       env D=192: every feature dim (default 128); H=8: heads (default 16)
"""
from __future__ import annotations

import itertools
import os
import sys

import torch
from triton.testing import do_bench

import effc
from effc.passes.softmax import SoftmaxTiles
from effc.runtime.verify import random_inputs, rel_err


def main(spec: str = "softmax_attn", shapes: tuple[str, ...] = ("2x8192",), H: int = 16, D: int = 128):
    op = effc.load(spec)
    for shape in shapes:
        B, T = map(int, shape.split("x"))
        xs = [x.requires_grad_() for x in random_inputs(op.spec, B, T, H, {d: D for d in op.spec.dims},
                                                         torch.bfloat16, "cuda")]
        base = op.config(B, T, H, {d: D for d in op.spec.dims}, xs[0].device, dtype=xs[0].dtype)
        ref = op(*xs)[0]
        grad = torch.randn_like(ref)
        ref_g = torch.autograd.grad(ref, xs[:3], grad)
        print(f"{spec} {shape}: model {base.fwd} dq {base.dq} dkv {base.dkv}", flush=True)

        def timed(tiles: SoftmaxTiles, backward: bool) -> float | str:
            op.config = lambda *a, **k: tiles
            try:
                if not backward:
                    out = op(*xs)[0]
                    assert rel_err(out.float(), ref.float()) < 2e-2
                    return do_bench(lambda: op(*xs), warmup=10, rep=40, return_mode="median")
                g = torch.autograd.grad(op(*xs)[0], xs[:3], grad)
                assert max(rel_err(a.float(), b.float()) for a, b in zip(g, ref_g)) < 2e-2
                return do_bench(lambda: torch.autograd.grad(op(*xs)[0], xs[:3], grad), warmup=5, rep=40,
                                return_mode="median")
            except Exception as e:  # noqa: BLE001 - a failing config is a row of the sweep
                return f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
            finally:
                del op.config

        only = os.environ.get("ONLY")
        listed = [tuple(map(int, c.split(","))) for c in os.environ.get("CONFIGS", "").split(";") if c]

        def grid(*axes):
            return listed or list(itertools.product(*axes))
        fwd_rows = []
        for bm, bn, w, s in grid((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)) if only in (None, "fwd") else ():
            t = timed(SoftmaxTiles((bm, bn, w, s), base.dq, base.dkv, base.pre), False)
            print(f"  fwd {(bm, bn, w, s)}: {t}", flush=True)
            if isinstance(t, float):
                fwd_rows.append((t, (bm, bn, w, s)))
        best_fwd = min(fwd_rows)[1] if fwd_rows else base.fwd
        print(f"  best fwd {min(fwd_rows) if fwd_rows else None}", flush=True)
        dq_rows, dkv_rows = [], []
        for bm, bn, w, s in grid((64, 128), (32, 64), (4, 8), (2, 3)) if only in (None, "dq") else ():
            t = timed(SoftmaxTiles(best_fwd, (bm, bn, w, s), base.dkv, base.pre), True)
            print(f"  dq {(bm, bn, w, s)}: {t}", flush=True)
            if isinstance(t, float):
                dq_rows.append((t, (bm, bn, w, s)))
        best_dq = min(dq_rows)[1] if dq_rows else base.dq
        for bm, bn, w, s in grid((32, 64, 128), (64, 128), (4, 8), (2, 3)) if only in (None, "dkv") else ():
            t = timed(SoftmaxTiles(best_fwd, best_dq, (bm, bn, w, s), base.pre), True)
            print(f"  dkv {(bm, bn, w, s)}: {t}", flush=True)
            if isinstance(t, float):
                dkv_rows.append((t, (bm, bn, w, s)))
        print(f"SWEEP {spec} {shape} best fwd {min(fwd_rows) if fwd_rows else None} "
              f"dq {min(dq_rows) if dq_rows else None} dkv {min(dkv_rows) if dkv_rows else None}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "softmax_attn", tuple(sys.argv[2:]) or ("2x8192",),
         int(os.environ.get("H", 16)), int(os.environ.get("D", 128)))
