"""Peer kernels for `effc bench`: which installed library function computes the same thing
as a spec, run in a subprocess of its own (so one peer's autotuning or crash costs only its row).
This table belongs to benchmarking; the compiler never sees it."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Callable

from .softmax_peers import PEERS_SOFTMAX


@dataclass(frozen=True)
class Peer:
    label: str
    inputs: tuple[str, ...]  # names of the spec inputs it takes, in this order
    make: Callable  # (B, T, H, D) -> fn(*inputs, scale=) -> output (B, T, H, D); set-up (masks, compiles) here


def _fla(module: str, fn_name: str, **options):
    def make(B, T, H, D):
        import importlib
        fn = getattr(importlib.import_module(module), fn_name)
        return lambda *xs, scale: fn(*xs, scale=scale, **options)[0]
    return make


def _softmax_peer(build):
    """A softmax-family peer (effc/softmax_peers.py) in this table's form; its set-up (block masks,
    compiled FlexAttention) runs once per input set, outside the timed calls."""
    def make(B, T, H, D):
        built: dict = {}

        def run(*xs, scale):
            key = tuple(id(x) for x in xs) + (scale,)
            if key not in built:
                built.clear()
                built[key] = build(list(xs), {"scale": scale})
            return built[key]()
        return run
    return make


# spec name -> the peers computing the same thing. Names of specs not in the library yet are harmless:
# `effc bench` says the spec is missing and skips its row.
PEERS: dict[str, tuple[Peer, ...]] = {
    **{spec: tuple(Peer(label, inputs, _softmax_peer(build)) for label, inputs, build in peers)
       for spec, peers in PEERS_SOFTMAX.items()},
    "retention": (Peer("fla chunk_retention", ("q", "k", "v"), _fla("fla.ops.retention", "chunk_retention")),),
    "simple_gla": (Peer("fla chunk_simple_gla", ("q", "k", "v", "g"),
                        _fla("fla.ops.simple_gla", "chunk_simple_gla")),),
    "gla": (Peer("fla chunk_gla", ("q", "k", "v", "g"), _fla("fla.ops.gla", "chunk_gla")),),
    # the effc specs normalise q and k themselves; fla does it in its kernel when asked
    "delta_net": (Peer("fla chunk_delta_rule", ("q", "k", "v", "beta"),
                       _fla("fla.ops.delta_rule", "chunk_delta_rule", use_qk_l2norm_in_kernel=True)),),
    "gated_delta_net": (Peer("fla chunk_gated_delta_rule", ("q", "k", "v", "g", "beta"),
                             _fla("fla.ops.gated_delta_rule", "chunk_gated_delta_rule",
                                  use_qk_l2norm_in_kernel=True)),),
}


def time_training_step(forward, leaves, grad_out) -> tuple[float, float]:
    """Median ms of forward + backward, and the peak memory (MiB) one step allocates beyond what was live.
    Used for effc and its peers alike."""
    import torch
    from triton.testing import do_bench

    def step():
        forward().backward(grad_out)
    step()
    ms = do_bench(step, warmup=10, rep=50, return_mode="median", grad_to_none=leaves)
    for x in leaves:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def peer_main(spec: str, B: int, T: int, H: int, D: int, index: int = 0, backward: bool = False) -> dict:
    """Time the peer on the inputs `effc bench` builds, and check it agrees with effc's kernel."""
    import torch
    from triton.testing import do_bench

    import effc
    from effc.runtime.verify import random_inputs, rel_err

    peer = PEERS[spec][index]
    op = effc.load(spec)
    xs = random_inputs(op.spec, B, T, H, {d: D for d in op.spec.dims}, torch.bfloat16, "cuda")
    by_name = {d.name: x for d, x in zip(op.spec.inputs, xs)}
    missing = [n for n in peer.inputs if n not in by_name]
    if missing:
        raise KeyError(f"{peer.label} takes input(s) {missing} that spec '{spec}' does not have "
                       f"(its inputs: {', '.join(by_name)})")
    args = [by_name[n] for n in peer.inputs]
    t0 = time.time()
    fn = peer.make(B, T, H, D)
    out = fn(*args, scale=D ** -0.5)
    torch.cuda.synchronize()
    first = time.time() - t0
    ms = do_bench(lambda: fn(*args, scale=D ** -0.5), warmup=25, rep=100, return_mode="median")
    mine, _ = op(*xs)
    result = {"peer": peer.label, "ms": ms, "first_call_s": first,
              "rel_diff_vs_effc": rel_err(out.float(), mine.float())}
    if backward:
        for x in args:
            x.requires_grad_()
        grad = torch.randn_like(out)
        result["fwdbwd_ms"], result["peak_mib"] = time_training_step(lambda: fn(*args, scale=D ** -0.5), args, grad)
    return result


if __name__ == "__main__":
    spec, B, T, H, D = sys.argv[1], *map(int, sys.argv[2:6])
    index = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    try:
        result = peer_main(spec, B, T, H, D, index, backward=sys.argv[7:8] == ["bwd"])
    except Exception as e:  # reported as the row's result, never hidden
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    print("EFFC_PEER_RESULT " + json.dumps(result), flush=True)
