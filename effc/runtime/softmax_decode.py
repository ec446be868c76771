"""Decoding for the softmax family against a KV cache (SoftmaxOp.decode), like flash-attn's
`flash_attn_with_kvcache`: per request, a few new tokens (B, Tq, H, D) follow the `cache_seqlens[b]` tokens
already in the cache; their key-side values are written into the cache at [len, len + Tq), then the new
queries attend to every cached key their masks keep (positions: the context first, so causal masks, qpos
and kpos are those of the whole sequence).

The cache holds the tensors the kernels read on the key side (`SoftmaxOp.cache_names`): key inputs and the
prefix values read through key(x), e.g. FoX's cumulative log gate F, each (B, Tmax, Hx, ...). The prefix
stage runs on the new tokens only, a cumsum continued from its cached value at the context's last token;
a prefix the cache cannot continue (revcumsum: later tokens; a cumsum whose value is not cached) raises
NotImplementedError naming it.

Kernels (codegen/triton/softmax_decode_emit.py): `decode`, one program per (split of the keys, request,
head), stores partial (max, sum, acc); `decode_combine` merges them and runs the epilogue. The number of
splits comes from policy.decode."""
from __future__ import annotations

import torch

from ..errors import ArgumentError
from ..policy.decode import decode_group, decode_splits, decode_tiles
from ..policy.tiling import padded
from ..policy.tuning import sm_count
from .checks import check_inputs, interpreting
from .softmax_oracle import _heads, _tile, _untile, base_env, feature_sizes, per_token_prefix, prefix_op_value

MAX_NEW = 64  # new queries per request: one query tile holds them all


def _by_forward(op) -> str | None:
    """Why `op` decodes through its forward's kernels per request (None: in one launch, the split-KV decode
    kernels or the select stage's): a key sequence of its own (no decode kernels are generated for one)."""
    if op.spec.keyseq is not None:
        return f"a key sequence of its own ({op.spec.keyseq.dim})"
    return None


def _on_keyseq(op, d) -> bool:
    return op.spec.keyseq is not None and d.seq == op.spec.keyseq.dim


def cache_names(op) -> tuple[str, ...]:
    """The tensors a KV cache holds: what the decode kernel reads on the key side, in the plan's order (through
    the forward's kernels: the key inputs over the query's tokens, which its forward reads; inputs over a key
    sequence of their own are passed whole at each call, not cached)."""
    sel = op.sched.select
    by_forward = _by_forward(op)
    why = by_forward or ("a select stage" if sel is not None else None)
    if why is not None and op.spec.prefix.ops:
        raise NotImplementedError(f"{op.name}: decoding with {why} and a prefix stage is not implemented (the "
                                  "prefix values would need caching); op(...) over the whole sequence runs it")
    if by_forward is not None:
        return tuple(d.name for d in op.spec.inputs if "key" in d.annotations and not _on_keyseq(op, d))
    if sel is not None:  # the select stage's kernels and the forward walk read these on the key side
        return op.comp.plan.key_leaves
    return op.comp.plan.kernel("decode").key_loads


def _forward_decode(op, named: dict, caches: dict, lens: torch.Tensor, tq: int, params: dict) -> list:
    """Decoding through the forward's own kernels (_by_forward): per request, over its context and the new
    tokens, computing the new rows only (`queries=`). With a select stage this reads the context's keys once
    per step to pool them, as the select kernel does in the forward; inputs over a key sequence of their own
    are read as given (their keys at positions past a query's stay masked where the spec's masks say so)."""
    outs = []
    for b, n in enumerate(lens.tolist()):
        xs = []
        for d in op.spec.inputs:
            if _on_keyseq(op, d):
                xs.append(named[d.name][b:b + 1])
            elif d.name in caches:  # the request's context and its new tokens, a contiguous view of the cache
                xs.append(caches[d.name][b:b + 1, :n + tq])
            else:  # a query-side input: only the new rows are read (the others are never loaded)
                x = named[d.name]
                full = x.new_empty((1, n + tq) + tuple(x.shape[2:]))
                full[:, n:] = x[b:b + 1]
                xs.append(full)
        with torch.no_grad():
            o, _ = op(*xs, queries=(n, n + tq), **params)
        outs.append([t[:, n:] for t in (o if isinstance(o, tuple) else (o,))])
    return [torch.cat(parts, 0) for parts in zip(*outs)]


