"""`effc bench --decode`: decoding steps of the softmax family against a KV cache (`op.decode`), beside torch's
scaled_dot_product_attention over the same cache. A step reads the cache and does little arithmetic on it, so
the row reports the bytes of the cache read per second beside the time: the share of the GPU's bandwidth a
step reaches is what decoding speed is."""
from __future__ import annotations

import json
from pathlib import Path


def run_decode_bench(specs, shapes, H: int, kv_heads: int, D: int, new_tokens: int, json_out: Path | None = None,
                     peers: bool = True, timer=None) -> list[dict]:
    """Each spec at each (B requests, T cached tokens) shape: `new_tokens` queries a request, H query heads over
    `kv_heads` key/value heads, every feature dim D, bf16. `timer(fn) -> ms` (default Triton's do_bench)."""
    import torch

    import effc
    if timer is None:
        if not torch.cuda.is_available():
            raise RuntimeError("effc bench --decode needs a CUDA GPU (timings under the interpreter mean nothing)")
        from triton.testing import do_bench
        timer = lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    if kv_heads < 1 or H % kv_heads:
        raise RuntimeError(f"--kv-heads {kv_heads} must divide --heads {H}")
    rows = []
    for name in specs:
        op = effc.load(name)
        for B, T in shapes:
            if not hasattr(op, "decode"):
                row = dict(spec=name, skipped=f"{name} does not decode against a KV cache (a chunked-scan spec: "
                                              "op.step carries its state)")
            else:
                row = _decode_row(op, name, B, T, H, kv_heads, D, new_tokens, peers, timer)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(decode_table(rows))
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=1))
    return rows


def decode_call(op, B: int, T: int, H: int, Hk: int, D: int, tq: int):
    """A decoding step of `tq` new tokens for B requests that have T cached tokens each (a random cache):
    a zero-argument callable, with the tokens and cache it reads as attributes."""
    import torch

    from ..runtime.verify import random_inputs
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    xs = random_inputs(op.spec, B, tq, H, {d: D for d in op.spec.dims}, dtype, device, seed=0)
    tokens = [x[:, :, :Hk].contiguous() if "key" in d.annotations else x.contiguous()
              for d, x in zip(op.spec.inputs, xs)]
    cache = op.new_cache(*tokens, max_len=T + tq)
    for c in cache.values():
        c.normal_()
    lens = torch.full((B,), T, dtype=torch.int32, device=device)

    def step():
        return op.decode(*tokens, cache=cache, cache_seqlens=lens)
    step.tokens, step.cache = tokens, cache
    return step


def captured(fn):
    """`fn` captured in a CUDA graph (warmed on a side stream first): (its replay, what a server runs per step
    with no host work between the kernels; the captured call's result, which each replay rewrites)."""
    import torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def _decode_row(op, name: str, B: int, T: int, H: int, Hk: int, D: int, tq: int, peers: bool, timer) -> dict:
    import torch

    step = decode_call(op, B, T, H, Hk, D, tq)
    tokens, cache = step.tokens, step.cache
    ms = timer(step)
    graphs = tokens[0].is_cuda  # the step and the peer also replayed from CUDA graphs: the GPU's time alone
    read = sum(c[:, :T + tq].numel() * c.element_size() for c in cache.values())
    row = dict(spec=name, B=B, T=T, H=H, kv_heads=Hk, D=D, new_tokens=tq, effc_ms=ms, cache_GBps=read / ms / 1e6,
               decode={k: v for k, v in op.last_decode.items()})
    if graphs:
        row["effc_graph_ms"] = timer(captured(step)[0])
    if peers and {"k", "v"} <= set(cache) and tq == 1:
        q = tokens[0].transpose(1, 2)  # (B, H, 1, D): one new query sees every cached key and its own
        k, v = (cache[x][:, :T + tq].transpose(1, 2) for x in ("k", "v"))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        row["peer"] = "torch SDPA over the whole cache (dense)"
        row["peer_ms"] = timer(lambda: sdpa(q, k, v, enable_gqa=Hk != H))
        row["speedup"] = row["peer_ms"] / ms
        if graphs:
            row["peer_graph_ms"] = timer(captured(lambda: sdpa(q, k, v, enable_gqa=Hk != H))[0])
    return row


def decode_table(rows) -> str:
    lines = [f"{'spec':16s} {'B x T':>10s} {'H/Hk':>6s} {'Tq':>3s} {'effc ms':>8s} {'cache GB/s':>10s} "
             f"{'SDPA ms':>8s} {'speedup':>7s}  decode"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['spec']:16s} skipped: {r['skipped']}")
            continue
        peer = (f"{r['peer_ms']:8.3f} {r['speedup']:6.2f}x" if "peer_ms" in r else f"{'-':>8s} {'-':>7s}")
        graphs = (f"  graphs: effc {r['effc_graph_ms']:.3f} ms, SDPA {r.get('peer_graph_ms', float('nan')):.3f} ms"
                  if "effc_graph_ms" in r else "")
        lines.append(f"{r['spec']:16s} {str(r['B']) + 'x' + str(r['T']):>10s} {str(r['H']) + '/' + str(r['kv_heads']):>6s} "
                     f"{r['new_tokens']:3d} {r['effc_ms']:8.3f} {r['cache_GBps']:10.0f} {peer}  {r['decode']}{graphs}")
    return "\n".join(lines)
