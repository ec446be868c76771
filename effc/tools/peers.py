"""Peer kernels for `effc bench`: which installed library function computes the same thing
as a spec, run in a subprocess of its own (so one peer's autotuning or crash costs only its row).
This table belongs to benchmarking; the compiler never sees it."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Callable

from .softmax_peers import PEERS_SOFTMAX, made_copies


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


def _mlstm_kernels(name: str, **options):
    """A kernel of NX-AI's mlstm_kernels (`mlstm_kernels.torch.get_mlstm_kernel(name)`): q, k, v (B, H, T, D) and
    the gate pre-activations i, f (B, H, T) in the order of the mlstm specs' inputs q, k, v, i, f, so ours are
    transposed from (B, T, H, ...) and its output back. It always scales q k^T by DHQK^-0.5."""
    def make(B, T, H, D):
        import torch
        from mlstm_kernels.torch import get_mlstm_kernel
        fn = get_mlstm_kernel(name)

        def run(q, k, v, i, f, *, scale):
            if abs(scale - q.shape[-1] ** -0.5) > 1e-9:
                raise ValueError(f"mlstm_kernels' {name} scales by DHQK^-0.5 only, asked for scale={scale}")
            qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            ih, fh = (x.transpose(1, 2).contiguous() for x in (i, f))
            h = fn(qh, kh, vh, ih, fh, return_last_states=False, autocast_kernel_dtype=torch.bfloat16, **options)
            return h.transpose(1, 2)
        return run
    return make


def _fla_rwkv7(B, T, H, D):
    """fla's chunk_rwkv7 for the rwkv7 spec: its DPLR a, b are -kappa_n and kappa_n * a, kappa_n the
    L2-normalised removal key (the spec normalises kappa itself; this wrapper does it for fla)."""
    import torch.nn.functional as F
    from fla.ops.rwkv7 import chunk_rwkv7

    def run(r, w, k, v, kappa, a, *, scale):
        kn = F.normalize(kappa.float(), dim=-1, eps=1e-3).to(kappa.dtype)
        return chunk_rwkv7(r, w, k, v, -kn, kn * a, scale=scale)[0]
    return run


def _fla_mesa_net(B, T, H, D):
    """fla's chunk_mesa_net for the mesanet spec: its lamb is per head and key channel (the spec's lam, 1 by
    default, everywhere), 4 conjugate-gradient iterations as the spec unrolls (fla adds 1e-5 to CG's
    denominators); q and k are drawn unit-norm as the spec declares."""
    import torch
    from fla.ops.mesa_net import chunk_mesa_net

    def run(q, k, v, g, beta, *, scale):
        lamb = torch.ones(q.shape[2], q.shape[3], dtype=torch.float32, device=q.device)
        return chunk_mesa_net(q, k, v, g.float(), beta.float(), lamb, max_CG_iteration=4)[0]
    return run


def nsa_kv_heads_match(heads: int, kv_heads: int) -> None:
    """fla's parallel_nsa takes 16 query heads a key/value head and chooses blocks per group; effc's row is
    like-for-like only with as many key/value heads (else effc chooses per head: 16x the work)."""
    want = max(1, heads // 16)
    if kv_heads != want:
        raise ValueError(f"fla's parallel_nsa takes 16 query heads a key/value head: with {kv_heads} key heads "
                         f"for {heads} query heads effc would choose per head and fla per group; run the bench "
                         f"with --kv-heads {want} (KV_HEADS={want}) for a like-for-like row")


def _fla_nsa(B, T, H, D):
    """fla's parallel_nsa for the nsa spec's shape of work: it needs 16 query heads (a power of two) per key/value
    head, so the row compares only where effc reads as many key/value heads (`--kv-heads H/16`: one shared
    choice a group; with a head each, effc chooses per head, 16x the work). It forms its compressed keys
    itself (mean pooling over blocks of 64, no overlap); gates through sigmoid, top-16 blocks of 64, a window
    of 512. A timing peer: the same three branches, not the same numbers. fla hands the window to flash-attn;
    where flash-attn is not installed (fla then calls None) FlexAttention's sliding window stands in for it."""
    import torch
    from fla.ops.nsa import parallel as fla_nsa
    window = 512
    swa = None
    if getattr(fla_nsa, "flash_attn_func", None) is None:
        from .softmax_peers import sliding_window
        swa = sliding_window(T, window, "cuda")

    def run(q, k, v, gc, gs, gw, *, scale):
        nsa_kv_heads_match(q.shape[2], k.shape[2])
        o = fla_nsa.parallel_nsa(q, k, v, torch.sigmoid(gc), torch.sigmoid(gs),
                                 torch.sigmoid(gw) if swa is None else None, block_counts=16, block_size=64,
                                 window_size=window if swa is None else 0, scale=scale)
        return o if swa is None else o + torch.sigmoid(gw)[..., None] * swa(q, k, v, scale)
    return run


