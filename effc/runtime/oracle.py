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


def _eval_op(op: Op, args: list, n_valid: int, chunk: int, matmul_dtype=None, over_tokens: bool = False):
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
    if k == "unit_lower_inv":
        x = args[0]
        eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        return torch.linalg.solve_triangular(eye + x.tril(-1), eye.expand_as(x), upper=False, unitriangular=True)
    if k == "gtz":
        return (args[0] > 0).to(args[0].dtype)
    if k == "sign":
        return torch.sign(args[0])
    if k == "ge":
        a, b = (x if isinstance(x, float) else _align(x, op.type.rank) for x in args)
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
        return torch.zeros_like(args[1]) + _align(args[0], args[1].dim() - 2)
    raise NotImplementedError(f"oracle has no rule for tile op '{k}'")


class _Evaluator:
    """Per-chunk evaluation of IR ops on (B, H, *tile) tensors, shared by forward and backward."""

    def __init__(self, spec: Spec, tensors, params, chunk: int, dtype, matmul_dtype):
        first = tensors[spec.inputs[0].name]
        self.B, self.T, self.H = first.shape[:3]
        self.spec, self.chunk, self.dtype, self.matmul_dtype = spec, chunk, dtype, matmul_dtype
        dev = self.device = first.device
        self.dims = {"H": self.H}
        for d in spec.inputs:
            self.dims.update(zip(d.dims[3:], tensors[d.name].shape[3:]))
        self.n_chunks = max(1, math.ceil(self.T / chunk))
        self.seqs = {d.name: self.padded(tensors[d.name]) for d in spec.inputs}
        base = {p: torch.full((1, 1), float(v), dtype=dtype, device=dev) for p, v in params.items()}
        base.update({n: torch.full((1, 1), float(v), dtype=dtype, device=dev) for n, v in self.dims.items()})
        base["idx"] = torch.arange(chunk, dtype=dtype, device=dev).reshape(1, 1, chunk)
        base["head"] = torch.arange(self.H, dtype=dtype, device=dev).reshape(1, self.H)
        base["inf"] = math.inf
        self.base = base
        self.types = value_types(spec)

    def padded(self, x):  # padded tokens read as zeros; the ops mask them out of token reductions
        Tp = self.n_chunks * self.chunk
        x = x.to(self.dtype)
        return torch.cat([x, x.new_zeros((x.shape[0], Tp - self.T) + x.shape[2:])], 1) if Tp > self.T else x

    def tile(self, x, n: int):
        t = x[:, n * self.chunk:(n + 1) * self.chunk]
        return t.permute(0, 2, 1, *range(3, t.dim()))  # (B, H, C, ...)

    def untile(self, y, rank: int):
        y = _align(y, rank).expand((self.B, self.H) + tuple(y.shape[2:]))
        return y.permute(0, 2, 1, *range(3, y.dim()))

    def chunk_env(self, n: int) -> dict:
        env = dict(self.base)
        env.update({name: self.tile(x, n) for name, x in self.seqs.items()})
        return env

    def n_valid(self, n: int) -> int:
        return min(self.chunk, self.T - n * self.chunk)

    def run(self, ops, env: dict, n: int, types=None) -> None:
        types = types or self.types
        for op in ops:
            n_args = 1 if op.kind == "expand" else len(op.args)
            args = [a if isinstance(a, float) else env[a] for a in op.args[:n_args]]
            env[op.out] = _eval_op(op, args, self.n_valid(n), self.chunk, self.matmul_dtype,
                                   reduces_tokens(op, types))

    def initial(self, initial_state) -> dict:
        states = {}
        for s in self.spec.states:
            shape = (self.B, self.H) + tuple(self.dims[n] for n in s.dims)
            init = (initial_state or {}).get(s.name)
            states[s.name] = (init.to(self.dtype).clone() if init is not None
                              else torch.zeros(shape, dtype=self.dtype, device=self.device))
        return states


def evaluate(spec: Spec, tensors: dict[str, torch.Tensor], params: dict[str, float], chunk: int,
             initial_state: dict[str, torch.Tensor] | None = None, dtype=torch.float64, matmul_dtype=None):
    """Run the spec on (B, T, H, ...) tensors. Returns ({output: (B, T, H, ...)}, {state: (B, H, ...)}).

    `dtype` is the precision of every op; `matmul_dtype` (e.g. bfloat16) rounds matmul operands
    to it, which makes the low-precision PyTorch reference of the tolerance policy. A spec with a score stage (the softmax family)
    is evaluated on whole [T, T] score matrices by runtime.softmax_oracle (`chunk` does not apply)."""
    if spec.score.ops and not spec.states:
        from .softmax_oracle import evaluate_softmax
        dims = {n: s for d in spec.inputs for n, s in zip(d.dims[3:], tensors[d.name].shape[3:])}
        return evaluate_softmax(spec, tensors, params, dims, dtype, matmul_dtype), {}
    ev = _Evaluator(spec, tensors, params, chunk, dtype, matmul_dtype)
    states = ev.initial(initial_state)
    ops = spec.intra.ops + spec.merge.ops + spec.inter.ops
    outs = {o.name: [] for o in spec.outputs}
    for n in range(ev.n_chunks):
        env = ev.chunk_env(n)
        env.update(states)
        ev.run(ops, env, n)
        for o in spec.outputs:
            outs[o.name].append(ev.untile(env[o.name], o.tile.rank))
        states = {s.name: env[next_state_name(s.name)].expand_as(states[s.name]) for s in spec.states}
    return {k: torch.cat(v, 1)[:, :ev.T] for k, v in outs.items()}, states

