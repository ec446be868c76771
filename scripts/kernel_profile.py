"""Where a spec's forward and forward+backward time goes, kernel by kernel (torch.profiler CUDA times).

usage: python scripts/kernel_profile.py SPEC [BxT ...] (bf16, H=16; env DIMS=60,64 every feature dim, one profile
       each (default 128); CHUNK=32 / BLOCK=128 force the chunk / the split dim's block (WARPS=4 the forward's
       warps): BLOCK=128 runs one program per head with no partial gradients; PARTITION=block|loop|cut|cut_each|
       cut_common the backward's gradient kernels, passes.partition; WALK_BLOCK=32 forces the block of a general
       transition's walk and adjoint scan, at most BLOCK; WALK_CHUNK=64 the coarse walk's chunk; KV_HEADS=1 the
       key-side inputs' heads, for a spec with key heads; DEFER_MERGE=1 / 0 merge in the out kernel / in the
       walk; DECODE=1 profiles one decoding step of B requests against a cache of T tokens, op.decode, instead of
       the training calls)
"""
from __future__ import annotations

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import effc
from effc.runtime.verify import random_inputs


def kernel_table(fn, steps: int = 5) -> list[tuple[str, float, int]]:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / steps / 1e3, e.count // steps) for e in prof.key_averages()
            if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def _print_table(title: str, rows, config) -> None:
    print(f"PROFILE {title}: total {sum(r[1] for r in rows):.3f} ms (config {config})", flush=True)
    for name, ms, count in rows[:12]:
        print(f"  {ms:8.3f} ms  x{count:<3d} {name[:100]}", flush=True)


def _profile_decode(op, spec: str, shape: str, B: int, T: int, D: int) -> None:
    from effc.tools.bench_decode import decode_call
    step = decode_call(op, B, T, 16, int(os.environ.get("KV_HEADS", 2)), D, 1)
    _print_table(f"{spec} {shape} D={D} decode", kernel_table(step), getattr(op, "last_decode", None))


def main(spec: str, shapes: list[str]) -> None:
    options = {knob: int(os.environ[env]) for knob, env in (("chunk", "CHUNK"), ("block", "BLOCK"),
                                                            ("walk_block", "WALK_BLOCK"), ("walk_chunk", "WALK_CHUNK"),
                                                            ("num_warps", "WARPS"))
               if env in os.environ}
    if os.environ.get("PARTITION"):
        options["partition"] = os.environ["PARTITION"]
    if os.environ.get("DEFER_MERGE"):
        options["defer_merge"] = os.environ["DEFER_MERGE"] == "1"
    op = effc.load(spec)
    for shape, D in ((s, int(d)) for s in shapes for d in os.environ.get("DIMS", "128").split(",")):
        B, T = map(int, shape.split("x"))
        xs = random_inputs(op.spec, B, T, 16, {d: D for d in op.spec.dims}, torch.bfloat16, "cuda",
                           kv_heads=int(os.environ.get("KV_HEADS", 0)) or None)
        if os.environ.get("DECODE"):
            _profile_decode(op, spec, shape, B, T, D)
            continue
        leaves = [x.requires_grad_() if x.is_floating_point() else x for x in xs]
        wrt = [x for x in leaves if x.requires_grad]
        d_out = torch.randn_like(op(*xs, **options)[0])  # made once: the step's own kernels only, as the bench

        def fwd_bwd():  # gradients returned, not added into .grad, and no fp32 copy of the output
            out, _ = op(*leaves, **options)
            torch.autograd.grad(out, wrt, d_out, allow_unused=True)

        for label, fn in (("forward", lambda: op(*xs, **options)), ("forward+backward", fwd_bwd)):
            _print_table(f"{spec} {shape} D={D} {label}", kernel_table(fn), getattr(op, "last_config", None))
        from effc.runtime import launch
        late = sorted({f.__name__ for key, f in getattr(launch, "_SPILL_FREE", {}).items() if id(f) != key[0]})
        print(f"  from the late-loads module (spilled with loads first): {', '.join(late) or 'none'}; "
              f"dim {getattr(op, 'last_dim_parts', '') or 'no parts'}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["2x8192"])