def _fla_moba(B, T, H, D):
    """fla's parallel_moba for the moba spec: the same function (mean-pooled keys score 64-token blocks, the
    query's own block among its top 16, a choice per token and head; softmax scale D^-1/2, its only one). It
    packs the batch as one varlen sequence and hands both attention passes to flash-attn: without flash-attn
    installed the row says so (fla would raise its own ImportError at the call)."""
    import torch
    from fla.ops.moba import parallel as fla_moba
    if getattr(fla_moba, "flash_attn_varlen_func", None) is None:
        raise ImportError("fla's parallel_moba runs on flash-attn, which is not installed here")

    def run(q, k, v, *, scale):
        if abs(scale - q.shape[-1] ** -0.5) > 1e-9:
            raise ValueError(f"fla's parallel_moba scales by D^-0.5 only, asked for scale={scale}")
        cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
        packed = [x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v)]
        o = fla_moba.parallel_moba(*packed, cu, T, chunk_size=64, topk=16)
        return o.reshape(B, T, *o.shape[2:])
    return run


def _softmax_peer(build):
    """A softmax-family peer (effc/tools/softmax_peers.py) in this table's form; its set-up (block masks,
    compiled FlexAttention) runs once per input set, outside the timed calls."""
    def make(B, T, H, D):
        built: dict = {}

        def run(*xs, scale):
            key = tuple((id(x), x.requires_grad) for x in xs) + (scale,)  # a backward timing rebuilds
            if key not in built:
                built.clear()
                made_copies()
                runner = build(list(xs), {"scale": scale})
                built[key] = (runner, made_copies())
            return built[key][0]()
        run.own_leaves = lambda: [t for _, copies in built.values() for t in copies]
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
    # the delta rules as fla's kernels compute them: delta_net and gated_delta_net read q and k as given, fla's
    # default (use_qk_l2norm_in_kernel=False; the bench draws them unitnorm), the _l2 specs normalise them in
    # the kernel, as fla does when asked (use_qk_l2norm_in_kernel=True)
    "delta_net": (Peer("fla chunk_delta_rule", ("q", "k", "v", "beta"),
                       _fla("fla.ops.delta_rule", "chunk_delta_rule", use_qk_l2norm_in_kernel=False)),),
    "delta_net_l2": (Peer("fla chunk_delta_rule l2norm", ("q", "k", "v", "beta"),
                          _fla("fla.ops.delta_rule", "chunk_delta_rule", use_qk_l2norm_in_kernel=True)),),
    "gated_delta_net": (Peer("fla chunk_gated_delta_rule", ("q", "k", "v", "g", "beta"),
                             _fla("fla.ops.gated_delta_rule", "chunk_gated_delta_rule",
                                  use_qk_l2norm_in_kernel=False)),),
    "gated_delta_net_l2": (Peer("fla chunk_gated_delta_rule l2norm", ("q", "k", "v", "g", "beta"),
                                _fla("fla.ops.gated_delta_rule", "chunk_gated_delta_rule",
                                     use_qk_l2norm_in_kernel=True)),),
    # mlstm: i is the log input gate (exponential gate), f the forget-gate pre-activation (logsigmoid), as
    # mlstm_kernels reads vecI and vecF. TFLA's xl_chunk aborts the process on triton 3.6 (an LLVM assertion):
    # its subprocess dies and `effc bench` reports that as the row's error.
    "mlstm": (Peer("mlstm_kernels chunkwise--triton_xl_chunk", ("q", "k", "v", "i", "f"),
                   _mlstm_kernels("chunkwise--triton_xl_chunk")),
              Peer("mlstm_kernels chunkwise--triton_limit_chunk", ("q", "k", "v", "i", "f"),
                   _mlstm_kernels("chunkwise--triton_limit_chunk"))),
    # mlstm_sig: both gates are pre-activations through logsigmoid; the same eps (1e-6) in the denominator
    "mlstm_sig": (Peer("mlstm_kernels chunkwise--triton_xl_chunk_siging", ("q", "k", "v", "i", "f"),
                       _mlstm_kernels("chunkwise--triton_xl_chunk_siging", normalize=True, eps=1e-6)),),
    "rwkv7": (Peer("fla chunk_rwkv7", ("r", "w", "k", "v", "kappa", "a"), _fla_rwkv7),),
    "mesanet": (Peer("fla chunk_mesa_net (4 CG iterations)", ("q", "k", "v", "g", "beta"), _fla_mesa_net),),
    # level l of fla's level_scales weighs the same Fenwick bucket as the spec's lam[:, l] (level 0: the token
    # itself; otherwise the highest differing bit of t xor s, plus one); both read only the first log2(T) + 2
    "log_linear_attn": (Peer("fla chunk_log_linear_attn", ("q", "k", "v", "g", "lam"),
                             _fla("fla.ops.log_linear_attn", "chunk_log_linear_attn")),),
}
PEERS["nsa"] = PEERS.get("nsa", ()) + (Peer("fla parallel_nsa (16 query heads per kv head, own compression; "
                                                 "window: flash-attn, else FlexAttention)",
                                            ("q", "k", "v", "gc", "gs", "gw"), _fla_nsa),)
