"""One IR op evaluated with torch on whole tiles: the table both oracles (the chunked walk and the softmax
walk) share."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ir import ops as O
from ..ir.nodes import C, Op
from ..passes.decay_dot import rounds_operands

_UNARY = {
    "neg": torch.neg, "exp": torch.exp, "exp2": torch.exp2, "log": torch.log, "log2": torch.log2,
    "sigmoid": torch.sigmoid, "logsigmoid": F.logsigmoid, "softplus": F.softplus, "tanh": torch.tanh,
    "relu": torch.relu, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "abs": torch.abs, "silu": F.silu,
    "sin": torch.sin, "cos": torch.cos,
}
_BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
    "maximum": torch.maximum, "minimum": torch.minimum, "pow": torch.pow,
}


def align(x, rank: int):
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


# ops that can leave the finite range, and per argument a value that keeps them finite: on padded token rows
# they read these and give 0, as the kernels do (codegen.triton.printer._finite_on_padding). Reading safe
# values, not masking the result alone, also keeps their gradients finite: a masked 0 / 0 still sends
# 0 * inf = nan back through autograd.
_SAFE_ON_PADDING = {"exp": (0.0,), "exp2": (0.0,), "log": (1.0,), "log2": (1.0,), "rsqrt": (1.0,),
                    "div": (0.0, 1.0), "pow": (1.0, 1.0)}


def _finite_on_padding(op: Op, args: list, n_valid: int, chunk: int, matmul_dtype):
    rank = op.type.rank
    safe = [a if isinstance(a, float) or align(a, rank).shape[2] != chunk
            else _valid_rows(align(a, rank), n_valid, 2, fill) for a, fill in zip(args, _SAFE_ON_PADDING[op.kind])]
    return _valid_rows(eval_op(op, safe, chunk, chunk, matmul_dtype), n_valid, 2)


def _lower(c: int, diagonal: int, device) -> torch.Tensor:
    """The kept pairs (i, j) of a [c, c] tile: j <= i + diagonal."""
    return torch.ones(c, c, dtype=torch.bool, device=device).tril(diagonal)


def _decay(kind: str, a, b, eq, ek, diag: float):
    """The decay contractions (ir.ops.DECAY) from their exponents, pair by pair: no exp(eq) or exp(ek) alone,
    so they are finite wherever the result is. Tiles are (B, H, C, K); the pair tensor is (B, H, C, C, K)."""
    keep = _lower(eq.shape[2], 0 if diag else -1, eq.device)[:, :, None]
    weight = torch.exp(torch.where(keep, eq[:, :, :, None, :] + ek[:, :, None, :, :], -math.inf))  # [i, j, k]
    if kind == "decay_dot":  # a = x [i, k], b = y [j, k]
        return (a[:, :, :, None, :] * b[:, :, None, :, :] * weight).sum(-1)
    if kind == "decay_mm":  # a = m [i, j], b = z [j, k]
        return (a[:, :, :, :, None] * b[:, :, None, :, :] * weight).sum(3)
    return (a.transpose(-1, -2)[:, :, :, :, None] * b[:, :, :, None, :] * weight).sum(2)  # mt [j, i], z [i, k]


def _pair_level(a, b):
    """0 where a == b, else floor(log2(a xor b)) + 1 (frexp's exponent of a positive integer x is that)."""
    dtype = next((x.dtype for x in (a, b) if torch.is_tensor(x)), torch.float64)
    a, b = (torch.as_tensor(x, dtype=torch.float64) for x in (a, b))
    x = a.to(torch.int64) ^ b.to(torch.int64)
    return torch.frexp(x.to(torch.float64))[1].to(dtype)


def _columns(x, i, rank: int):
    """The index tile of gather / scatter on (B, H, C, D) x: (B, H, C, n) int64, and where it is in range."""
    if isinstance(i, float):
        i = torch.full((1, 1), i, dtype=x.dtype, device=x.device)
    i = align(i, rank)
    shape = x.shape[:3] + (i.shape[3] if rank == 2 else 1,)
    i = (i if rank == 2 else i.unsqueeze(-1)).expand(shape)
    ok = (i >= 0) & (i < x.shape[-1]) & (i == i.floor())
    return torch.where(ok, i, 0).to(torch.int64), ok


def _gather(x, i, rank: int):
    idx, ok = _columns(x, i, rank)
    out = torch.where(ok, torch.gather(x, 3, idx), 0.0)
    return out if rank == 2 else out.squeeze(-1)


def _scatter(g, i, x):
    rank = g.dim() - 2
    idx, ok = _columns(x, i, rank)
    g = align(g, rank) if rank == 2 else g.unsqueeze(-1)
    g = torch.where(ok, g.expand(idx.shape), 0.0)
    return torch.zeros(x.shape[:2] + x.shape[2:], dtype=g.dtype, device=g.device).expand(
        idx.shape[:3] + x.shape[3:]).clone().scatter_add_(3, idx, g)


def eval_op(op: Op, args: list, n_valid: int, chunk: int, matmul_dtype=None, over_tokens: bool = False):
    k = op.kind
    if k in _SAFE_ON_PADDING and n_valid < chunk and op.type.shape and op.type.shape[0] == C:
        return _finite_on_padding(op, args, n_valid, chunk, matmul_dtype)
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
        a = a if isinstance(a, float) else align(a, rank)
        b = b if isinstance(b, float) else align(b, rank)
        if isinstance(a, float):
            a = torch.tensor(a, dtype=b.dtype, device=b.device)
        if isinstance(b, float):  # torch.maximum / minimum take no Python number
            b = torch.tensor(b, dtype=a.dtype, device=a.device)
        return _BINARY[k](a, b)
    if k == "matmul":
        if over_tokens:  # padded tokens do not exist on either side
            args = [_valid_rows(args[0], n_valid, -1), _valid_rows(args[1], n_valid, -2)]
        if matmul_dtype is not None:  # round the operands like a tensor-core matmul does
            return (args[0].to(matmul_dtype) @ args[1].to(matmul_dtype)).to(args[0].dtype)
        return args[0] @ args[1]
    if k == "transpose":
        return args[0].transpose(-1, -2)
    if k in O.MASKS:
        x, fill = args[0], (args[1] if len(args) > 1 else 0.0)
        c = x.shape[-1]
        keep = {"causal": _lower(c, 0, x.device), "strict": _lower(c, -1, x.device),
                "anticausal": _lower(c, 0, x.device).T, "antistrict": _lower(c, -1, x.device).T}[k]
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
    if k == "unit_lower_inv":
        x = args[0]
        eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        return torch.linalg.solve_triangular(eye + x.tril(-1), eye.expand_as(x), upper=False, unitriangular=True)
    if k in O.DECAY:
        if k != "decay_dot":  # contracting over tokens: padded ones do not exist
            args = [args[0], _valid_rows(args[1], n_valid, 2)] + args[2:]
        if matmul_dtype is not None and rounds_operands(k, per_channel_exponents=args[2].shape[-1] != 1):
            args = [a.to(matmul_dtype).to(a.dtype) for a in args[:2]] + args[2:]
        return _decay(k, *args[:5])  # the centre (args[5]) changes no value
    if k == "rotate_half":
        x1, x2 = args[0].chunk(2, dim=-1)
        return torch.cat((-x2, x1), -1)
    if k == "rotate_pairs":
        x = args[0]
        return torch.stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)
    if k == "fidx":  # its argument is the dim's size, a (1, 1) tensor
        n = int(args[0].reshape(-1)[0].item())
        return torch.arange(n, dtype=args[0].dtype, device=args[0].device).reshape(1, 1, n)
    if k == "level":
        return _pair_level(*(x if isinstance(x, float) else align(x, op.type.rank) for x in args))
    if k == "gather":
        return _gather(args[0], args[1], op.type.rank)
    if k == "scatter":
        return _scatter(args[0], args[1], args[2])
    if k == "gtz":
        return (args[0] > 0).to(args[0].dtype)
    if k == "sign":
        return torch.sign(args[0])
    if k == "ge":
        a, b = (x if isinstance(x, float) else align(x, op.type.rank) for x in args)
        return torch.as_tensor(a >= b).to(a.dtype if torch.is_tensor(a) else b.dtype)
    if k == "unlast":
        x = args[0]
        out = torch.zeros(x.shape[:2] + (chunk,) + x.shape[2:], dtype=x.dtype, device=x.device)
        out[:, :, n_valid - 1] = x
        return out
    if k in ("total", "maxall"):
        x = _valid_rows(args[0], n_valid, 2, 0.0 if k == "total" else -math.inf) if over_tokens else args[0]
        dims = tuple(range(2, x.dim()))
        return (x.sum(dim=dims) if k == "total" else x.amax(dim=dims)) if dims else x
    if k == "bcast":
        return torch.zeros_like(args[1]) + align(args[0], args[1].dim() - 2)
    raise NotImplementedError(f"oracle has no rule for tile op '{k}'")
