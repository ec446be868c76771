"""The oracle: evaluate a spec's stages with plain PyTorch ops, chunk by chunk.

With chunk=1 the same evaluation is the token-by-token recurrence (each token is its own
chunk: intra is the diagonal term, inter the per-token state update), so one evaluator gives
both the chunked reference and the recurrent one; tests check that they agree.
Every value is held as (B|1, H|1, *tile) so batch and head broadcast like the tile axes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ir import ops as O
from ..ir.nodes import Op, Spec, next_state_name
from ..passes.shapes import reduces_tokens, value_types

_UNARY = {
    "neg": torch.neg, "exp": torch.exp, "exp2": torch.exp2, "log": torch.log, "log2": torch.log2,
    "sigmoid": torch.sigmoid, "logsigmoid": F.logsigmoid, "softplus": F.softplus, "tanh": torch.tanh,
    "relu": torch.relu, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "abs": torch.abs, "silu": F.silu,
}
_BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
    "maximum": torch.maximum, "minimum": torch.minimum, "pow": torch.pow,
}


def _align(x, rank: int):
    """Give a (B, H, *tile) value `rank` tile axes by inserting size-1 axes after (B, H)."""
    while x.dim() - 2 < rank:
        x = x.unsqueeze(2)
    return x


def _valid_rows(x, n_valid: int, axis: int, fill: float = 0.0):
    """Padded tokens do not exist: reductions over the token axis must not see them."""
    rows = torch.arange(x.shape[axis], device=x.device) < n_valid
    shape = [1] * x.dim()
    shape[axis] = -1
    return torch.where(rows.reshape(shape), x, torch.as_tensor(fill, dtype=x.dtype, device=x.device))


def _eval_op(op: Op, args: list, n_valid: int, matmul_dtype=None, over_tokens: bool = False):
    k = op.kind
    if k == "copy":
        return args[0]
    if k in _UNARY:
        if isinstance(args[0], float):
            return float(_UNARY[k](torch.tensor(args[0], dtype=torch.float64)))
        return _UNARY[k](args[0])
    if k in _BINARY:
        a, b = args
        if isinstance(a, float) and isinstance(b, float):
            return float(_BINARY[k](torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)))
        rank = op.type.rank
        a = a if isinstance(a, float) else _align(a, rank)
        b = b if isinstance(b, float) else _align(b, rank)
        if isinstance(a, float):
            a = torch.tensor(a, dtype=b.dtype)
        return _BINARY[k](a, b)
    if k == "matmul":
        if over_tokens:
            args = [args[0], _valid_rows(args[1], n_valid, -2)]
        if matmul_dtype is not None:  # round the operands like a tensor-core matmul does
            return (args[0].to(matmul_dtype) @ args[1].to(matmul_dtype)).to(args[0].dtype)
        return args[0] @ args[1]
    if k == "transpose":
        return args[0].transpose(-1, -2)
    if k in O.MASKS:
        x, fill = args[0], (args[1] if len(args) > 1 else 0.0)
        c = x.shape[-1]
        keep = torch.ones(c, c, dtype=torch.bool, device=x.device).tril(0 if k == "causal" else -1)
        fill = fill if isinstance(fill, float) else fill.reshape(fill.shape[:2] + (1, 1))
        return torch.where(keep, x, torch.as_tensor(fill, dtype=x.dtype, device=x.device))
    if k == "cumsum":
        return args[0].cumsum(2)
    if k == "revcumsum":
        return _valid_rows(args[0], n_valid, 2).flip(2).cumsum(2).flip(2)
    if k == "last":
        return args[0][:, :, n_valid - 1]
    if k in O.REDUCTIONS:
        axis, how = O.REDUCTIONS[k]
        x = args[0]
        if over_tokens:
            x = _valid_rows(x, n_valid, 2 + axis, 0.0 if how == "sum" else -math.inf)
        return x.sum(2 + axis) if how == "sum" else x.amax(2 + axis)
    if k == "expand":
        x = args[0]
        for pos, new in enumerate(op.args[1:]):
            if new == 1.0:
                x = x.unsqueeze(2 + pos)
        return x
    raise NotImplementedError(f"oracle has no rule for tile op '{k}'")


def evaluate(spec: Spec, tensors: dict[str, torch.Tensor], params: dict[str, float], chunk: int,
             initial_state: dict[str, torch.Tensor] | None = None, dtype=torch.float64, matmul_dtype=None):
    """Run the spec on (B, T, H, ...) tensors. Returns ({output: (B, T, H, ...)}, {state: (B, H, ...)}).

    `dtype` is the precision of every op; `matmul_dtype` (e.g. bfloat16) rounds matmul operands
    to it, which makes the low-precision PyTorch reference of the tolerance policy."""
    first = tensors[spec.inputs[0].name]
    B, T, H = first.shape[:3]
    dev = first.device
    dims = {"H": H}
    for d in spec.inputs:
        for name, size in zip(d.dims[3:], tensors[d.name].shape[3:]):
            dims[name] = size
    n_chunks = max(1, math.ceil(T / chunk))
    Tp = n_chunks * chunk

    def padded(x):  # zero padding is the identity the language promises (log-space gates)
        x = x.to(dtype)
        return torch.cat([x, x.new_zeros((B, Tp - T) + x.shape[2:])], 1) if Tp > T else x

    seqs = {d.name: padded(tensors[d.name]) for d in spec.inputs}
    states = {}
    for s in spec.states:
        shape = (B, H) + tuple(dims[n] for n in s.dims)
        init = (initial_state or {}).get(s.name)
        states[s.name] = init.to(dtype).clone() if init is not None else torch.zeros(shape, dtype=dtype, device=dev)
    base = {p: torch.full((1, 1), float(v), dtype=dtype, device=dev) for p, v in params.items()}
    base.update({n: torch.full((1, 1), float(v), dtype=dtype, device=dev) for n, v in dims.items()})
    base["idx"] = torch.arange(chunk, dtype=dtype, device=dev).reshape(1, 1, chunk)
    base["head"] = torch.arange(H, dtype=dtype, device=dev).reshape(1, H)
    base["inf"] = math.inf
    types = value_types(spec)
    over_tokens = {op.out for st in spec.stages for op in st.ops if reduces_tokens(op, types)}
    outs = {o.name: [] for o in spec.outputs}
    for n in range(n_chunks):
        n_valid = min(chunk, T - n * chunk)
        env = dict(base)
        env.update(states)
        for name, x in seqs.items():
            tile = x[:, n * chunk:(n + 1) * chunk]
            env[name] = tile.permute(0, 2, 1, *range(3, tile.dim()))  # (B, H, C, ...)
        for stage in spec.stages:
            for op in stage.ops:
                n_args = 1 if op.kind == "expand" else len(op.args)
                args = [a if isinstance(a, float) else env[a] for a in op.args[:n_args]]
                env[op.out] = _eval_op(op, args, n_valid, matmul_dtype, op.out in over_tokens)
        for o in spec.outputs:
            y = _align(env[o.name], o.tile.rank).expand((B, H) + tuple(env[o.name].shape[2:]))
            outs[o.name].append(y.permute(0, 2, 1, *range(3, y.dim())))
        states = {s.name: env[next_state_name(s.name)].expand_as(states[s.name]) for s in spec.states}
    return {k: torch.cat(v, 1)[:, :T] for k, v in outs.items()}, states