PEERS["moba"] = PEERS.get("moba", ()) + (Peer("fla parallel_moba (flash-attn)", ("q", "k", "v"), _fla_moba),)


def time_training_step(forward, leaves, grad_out, own_leaves=list) -> tuple[float, float]:
    """Median ms of forward + backward, and the peak memory (MiB) one step allocates beyond what was live.
    Used for effc and its peers alike. `own_leaves()`: leaves a peer made of its own (its layout's copies of
    the inputs), whose gradients are cleared with the inputs' before the measured step: left from the last
    timed step, they would be live at the start and the step's gradients would not count."""
    import torch
    from triton.testing import do_bench

    def step():
        forward().backward(grad_out)
    step()
    ms = do_bench(step, warmup=10, rep=50, return_mode="median", grad_to_none=leaves)
    for x in [*leaves, *own_leaves()]:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def peer_scale(op, D: int) -> float:
    """The scale a peer is called with: the spec's own `scale` default at feature dims D (D^-1/2 without one)."""
    if not any(p.name == "scale" for p in op.spec.params):
        return D ** -0.5
    return float(op.param_values({d: D for d in op.spec.dims}, {})["scale"])


def peer_main(spec: str, B: int, T: int, H: int, D: int, index: int = 0, backward: bool = False,
              kv_heads: int | None = None) -> dict:
    """Time the peer on the inputs `effc bench` builds, and check it agrees with effc's kernel."""
    import torch
    from triton.testing import do_bench

    import effc
    from effc.runtime.verify import random_inputs, rel_err

    peer = PEERS[spec][index]
    op = effc.load(spec)
    xs = random_inputs(op.spec, B, T, H, {d: D for d in op.spec.dims}, torch.bfloat16, "cuda", kv_heads=kv_heads)
    by_name = {d.name: x for d, x in zip(op.spec.inputs, xs)}
    missing = [n for n in peer.inputs if n not in by_name]
    if missing:
        raise KeyError(f"{peer.label} takes input(s) {missing} that spec '{spec}' does not have "
                       f"(its inputs: {', '.join(by_name)})")
    args = [by_name[n] for n in peer.inputs]
    scale = peer_scale(op, D)
    t0 = time.time()
    fn = peer.make(B, T, H, D)
    out = fn(*args, scale=scale)
    torch.cuda.synchronize()
    first = time.time() - t0
    ms = do_bench(lambda: fn(*args, scale=scale), warmup=25, rep=100, return_mode="median")
    mine, _ = op(*xs)
    mine = torch.cat(mine, -1) if isinstance(mine, tuple) else mine  # several outputs: side by side
    result = {"peer": peer.label, "ms": ms, "first_call_s": first,
              "rel_diff_vs_effc": rel_err(out.float(), mine.float())}
    if backward:
        for x in args:
            x.requires_grad_()
        grad = torch.randn_like(out)
        try:
            result["fwdbwd_ms"], result["peak_mib"] = time_training_step(
                lambda: fn(*args, scale=scale), args, grad, getattr(fn, "own_leaves", list))
        except Exception as e:  # a peer whose backward refuses still has its forward timed; the row says why
            result["bwd_error"] = _one_line(e)
    return result


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


if __name__ == "__main__":
    spec, B, T, H, D = sys.argv[1], *map(int, sys.argv[2:6])
    index = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    try:
        result = peer_main(spec, B, T, H, D, index, backward=sys.argv[7:8] == ["bwd"],
                           kv_heads=int(sys.argv[8]) if len(sys.argv) > 8 else None)
    except Exception as e:  # reported as the row's result, never hidden
        result = {"error": _one_line(e)}
    print("EFFC_PEER_RESULT " + json.dumps(result), flush=True)
