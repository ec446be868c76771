"""Peer kernels for `effc bench`: which installed library function computes the same thing
as a spec, run in a subprocess of its own (so one peer's autotuning or crash costs only its row).
This table belongs to benchmarking; the compiler never sees it."""
from __future__ import annotations

import json
import sys
import time

# spec name -> (label, module, function, names of the spec inputs it takes, in order)
PEERS = {
    "retention": ("fla chunk_retention", "fla.ops.retention", "chunk_retention", ("q", "k", "v")),
    "simple_gla": ("fla chunk_simple_gla", "fla.ops.simple_gla", "chunk_simple_gla", ("q", "k", "v", "g")),
    "gla": ("fla chunk_gla", "fla.ops.gla", "chunk_gla", ("q", "k", "v", "g")),
}


def peer_main(spec: str, B: int, T: int, H: int, D: int) -> dict:
    """Time the peer on the inputs `effc bench` builds, and check it agrees with effc's kernel."""
    import importlib

    import torch
    from triton.testing import do_bench

    import effc
    from effc.runtime.verify import random_inputs, rel_err

    label, module, fn_name, names = PEERS[spec]
    fn = getattr(importlib.import_module(module), fn_name)
    op = effc.load(spec)
    xs = random_inputs(op.spec, B, T, H, {d: D for d in op.spec.dims}, torch.bfloat16, "cuda")
    args = [x for d, x in zip(op.spec.inputs, xs) if d.name in names]
    t0 = time.time()
    out = fn(*args, scale=D ** -0.5)[0]
    torch.cuda.synchronize()
    first = time.time() - t0
    ms = do_bench(lambda: fn(*args, scale=D ** -0.5), warmup=25, rep=100, return_mode="median")
    mine, _ = op(*xs)
    return {"peer": label, "ms": ms, "first_call_s": first, "rel_diff_vs_effc": rel_err(out.float(), mine.float())}


if __name__ == "__main__":
    spec, B, T, H, D = sys.argv[1], *map(int, sys.argv[2:6])
    try:
        result = peer_main(spec, B, T, H, D)
    except Exception as e:  # reported as the row's result, never hidden
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    print("EFFC_PEER_RESULT " + json.dumps(result), flush=True)
