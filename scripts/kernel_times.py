"""Per-kernel GPU time of one spec's forward + backward at several head dims (torch.profiler), and the
same call at pinned knobs: where a head dim's time goes, kernel by kernel.

    python scripts/kernel_times.py softmax_attn 8x4096 --dims 60,64 [--knobs block=64]
"""
import argparse
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import effc
from effc.runtime.verify import random_inputs


def kernel_times(name: str, B: int, T: int, H: int, D: int, knobs: dict, reps: int = 5) -> dict:
    op = effc.load(name)
    xs = [x.requires_grad_() for x in random_inputs(op.spec, B, T, H, {d: D for d in op.spec.dims},
                                                     torch.bfloat16, "cuda")]

    def step():
        out = op(*xs, **knobs)[0]
        out.backward(torch.ones_like(out))

    for _ in range(3):  # compile and warm
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    per = defaultdict(float)
    for e in prof.key_averages():
        if e.device_time_total > 0:
            per[e.key[:60]] += e.device_time_total / reps / 1e3
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("shape", help="BxT")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--knobs", default="", help="k=v,... passed to every call (ints, or names: partition=block)")
    args = ap.parse_args()
    B, T = map(int, args.shape.split("x"))
    knobs = {k: int(v) if v.isdigit() else v for k, v in (kv.split("=") for kv in args.knobs.split(",") if kv)}
    for D in map(int, args.dims.split(",")):
        t = kernel_times(args.spec, B, T, args.heads, D, knobs)
        print(json.dumps({"spec": args.spec, "shape": args.shape, "D": D, "knobs": knobs,
                          "total_ms": round(sum(t.values()), 3), "kernels_ms": {k: round(v, 3) for k, v in t.items()}}))


if __name__ == "__main__":
    main()
