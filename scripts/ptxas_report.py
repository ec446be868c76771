"""Registers and spills of each generated kernel on sm_90, measured without a GPU: Triton's AOT path
compiles the kernel, then `ptxas -v` reports what the hardware would run. A CPU-side check of a codegen
change that moves live tiles around (spills cost far more than the recomputation they avoid).

    python scripts/ptxas_report.py delta_net mlstm [--chunk 64] [--kernels bwd] [--dim 192 --block 32 --fwd-warps 8]
    python scripts/ptxas_report.py softmax_attn forgetting_transformer     (the softmax family: model tiles)
    python scripts/ptxas_report.py gated_delta_net --late-loads    (loads at their first reader: the module a launch
                                                                    takes a spilling kernel from, runtime.launch.spill_free)
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from types import SimpleNamespace
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402

import effc  # noqa: E402
from effc.codegen.triton.aot import SOFTMAX_KERNELS, compile_sm90, compile_softmax_sm90  # noqa: E402
from effc.codegen.triton.emit import SERIAL_ROLES  # noqa: E402
from effc.runtime.launch import SERIAL_STAGES  # noqa: E402

PTXAS = get_ptxas(90).path  # the ptxas Triton itself runs for sm_90 (Triton 3.9: its CUDA 13 one)


def ptxas_usage(ptx: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        log = subprocess.run([str(PTXAS), "-arch=sm_90a", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spills.group(1)) if spills else 0, "spill_loads": int(spills.group(2)) if spills else 0}


def report(spec: str, chunk: int | None, only: str, bwd_warps: int = 8, dim: int | None = None,
           block: int | None = None, fwd_warps: int = 4, late_loads: bool = False) -> dict:
    op = effc.load(spec)
    rows = {}
    if hasattr(op, "sched"):  # the softmax family: its kernels at the model's tiles (--chunk, --bwd-warps unused)
        for kernel in SOFTMAX_KERNELS:
            if kernel.startswith(only):
                k = compile_softmax_sm90(op, kernel)
                rows[kernel] = {"warps": k.metadata.num_warps, **ptxas_usage(k.asm["ptx"])}
        return rows
    op = getattr(op, "linear", op)
    if late_loads:
        op = SimpleNamespace(module=op.late_module, spec=op.spec, comp=op.comp, name=op.name)
    plan = op.comp.plan
    for kp in plan.kernels:
        if not kp.name.startswith(only):
            continue
        warps = bwd_warps if kp.name.startswith("bwd") else fwd_warps  # runtime.launch: see policy.triton_faults
        # a walk with an out kernel runs with merge deferred (FUSE_MERGE off) or fused, as the tiling model says
        for fuse_merge in ((False, True) if kp.role == "walk" and plan.deferrable else (True,)):
            # the serial kernels run with SERIAL_STAGES, so the next chunk's loads overlap this one's work
            stages = SERIAL_STAGES if kp.role in SERIAL_ROLES else 1
            k = compile_sm90(op, kp, chunk=chunk, num_warps=warps, num_stages=stages, block=block, fuse_merge=fuse_merge,
                             dims={d: dim for d in op.spec.dims} if dim else None)
            name = kp.name + ("+merge" if kp.role == "walk" and plan.deferrable and fuse_merge else "")
            rows[name] = {"warps": warps, **ptxas_usage(k.asm["ptx"])}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--chunk", type=int, default=None, help="the chunk size (default: the spec's)")
    ap.add_argument("--kernels", default="", help="only kernels whose name starts with this (e.g. bwd)")
    ap.add_argument("--bwd-warps", type=int, default=8, help="warps of the backward kernels (runtime: 8)")
    ap.add_argument("--dim", type=int, default=None, help="every feature dim's size (default 128; any size, padded)")
    ap.add_argument("--block", type=int, default=None, help="the split dim's block (default: 64, or the padded dim)")
    ap.add_argument("--fwd-warps", type=int, default=4, help="warps of the forward kernels")
    ap.add_argument("--late-loads", action="store_true", help="each chunk-parallel kernel's loads at their first reader")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()
    out = {s: report(s, args.chunk, args.kernels, args.bwd_warps, args.dim, args.block, args.fwd_warps, args.late_loads)
           for s in args.specs}
    if args.json:
        print(json.dumps(out))
        return
    for spec, rows in out.items():
        for name, r in rows.items():
            print(f"{spec:16s} {name:18s} warps={r['warps']} regs={r['registers']} "
                  f"spill stores={r['spill_stores']} B loads={r['spill_loads']} B")


if __name__ == "__main__":
    sys.exit(main())
