"""Head rows against token rows (SoftmaxTiles.head_rows) for a spec that chooses key blocks or tokens, on the
GPU: bf16 forward and forward+backward medians of each partition in one process, H=16 query heads over HK key
heads, D=128, beside dense causal SDPA, and the relative difference of the two partitions' outputs and gradients
(expect ~1e-3 in bf16). Prints one JSON line starting `ROWS` for docs/benchmarks.md.

usage: python scripts/rows_bench.py SPEC BxT HK
"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import effc
from effc.runtime.verify import random_inputs


def _time_partition(op, xs, rows: str, row: dict) -> list[torch.Tensor]:
    """The partition's output and q/k/v gradients (fp32), its config and times written into `row`."""
    ins = [x.clone().requires_grad_() for x in xs]
    o = op(*ins, partition=rows)[0]
    d_o = torch.randn(o.shape, device="cuda", dtype=o.dtype, generator=torch.Generator(device="cuda").manual_seed(1))
    got = [o.detach().float()] + [g.float() for g in torch.autograd.grad(o, ins[:3], d_o)]
    row[f"{rows}_cfg"] = str(op.last_config).splitlines()[0]
    row[f"{rows}_fwd_ms"] = do_bench(lambda: op(*ins, partition=rows), warmup=5, rep=50, return_mode="median")

    def step():
        torch.autograd.grad(op(*ins, partition=rows)[0], ins[:3], d_o)
    row[f"{rows}_fwdbwd_ms"] = do_bench(step, warmup=3, rep=50, return_mode="median")
    return got


def measure(name: str, shape: str, kv_heads: int, H: int = 16, D: int = 128) -> dict:
    op = effc.load(name)
    B, T = map(int, shape.split("x"))
    xs = random_inputs(op.spec, B, T, H, {d: D for d in op.spec.dims}, torch.bfloat16, "cuda", kv_heads=kv_heads)
    row, got = {"spec": name, "shape": shape, "H": H, "HK": kv_heads, "gpu": torch.cuda.get_device_name()}, {}
    for rows in ("heads", "tokens"):
        try:
            got[rows] = _time_partition(op, xs, rows, row)
        except Exception as e:  # noqa: BLE001 - a partition that fails is reported beside the other's numbers
            row[f"{rows}_error"] = f"{type(e).__name__}: {e}"[:300]
    if len(got) == 2:
        row["rel_diff"] = {n: ((a - b).norm() / b.norm()).item()
                           for n, a, b in zip(("o", "dq", "dk", "dv"), got["heads"], got["tokens"])}
    q, k, v = (x.transpose(1, 2) for x in xs[:3])
    k, v = (x.repeat_interleave(H // kv_heads, 1) for x in (k, v))
    row["sdpa_fwd_ms"] = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), warmup=5,
                                  rep=50, return_mode="median")
    print("ROWS " + json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    measure(sys.argv[1], sys.argv[2], int(sys.argv[3]))
