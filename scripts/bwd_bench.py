"""Forward+backward timings and peak memory of effc beside flash-linear-attention (each peer in a subprocess).
usage: python scripts/bwd_bench.py SPEC[,SPEC] BxT[,BxT] [peers 0/1]"""
import json
import subprocess
import sys

import torch
from triton.testing import do_bench

import effc
from effc.peers import PEERS
from effc.runtime.verify import random_inputs

PEER = r"""
import json, sys, importlib, time, torch
from triton.testing import do_bench
import effc
from effc.peers import PEERS
from effc.runtime.verify import random_inputs
spec, B, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
peer = PEERS[spec][0]
label = peer.label
fn = peer.make(B, T, 16, 128)
op = effc.load(spec)
xs = [x.requires_grad_() for x in random_inputs(op.spec, B, T, 16, {d: 128 for d in op.spec.dims}, torch.bfloat16, "cuda")]
named = {d.name: x for d, x in zip(op.spec.inputs, xs)}
args = [named[n] for n in peer.inputs]
do = torch.randn(B, T, 16, 128, device="cuda", dtype=torch.bfloat16)
def step():
    o = fn(*args, scale=128 ** -0.5)
    o.backward(do)
try:
    t0 = time.time(); step(); torch.cuda.synchronize(); first = time.time() - t0
    ms = do_bench(step, warmup=10, rep=50, return_mode="median", grad_to_none=args)
    torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated(); step(); torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    print("R " + json.dumps({"peer": label, "ms": ms, "peak_mib": peak, "first_s": first}))
except Exception as e:
    print("R " + json.dumps({"peer": label, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}))
"""

specs, shapes = sys.argv[1].split(","), [tuple(map(int, s.split("x"))) for s in sys.argv[2].split(",")]
peers = len(sys.argv) < 4 or sys.argv[3] == "1"
for name in specs:
    op = effc.load(name)
    for B, T in shapes:
        xs = [x.requires_grad_() for x in random_inputs(op.spec, B, T, 16, {d: 128 for d in op.spec.dims},
                                                        torch.bfloat16, "cuda")]
        do = torch.randn(B, T, 16, 128, device="cuda", dtype=torch.bfloat16)

        def step():
            o, _ = op(*xs)
            o.backward(do)
        step()
        ms = do_bench(step, warmup=10, rep=50, return_mode="median", grad_to_none=xs)
        fwd = do_bench(lambda: op(*xs), warmup=10, rep=50, return_mode="median")
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        row = {"spec": name, "B": B, "T": T, "fwd_ms": fwd, "fwdbwd_ms": ms, "peak_mib": peak,
               "history": getattr(op, "last_history_reason", ""), "config": str(op.last_config).split("\n")[0]}
        if peers and name in PEERS:
            p = subprocess.run([sys.executable, "-c", PEER, name, str(B), str(T)], capture_output=True, text=True,
                               timeout=240)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("R ")]
            row["peer"] = json.loads(lines[0][2:]) if lines else {"error": p.stderr.strip().splitlines()[-1:]}
            if "ms" in row["peer"]:
                row["speedup"] = row["peer"]["ms"] / ms
        print(json.dumps(row), flush=True)
