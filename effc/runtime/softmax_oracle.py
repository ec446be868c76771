"""The oracle of the softmax family: the spec evaluated with plain PyTorch ops on whole sequences.

A score tile becomes the full [T, T] matrix of every (query, key) pair; the masks select the pairs;
softmax and logsumexp run over all kept keys (a query that keeps no key reads 0 and has log-sum-exp
-inf). Differentiable: gradients come from torch.autograd. Prefix values are computed here over the
whole sequence, exactly as the kernels' pre-pass does (`prefix_values`, shared with the runtime).
Heads are evaluated in groups to bound the memory of the [T, T] tiles.
"""
from __future__ import annotations

import math

import torch

from ..ir.nodes import C, Op, Spec
from . import select_oracle
from .oracle_ops import align, eval_op

_CMP = {"lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge, "eq": torch.eq, "ne": torch.ne}


def _aligned(args, rank):
    out = []
    for a in args:
        out.append(a if isinstance(a, float) else align(a, rank))
    ref = next((a for a in out if torch.is_tensor(a)), None)
    return [torch.tensor(a, dtype=ref.dtype, device=ref.device) if isinstance(a, float) and ref is not None else a
            for a in out]


def eval_pair_op(op: Op, args, T: int, keep):
    k = op.kind
    if k == "query":
        return args[0].unsqueeze(-1) if op.type.rank == 2 and args[0].dim() == 3 else args[0]
    if k == "key":
        return args[0].unsqueeze(-2) if args[0].dim() == 3 else args[0]
    if k in _CMP:
        a, b = _aligned(args, op.type.rank)
        return _CMP[k](a, b).to(a.dtype if torch.is_tensor(a) else b.dtype) if (torch.is_tensor(a) or torch.is_tensor(b)) \
            else float(_CMP[k](torch.tensor(a), torch.tensor(b)))
    if k in ("and", "or", "not"):
        if k == "not":
            return 1.0 - args[0]
        a, b = _aligned(args, op.type.rank)
        return a * b if k == "and" else torch.maximum(torch.as_tensor(a), torch.as_tensor(b))
    if k == "where":
        c, a, b = _aligned(args, op.type.rank)
        return torch.where(torch.as_tensor(c) != 0, a, b)
    if k in ("maximum", "minimum") and any(isinstance(a, float) for a in args):
        a, b = _aligned(args, op.type.rank)
        if not torch.is_tensor(a):
            a, b = b, a
        return getattr(torch, k)(a, torch.as_tensor(b, dtype=a.dtype, device=a.device))
    if k in ("softmax", "logsumexp"):
        s = args[0]
        s = torch.where(keep, s, torch.tensor(-math.inf, dtype=s.dtype, device=s.device))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
        p = torch.exp(s - m)
        l = p.sum(-1, keepdim=True)
        if k == "softmax":
            return p / torch.where(l == 0, torch.ones_like(l), l)
        return torch.where(l[..., 0] == 0, torch.full_like(l[..., 0], -math.inf), (m + torch.log(l))[..., 0])
    return eval_op(op, args, T, T)


def _heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """(B, T, Hx, ...) with Hx dividing H -> (B, T, H, ...): grouped heads shared, as the kernels read them."""
    hx = x.shape[2]
    return x if hx == H else x.repeat_interleave(H // hx, dim=2)


def _sequences(T: int, cu_seqlens) -> list[tuple[int, int]]:
    """(start, end) of each sequence that has tokens: an empty one has nothing to evaluate (and its softmax,
    no key to take a max over)."""
    if cu_seqlens is None:
        return [(0, T)]
    c = cu_seqlens.tolist()
    return [(a, b) for a, b in zip(c, c[1:]) if b > a]


def prefix_values(spec: Spec, tensors: dict, params: dict, H: int, dtype, cu_seqlens=None) -> dict:
    """The prefix stage over whole sequences: {value name: (B, T, H, ...)} for every prefix op."""
    if not spec.prefix.ops:
        return {}
    first = tensors[spec.inputs[0].name]
    B, T = first.shape[:2]
    # only what the prefix reads: converting every input (q, k, v) to fp32 would cost more than the kernel
    used = spec.prefix.reads
    per_seq, kept = [], per_token_prefix(spec)
    for a, b in _sequences(T, cu_seqlens):
        env = base_env(spec, params, H, dtype, first.device, b - a, used=used)
        env.update(feature_sizes(spec, tensors, used, dtype))
        env.update({d.name: _tile(_heads(tensors[d.name][:, a:b], H).to(dtype)) for d in spec.inputs if d.name in used})
        for op in spec.prefix.ops:
            env[op.out] = prefix_op_value(op, env, tensors, spec, b - a)
        per_seq.append({op.out: _untile(env[op.out], op.type.rank, B, H) for op in kept})
    return {op.out: torch.cat([p[op.out] for p in per_seq], 1) for op in kept}


def prefix_op_value(op: Op, env: dict, tensors: dict, spec: Spec, T: int):
    """One prefix op's value over T tokens; `fidx` from the inputs' shapes (a traced call has no value to read
    from a size tensor: torch.compile, effc memory's meta tensors)."""
    if op.kind == "fidx":
        n = next(size for d in spec.inputs if d.name in tensors
                 for name, size in zip(d.dims[3:], tensors[d.name].shape[3:]) if name == op.args[0])
        like = env[op.args[0]]
        return torch.arange(n, dtype=like.dtype, device=like.device).reshape(1, 1, n)
    n_args = 1 if op.kind == "expand" else len(op.args)
    return eval_pair_op(op, [x if isinstance(x, float) else env[x] for x in op.args[:n_args]], T, None)


def feature_sizes(spec: Spec, tensors: dict, used: set, dtype) -> dict:
    """The feature dims `used` names (fidx's argument) as (1, 1) tensors of their sizes, from the inputs."""
    first = next(iter(tensors.values()))
    return {n: torch.full((1, 1), float(size), dtype=dtype, device=first.device)
            for d in spec.inputs if d.name in tensors for n, size in zip(d.dims[3:], tensors[d.name].shape[3:])
            if n in used}


def per_token_prefix(spec: Spec) -> tuple:
    """The prefix ops whose values are per token (what other stages may read); the others (a frequency per
    feature, a param expression) are intermediates of the prefix's own."""
    return tuple(op for op in spec.prefix.ops if op.type.rank and op.type.shape[0] == C)


def _tile(x):
    return x.permute(0, 2, 1, *range(3, x.dim()))  # (B, H, T, ...)


def _untile(y, rank, B, H):
    y = align(y, rank).expand((B, H) + tuple(y.shape[2:]))
    return y.permute(0, 2, 1, *range(3, y.dim()))


def base_env(spec: Spec, params: dict, H: int, dtype, device, T: int, heads=None, used=None) -> dict:
    """The named values every stage may read (params, head, H, inf, qpos, kpos; the prefix's pos, a token's
    position in its sequence); `used`: only those."""
    heads = heads if heads is not None else torch.arange(H)
    make = {**{p: (lambda v=v: torch.full((1, 1), float(v), dtype=dtype, device=device)) for p, v in params.items()},
            "head": lambda: heads.to(dtype=dtype, device=device).reshape(1, -1),
            "H": lambda: torch.full((1, 1), float(H), dtype=dtype, device=device),
            "inf": lambda: math.inf,
            "qpos": lambda: torch.arange(T, dtype=dtype, device=device).reshape(1, 1, T, 1),
            "kpos": lambda: torch.arange(T, dtype=dtype, device=device).reshape(1, 1, 1, T),
            "pos": lambda: torch.arange(T, dtype=dtype, device=device).reshape(1, 1, T)}
    return {name: f() for name, f in make.items() if used is None or name in used}


def key_positions(spec: Spec, params: dict, nk: int, dtype, device) -> torch.Tensor:
    """kpos of a key sequence of its own, (1, 1, 1, nk): a * index + c (spec.keyseq.pos) at the call's params;
    without declared positions the index (the spec reads no kpos: passes.lower_softmax checks)."""
    idx = torch.arange(nk, dtype=dtype, device=device).reshape(1, 1, 1, nk)
    if spec.keyseq.pos is None:
        return idx
    a, c = (float(e.subs({x: params[x.name[2:]] for x in e.free_symbols})) for e in spec.keyseq.pos)
    return idx * a + c


def evaluate_softmax(spec: Spec, tensors: dict, params: dict, dims: dict, dtype=torch.float64, matmul_dtype=None,
                     cu_seqlens=None, head_group: int | None = None, last_query: bool = False):
    """({output: (B, T, H, ...)}) for (B, T, Hx, ...) inputs; `dims` are the feature dim sizes. `last_query`:
    only the last query of each sequence against all its keys (a decoding step; outputs (B, 1, H, ...))."""
    first = tensors[spec.inputs[0].name]
    B, T, H = first.shape[:3]
    device = first.device
    full = dict(tensors)
    full.update(prefix_values(spec, tensors, params, H, dtype, cu_seqlens))
    outs = {o.name: [] for o in spec.outputs}
    own = {d.name for d in spec.inputs if d.seq != "T"}
    for a, b in _sequences(T, cu_seqlens):
        n = b - a
        q0 = n - 1 if last_query else 0  # the first query evaluated
        per_head = {o.name: [] for o in spec.outputs}
        group = head_group or max(1, min(H, 2 ** 27 // max(1, B * (n - q0) * n)))  # ~2^27 elements per score tile
        shared = select_oracle.head_group(spec, tensors, H) if spec.selection and spec.selection.shared else 1
        group = -(-group // shared) * shared  # a shared select chooses per key head group: whole groups
        for h0 in range(0, H, group):
            h1 = min(H, h0 + group)
            env = base_env(spec, params, H, dtype, device, n, torch.arange(h0, h1))
            env["qpos"] = env["qpos"][:, :, q0:]
            env.update({k: torch.full((1, 1), float(v), dtype=dtype, device=device) for k, v in dims.items()})
            keys = {}  # every token, for key(x); the other reads of a per-token value are the queries'
            for name, x in full.items():
                if name in own:  # a key sequence of its own: all its keys (cu_seqlens is refused with one)
                    keys[name] = env[name] = _tile(_heads(x, H)[:, :, h0:h1].to(dtype))
                    continue
                keys[name] = _tile(_heads(x[:, a:b], H)[:, :, h0:h1].to(dtype))
                env[name] = keys[name][:, :, q0:]
            nk = n
            if spec.keyseq is not None:
                nk = next(t.shape[1] for d, t in zip(spec.inputs, tensors.values()) if d.seq == spec.keyseq.dim)
                env["kpos"] = key_positions(spec, params, nk, dtype, device)
            for op in spec.score.ops:
                _run(op, env, keys, n, None, matmul_dtype)
            keep = torch.ones((1, 1, n - q0, nk), dtype=torch.bool, device=device)
            if spec.selection is not None:  # the pairs of the key blocks each query chose (passes.select)
                chosen = select_oracle.chosen_blocks(  # a 16-bit reference scores the blocks in 16 bits too
                    spec, env, keys, n, lambda op, args: _rounded_pair_op(op, args, n, None, matmul_dtype), shared)
                keep = keep & select_oracle.token_keep(spec, chosen, n)
            for m in spec.masks:
                mv = env[m]
                mv = align(mv, 2) if torch.is_tensor(mv) else torch.tensor(mv)
                keep = keep & (mv != 0)
            for op in spec.merge.ops:
                _run(op, env, keys, n, keep, matmul_dtype)
            for o in spec.outputs:
                per_head[o.name].append(_untile(env[o.name], o.tile.rank, B, h1 - h0))
        for o in spec.outputs:
            outs[o.name].append(torch.cat(per_head[o.name], 2))
    return {k: torch.cat(v, 1) for k, v in outs.items()}


def _run(op: Op, env: dict, keys: dict, n: int, keep, matmul_dtype) -> None:
    n_args = 1 if op.kind == "expand" else len(op.args)
    src = keys if op.kind == "key" else env
    args = [x if isinstance(x, float) else src[x] for x in op.args[:n_args]]
    env[op.out] = _rounded_pair_op(op, args, n, keep, matmul_dtype)


def _rounded_pair_op(op: Op, args, n: int, keep, matmul_dtype):
    """eval_pair_op, with a matmul's operands rounded to `matmul_dtype` (a 16-bit reference's dots)."""
    if op.kind == "matmul" and matmul_dtype is not None and all(torch.is_tensor(a) for a in args):
        return (args[0].to(matmul_dtype) @ args[1].to(matmul_dtype)).to(args[0].dtype)
    return eval_pair_op(op, args, n, keep)