# the rows of the select kernel's query block in decoding with head rows (the walk takes its own): a tl.dot's
# least M, 4 warps; a 128-row block of one new token left 127 rows idle in every score and top-k round
_DECODE_SELECT_ROWS = 16


def _select_decode(op, named: dict, caches: dict, lens: torch.Tensor, longest: int, tq: int, pvals: dict,
                   dims: dict) -> list:
    """Decoding through the select stage's kernels and the forward walk, every request in one launch of each
    (their DECODE variant: the keys are each request's cache rows, the queries its new tokens): the pool kernel
    pools the request's cached key blocks, the select kernel chooses blocks for the new queries, the walk
    visits them with head rows (`fwd_rows`: a program per new token and the query heads sharing its key
    heads, each chosen block read once for them; a per-head choice: 16 new tokens of one head), not a
    128-row query block of a few new tokens. No split of the keys: a query visits its chosen blocks only.
    A choice of key tokens gathers each new token's chosen keys with head rows where its group fills a
    program's rows (passes.softmax.gathers_one_token), else walks the blocks holding them with token rows."""
    from dataclasses import replace

    from ..passes.softmax import choose_softmax_tiles, gathers_one_token, gathers_tokens
    from .select_op import selection_buffers
    from .select_oracle import head_group
    spec, sched = op.spec, op.sched
    first = named[spec.inputs[0].name]
    B, H, dtype, device = first.shape[0], first.shape[2], first.dtype, first.device
    tmax = next(iter(caches.values())).shape[1]
    leaves = [caches[x] if x in caches else named[x].contiguous() for x in sched.leaves]
    rows = not sched.select.per_token or (gathers_tokens(spec) and gathers_one_token(
        head_group(spec, dict(zip(sched.leaves, leaves)), H)))
    cfg = replace(choose_softmax_tiles(spec, dims, interpreting()), head_rows=rows)
    if rows:  # the select kernel's query block: a step's few new tokens, not a training call's 128 rows
        cfg = replace(cfg, fwd=(_DECODE_SELECT_ROWS, cfg.fwd[1], 4, cfg.fwd[3]))
    meta = op._meta(cfg.fwd, H, {x: t.shape[2] for x, t in zip(sched.leaves, leaves)}, dims, None, dtype)
    meta.update({f"{d}_S": v for d, v in dims.items()}, DECODE=True)  # the caller's layouts: rows D wide
    outs = {o.name: torch.empty((B, tq, H) + tuple(dims[n] for n in o.feature_dims), dtype=dtype, device=device)
            for o in spec.outputs}
    dummy = torch.empty(1, dtype=torch.float32, device=device)
    args = {f"{x}_ptr": t for x, t in zip(sched.leaves, leaves)}
    args.update({f"{o}_ptr": t for o, t in outs.items()}, **{f"{k}_ptr": dummy for k in op.saved_shapes(B, 1, H, dims)})
    args.update({f"p_{k}": v for k, v in pvals.items()}, T=tmax, Q_LO=0, Q_HI=tmax, cu_ptr=dummy, lens_ptr=lens, TQ=tq)
    args.update(selection_buffers(op, cfg, args, meta, B, longest + tq if B else tq, H, leaves, transpose=False,
                                  query_rows=tq))
    if B and H and rows:
        op._launch_rows("fwd", cfg.fwd, tq, (0, tq), B, H, args, meta)
    elif B and H:
        op._launch("fwd", cfg.fwd, -(-tq // cfg.fwd[0]), B * H, args, meta)
    walk = "head rows" if rows else "token rows"
    op.last_decode = dict(kernels=f"the select stage's and the forward walk's ({walk}), every request at once",
                          BM=cfg.fwd[0], NKB=args["NKB"], G=args.get("GROUP", 1))
    return [outs[o.name] for o in spec.outputs]


def new_cache(op, *tokens, max_len: int) -> dict[str, torch.Tensor]:
    """Zero caches for the requests of `tokens` (every input's new tokens, (B, Tq, H, D) as decode takes
    them): {name: (B, max_len, Hx, ...)}, inputs in their dtype, prefix values fp32."""
    names = cache_names(op)
    B, _, H, dims = check_inputs(op.spec, tokens, for_kernels=False)
    named = {d.name: x for d, x in zip(op.spec.inputs, tokens)}
    out = {}
    for x in names:
        if x in named:
            t = named[x]
            out[x] = t.new_zeros((B, max_len) + tuple(t.shape[2:]))
        else:
            feats = tuple(dims[str(d)] for d in op.sched.types[x].shape[1:])
            out[x] = torch.zeros((B, max_len, H) + feats, dtype=torch.float32, device=tokens[0].device)
    return out


def cache_dict(cache, names: tuple[str, ...]) -> dict:
    """`cache` as a dict by name: given as one (holding exactly `names`) or as a sequence in that order."""
    if isinstance(cache, dict):
        if set(cache) != set(names):
            raise ArgumentError(f"cache must hold {', '.join(names)} (op.cache_names), got {', '.join(cache) or '-'}")
        return cache
    if isinstance(cache, (tuple, list)) and len(cache) == len(names):
        return dict(zip(names, cache))
    raise ArgumentError(f"cache must be a dict or a sequence of {len(names)} tensors ({', '.join(names)}: "
                        "op.cache_names; op.new_cache(...) makes them)")


def _caches(op, cache, expect: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`cache` (a dict by name or a sequence in cache_names order) checked against the new tokens' values."""
    names = tuple(expect)
    cache = cache_dict(cache, names)
    tmax = None
    for x in names:
        c, t = cache[x], expect[x]
        want = f"(B, Tmax) + {tuple(t.shape[2:])} with B = {t.shape[0]}"
        if not isinstance(c, torch.Tensor) or c.dim() != t.dim() or c.shape[0] != t.shape[0] \
                or c.shape[2:] != t.shape[2:]:
            got = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
            raise ArgumentError(f"cache '{x}' must have shape {want}, got {got}")
        if c.dtype != t.dtype:
            raise ArgumentError(f"cache '{x}' has dtype {c.dtype}; expected {t.dtype} (an input's cache has its "
                                "dtype, a prefix value's is float32)")
        if c.device != t.device:
            raise ArgumentError(f"cache '{x}' is on {c.device}, the new tokens on {t.device}")
        if not c.is_contiguous():
            raise ArgumentError(f"cache '{x}' must be contiguous (the kernel indexes its rows)")
        if tmax is not None and c.shape[1] != tmax:
            raise ArgumentError(f"cache '{x}' holds Tmax={c.shape[1]} tokens, but '{names[0]}' holds {tmax}")
        tmax = c.shape[1]
    return {x: cache[x] for x in names}


def _lengths(cache_seqlens, B: int, tq: int, tmax: int | None, device) -> tuple[torch.Tensor, int]:
    """cache_seqlens checked: int32 (B,), each request's context fitting the caches before its new tokens
    (`tmax` None: no cache, any length >= 0); and the longest context, what the launches are sized by. Its
    values are read on the host once (one synchronisation); while a CUDA graph is being captured they are
    not (a capture cannot read the device): the longest context is then the cache's room, and values out of
    range are the caller's to avoid."""
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.shape != (B,) \
            or cache_seqlens.dtype != torch.int32:
        got = (f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}" if isinstance(cache_seqlens, torch.Tensor)
               else type(cache_seqlens).__name__)
        raise ArgumentError(f"cache_seqlens must be an int32 tensor of shape ({B},) (tokens cached per request), "
                            f"got {got}")
    if cache_seqlens.device != device:
        raise ArgumentError(f"cache_seqlens is on {cache_seqlens.device}, the new tokens on {device}")
    if cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
        if tmax is None:
            raise ArgumentError("decode without a cache under CUDA graph capture: the launches are sized by the "
                                "cache's room (Tmax), and there is none")
        return cache_seqlens, tmax - tq
    lo, hi = torch.stack(torch.aminmax(cache_seqlens)).tolist() if B else (0, 0)
    if tmax is None and lo < 0:
        raise ArgumentError(f"cache_seqlens must be >= 0 (tokens before the new ones), got values in [{lo}, {hi}]")
    if tmax is not None and (lo < 0 or hi + tq > tmax):
        raise ArgumentError(f"cache_seqlens must lie in [0, Tmax - Tq] = [0, {tmax - tq}] (the {tq} new tokens "
                            f"are written after them, in a cache of Tmax={tmax}), got values in [{lo}, {hi}]")
    return cache_seqlens, hi


def _prefix(op, named: dict, pvals: dict, H: int, caches: dict, lens: torch.Tensor) -> dict:
    """The prefix stage on the new tokens (fp32, as the forward's pre-pass), each cumsum continued from its
    cached value at the context's last token."""
    spec = op.spec
    if not spec.prefix.ops:
        return {}
    first = named[spec.inputs[0].name]
    B, tq = first.shape[:2]
    used = {x for o in spec.prefix.ops for x in o.args if isinstance(x, str)}
    env = base_env(spec, pvals, H, torch.float32, first.device, tq, used=used)
    env.update(feature_sizes(spec, named, used, torch.float32))
    env.update({d.name: _tile(_heads(named[d.name], H).float()) for d in spec.inputs if d.name in used})
    if "pos" in used:  # the new tokens' positions: after each request's cached ones
        env["pos"] = (lens.float()[:, None] + torch.arange(tq, device=first.device))[:, None, :]
    rows = torch.arange(B, device=first.device)
    for o in spec.prefix.ops:
        if o.kind == "revcumsum":
            raise NotImplementedError(f"{op.name}.decode: prefix value '{o.out}' = revcumsum(...) sums over later "
                                      "tokens, which a decoding step does not have")
        val = prefix_op_value(o, env, named, spec, tq)
        if o.kind == "cumsum":
            if o.out not in caches:
                raise NotImplementedError(
                    f"{op.name}.decode: prefix value '{o.out}' = cumsum(...) runs over the whole sequence, but the "
                    f"cache holds only key-side values ({', '.join(caches)}): a decoding step cannot continue it")
            last = caches[o.out][rows, (lens.long() - 1).clamp(min=0)]  # (B, H, ...): at the context's last token
            last = last * (lens > 0).reshape((B,) + (1,) * (last.dim() - 1))
            val = val + _tile(_heads(last.unsqueeze(1), H).float())
        env[o.out] = val
    return {o.out: _untile(env[o.out], o.type.rank, B, H) for o in per_token_prefix(spec)}


def decode(op, tokens, cache, cache_seqlens, splits: int | None = None, **params):
    """SoftmaxOp.decode: returns the outputs of the new tokens, (B, Tq, H, ...) each, and writes their
    key-side values into `cache` at [cache_seqlens, cache_seqlens + Tq)."""
    spec, sched = op.spec, op.sched
    names = cache_names(op)
    B, tq, H, dims = check_inputs(spec, tuple(tokens), for_kernels=True)
    if not 1 <= tq <= MAX_NEW:
        raise ArgumentError(f"decode takes 1 to {MAX_NEW} new tokens per request (one query tile), got Tq={tq}; "
                            "a longer piece runs as op(...) over the whole sequence, or in several decode calls")
    if splits is not None and (not isinstance(splits, int) or isinstance(splits, bool) or splits < 1):
        raise ArgumentError(f"splits must be an int >= 1 (the programs per request and head), got {splits!r}")
    pvals = op.param_values(dims, params)
    named = {d.name: x for d, x in zip(spec.inputs, tokens)}
    device = tokens[0].device
    # what each cache holds per token: an input as the new tokens are, a prefix value (B, ., H, ...) fp32
    expect = {x: named[x] if x in named else torch.empty(
        (B, 1, H) + tuple(dims[str(d)] for d in sched.types[x].shape[1:]), dtype=torch.float32, device=device)
        for x in names}
    caches = _caches(op, cache, expect)
    tmax = next(iter(caches.values())).shape[1] if caches else None
    lens, longest = _lengths(cache_seqlens, B, tq, tmax, device)
    pre = _prefix(op, named, pvals, H, caches, lens)
    values = {**named, **pre}

    # the new tokens' key-side values into the cache, after each request's context
    pos = lens.long()[:, None] + torch.arange(tq, device=device)[None, :]
    rows = torch.arange(B, device=device)[:, None]
    for x, c in caches.items():
        c[rows, pos] = values[x].to(c.dtype)
    why = _by_forward(op)
    if why is not None:
        o = _forward_decode(op, named, caches, lens, tq, params)
        op.last_decode = dict(kernels=f"the forward's per request ({why})")
        return o[0] if len(o) == 1 else tuple(o)
    if sched.select is not None:
        o = _select_decode(op, named, caches, lens, longest, tq, pvals, dims)
        return o[0] if len(o) == 1 else tuple(o)

    dec, comb = op.comp.plan.kernel("decode"), op.comp.plan.kernel("decode_combine")
    widest = max(dims.values()) if dims else 16
    heads = {x: (values[x].shape[2]) for x in sched.leaves if x in values}
    group = decode_group(H, [heads[x] for x in dec.key_loads], tq)
    bm, bn, warps, stages = decode_tiles(tq * group, widest, interpreting())
    programs = B * H // group  # one per request and group of query heads sharing their key heads
    n_split = splits or decode_splits(programs, -(-(longest + tq) // bn) if B else 1, sm_count(device))
    f32 = dict(dtype=torch.float32, device=device)
    named_args = {f"{x}_ptr": values[x].contiguous() for x in dec.query_loads + comb.query_loads}
    named_args.update({f"{x}_cache_ptr": c for x, c in caches.items()})
    for gi, g in enumerate(sched.groups):
        named_args[f"m{gi}_part_ptr"] = torch.empty((programs, n_split, bm), **f32)
        named_args[f"l{gi}_part_ptr"] = torch.empty((programs, n_split, bm), **f32)
        for r in g.reductions:
            feats = tuple(padded(dims[str(d)]) for d in sched.types[r.out].shape[1:])
            named_args[f"{r.out}_part_ptr"] = torch.empty((programs, n_split, bm) + feats, **f32)
    dtype = tokens[0].dtype
    outs = {o.name: torch.empty((B, tq, H) + tuple(dims[n] for n in o.feature_dims), dtype=dtype, device=device)
            for o in spec.outputs}
    named_args.update({f"{o}_ptr": t for o, t in outs.items()})
    named_args.update({f"p_{k}": v for k, v in pvals.items()})
    named_args.update(lens_ptr=lens, TQ=tq, TMAX=tmax)
    meta = op._meta((bm, bn, warps, stages), H, heads, dims, None, dtype)
    meta.update(NSPLIT=n_split, G=group)
    if B and H:
        op._launch("decode", None, n_split, programs, named_args, meta)
        op._launch("decode_combine", None, 1, programs, named_args, meta)
    op.last_decode = dict(BM=bm, BN=bn, splits=n_split, group=group)
    o = [outs[o.name] for o in spec.outputs]
    return o[0] if len(o) == 1 else tuple(o)
