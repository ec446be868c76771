"""`effc bench`: effc's kernels beside the peers, same inputs, one GPU, one run.

Each peer runs in its own subprocess (its first call may autotune for minutes, or crash).
FLOPs and bytes come from the spec itself: every matmul of the walk kernel, per chunk, and
every input and output read or written once."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import sympy

from .ir.nodes import C, dim
from .passes.shapes import value_types
from .peers import PEERS


def spec_flops(op, B: int, T: int, H: int, dims: dict[str, int], chunk: int) -> float:
    types = value_types(op.spec)
    per_chunk = sympy.Integer(0)
    for o in op.comp.plan.kernel("walk").ops:
        if o.kind == "matmul":
            (m, k), (_, n) = types[o.args[0]].shape, types[o.args[1]].shape
            per_chunk += 2 * m * k * n
    subs = {C: chunk, **{dim(d): v for d, v in dims.items()}}
    return float(per_chunk.subs(subs)) * math.ceil(T / chunk) * B * H


def io_bytes(xs, out) -> int:
    return sum(x.numel() * x.element_size() for x in xs) + out.numel() * out.element_size()


def _peer(spec: str, B: int, T: int, H: int, D: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "effc.peers", spec, str(B), str(T), str(H), str(D)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f} s (first call autotuning)"}
    for line in p.stdout.splitlines():
        if line.startswith("EFFC_PEER_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    return {"error": f"peer process exited {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1][:200]}"}


def run_bench(specs, shapes, H: int, D: int, peers: bool, peer_timeout: float, json_out: Path | None):
    import torch
    from triton.testing import do_bench

    import effc
    from .runtime.verify import random_inputs

    if not torch.cuda.is_available():
        raise RuntimeError("effc bench needs a CUDA GPU (timings under the interpreter mean nothing)")
    gpu = torch.cuda.get_device_name()
    rows = []
    for name in specs:
        op = effc.load(name)
        for B, T in shapes:
            dims = {d: D for d in op.spec.dims}
            xs = random_inputs(op.spec, B, T, H, dims, torch.bfloat16, "cuda")
            t0 = time.time()
            out, _ = op(*xs)
            torch.cuda.synchronize()
            first = time.time() - t0
            ms = do_bench(lambda: op(*xs), warmup=25, rep=100, return_mode="median")
            cfg = op.last_config
            row = {"spec": name, "B": B, "T": T, "H": H, "D": D, "gpu": gpu, "effc_ms": ms, "effc_first_call_s": first,
                   "config": f"C={cfg.chunk} block={cfg.block} P={cfg.segments} warps={cfg.num_warps}",
                   "TB/s": io_bytes(xs, out) / ms / 1e9, "TFLOP/s": spec_flops(op, B, T, H, dims, cfg.chunk) / ms / 1e9}
            if peers and name in PEERS:
                res = _peer(name, B, T, H, D, peer_timeout)
                row.update({f"peer_{k}": v for k, v in res.items()})
                if "ms" in res:
                    row["speedup"] = res["ms"] / ms
            rows.append(row)
            _print_row(row)
            del xs, out
            torch.cuda.empty_cache()
    _print_table(rows)
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=1))
    return rows


def _print_row(r):
    print(json.dumps(r), flush=True)


def _print_table(rows):
    head = f"{'spec':12s} {'BxT':>9s} {'effc ms':>8s} {'TB/s':>5s} {'TFLOP/s':>7s} {'peer':22s} {'peer ms':>8s} {'speedup':>7s} {'diff':>8s}  config"
    print(head)
    for r in rows:
        peer = r.get("peer_peer", "-") if "peer_error" not in r else "error"
        pms = f"{r['peer_ms']:.3f}" if "peer_ms" in r else "-"
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        diff = f"{r['peer_rel_diff_vs_effc']:.1e}" if "peer_rel_diff_vs_effc" in r else "-"
        print(f"{r['spec']:12s} {str(r['B']) + 'x' + str(r['T']):>9s} {r['effc_ms']:8.3f} {r['TB/s']:5.2f} "
              f"{r['TFLOP/s']:7.1f} {peer:22s} {pms:>8s} {sp:>7s} {diff:>8s}  {r['config']}")
        if "peer_error" in r:
            print(f"    peer: {r['peer_error']}")
