"""A coarse walk against one walk (TileConfig.walk_chunk) on the GPU: forward and forward+backward medians
and the step's peak memory for each tiling, in one process, bf16, plus each one's output difference from the
first. Writes one JSON line a row (and prints it) for docs/benchmarks.md.

usage: python scripts/walk_chunk_bench.py SPEC BxT [CHUNK:WALK_CHUNK ...]
       (default tilings: the model's, then 64, 64:128, 64:256; CHUNK alone is one walk at that chunk)
"""
from __future__ import annotations

import json
import sys

import torch
from triton.testing import do_bench

import effc
from effc.runtime.verify import random_inputs
from effc.tools.peers import time_training_step


def _knobs(text: str) -> dict:
    if text == "model":
        return {}
    chunk, _, walk = text.partition(":")
    return {"chunk": int(chunk), **({"walk_chunk": int(walk)} if walk else {})}


def measure(spec: str, shape: str, tilings, H: int = 16, D: int = 128) -> list[dict]:
    op = effc.load(spec)
    B, T = map(int, shape.split("x"))
    xs = [x.requires_grad_() for x in random_inputs(op.spec, B, T, H, {d: D for d in op.spec.dims},
                                                    torch.bfloat16, "cuda", seed=1)]
    grad_out = torch.randn_like(op(*xs)[0])
    first, rows = None, []
    for text in tilings:
        knobs = _knobs(text)
        with torch.no_grad():
            out = op(*xs, **knobs)[0]
        fwd = do_bench(lambda: op(*xs, **knobs), warmup=25, rep=100, return_mode="median")
        step, peak = time_training_step(lambda: op(*xs, **knobs)[0], xs, grad_out)
        first = out if first is None else first
        diff = ((out.float() - first.float()).norm() / first.float().norm()).item()
        row = {"spec": spec, "shape": shape, "tiling": text, "config": str(op.last_config).split("\n")[0],
               "fwd_ms": round(fwd, 4), "fwd_bwd_ms": round(step, 4), "peak_mib": round(peak, 1),
               "rel_diff_vs_first": diff, "gpu": torch.cuda.get_device_name()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    measure(sys.argv[1], sys.argv[2], sys.argv[3:] or ["model", "64", "64:128", "64:256"])
