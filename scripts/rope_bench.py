"""RoPE fused in the score (library softmax_rope: every key block rotated in every program) against RoPE in the
prefix (tests/test_prefix_pos.py's spec: q and k rotated once per token before the walks) and against
rotating q and k in PyTorch then calling softmax_attn, on the GPU: bf16 forward and forward+backward medians
in one process, and the outputs' and gradients' relative difference from the fused form. Prints one JSON line
starting `ROPE` for docs/benchmarks.md.

usage: python scripts/rope_bench.py [BxT]      (H=16, D=128)
"""
from __future__ import annotations

import json
import os
import sys

import torch
from triton.testing import do_bench

import effc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_prefix_pos import ROPE_PREFIX  # noqa: E402


def _rotate(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoFormer's rotate-half rotation of (B, T, H, D) by each token's position, in x's dtype."""
    T, D = x.shape[1], x.shape[-1]
    inv = base ** (-2 * torch.arange(D // 2, device=x.device, dtype=torch.float32) / D)
    ang = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * torch.cat((inv, inv))[None]
    cos, sin = (f(ang)[None, :, None].to(x.dtype) for f in (torch.cos, torch.sin))
    return x * cos + torch.cat((-x[..., D // 2:], x[..., :D // 2]), -1) * sin


def main(shape: str = "2x8192", H: int = 16, D: int = 128) -> dict:
    B, T = map(int, shape.split("x"))
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
    fused, prefix, plain = effc.load("softmax_rope"), effc.loads(ROPE_PREFIX, "rope_prefix"), effc.load("softmax_attn")
    ways = {"fused": lambda q, k, v: fused(q, k, v)[0], "prefix": lambda q, k, v: prefix(q, k, v)[0],
            "torch_then_op": lambda q, k, v: plain(_rotate(q), _rotate(k), v)[0]}
    row, got = {"shape": shape, "H": H, "D": D, "gpu": torch.cuda.get_device_name()}, {}
    d_o = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    for name, fn in ways.items():
        ins = [x.clone().requires_grad_() for x in xs]
        o = fn(*ins)
        got[name] = [o.detach().float()] + [t.float() for t in torch.autograd.grad(o, ins, d_o)]
        row[f"{name}_fwd_ms"] = do_bench(lambda: fn(*ins), warmup=5, rep=50, return_mode="median")
        row[f"{name}_fwdbwd_ms"] = do_bench(lambda: torch.autograd.grad(fn(*ins), ins, d_o), warmup=3, rep=50,
                                            return_mode="median")
    for name in ("prefix", "torch_then_op"):
        row[f"{name}_rel_diff"] = {n: ((a - b).norm() / b.norm()).item()
                                   for n, a, b in zip(("o", "dq", "dk", "dv"), got[name], got["fused"])}
    print("ROPE " + json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main(*sys.argv[1:2])
