"""The oracle: evaluate a spec's stages with plain PyTorch ops, chunk by chunk.

A reverse state (annotation `reverse`) is walked first, right to left: its initial value enters the last
chunk, its final value leaves the first (a summary of the whole sequence); then the forward walk evaluates
merge with both directions' entering states.

With chunk=1 the same evaluation is the token-by-token recurrence (each token is its own
chunk: intra is the diagonal term, inter the per-token state update), so one evaluator gives
both the chunked reference and the recurrent one; tests check that they agree.
Every value is held as (B|1, H|1, *tile) so batch and head broadcast like the tile axes.
"""
from __future__ import annotations

import math

import torch

from ..ir.nodes import Spec, next_state_name
from ..passes.fusion import needed
from ..passes.shapes import reduces_tokens, value_types
from .oracle_ops import align, eval_op
from .softmax_oracle import evaluate_softmax


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
        self.pos0 = 0  # `pos` of the first token: evaluate() sets it for a later piece of a sequence
        self.types = value_types(spec)

    def padded(self, x):  # padded tokens read as zeros; the ops mask them out of token reductions
        Tp = self.n_chunks * self.chunk
        x = x.to(self.dtype)
        return torch.cat([x, x.new_zeros((x.shape[0], Tp - self.T) + x.shape[2:])], 1) if Tp > self.T else x

    def tile(self, x, n: int):
        t = x[:, n * self.chunk:(n + 1) * self.chunk]
        return t.permute(0, 2, 1, *range(3, t.dim()))  # (B, H, C, ...)

    def untile(self, y, rank: int):
        y = align(y, rank).expand((self.B, self.H) + tuple(y.shape[2:]))
        return y.permute(0, 2, 1, *range(3, y.dim()))

    def chunk_env(self, n: int) -> dict:
        env = dict(self.base)
        env["pos"] = self.base["idx"] + (n * self.chunk + self.pos0)
        env.update({name: self.tile(x, n) for name, x in self.seqs.items()})
        return env

    def n_valid(self, n: int) -> int:
        return min(self.chunk, self.T - n * self.chunk)

    def run(self, ops, env: dict, n: int, types=None) -> None:
        types = types or self.types
        for op in ops:
            n_args = 1 if op.kind == "expand" else len(op.args)
            args = [a if isinstance(a, float) else env[a] for a in op.args[:n_args]]
            env[op.out] = eval_op(op, args, self.n_valid(n), self.chunk, self.matmul_dtype,
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
             initial_state: dict[str, torch.Tensor] | None = None, dtype=torch.float64, matmul_dtype=None,
             pos_offset: int = 0):
    """Run the spec on (B, T, H, ...) tensors. Returns ({output: (B, T, H, ...)}, {state: (B, H, ...)}).

    `dtype` is the precision of every op; `matmul_dtype` (e.g. bfloat16) rounds matmul operands
    to it, which makes the low-precision PyTorch reference of the tolerance policy. A spec with a score stage (the softmax family)
    is evaluated on whole [T, T] score matrices by runtime.softmax_oracle (`chunk` does not apply)."""
    if spec.score.ops and not spec.states:
        dims = {n: s for d in spec.inputs for n, s in zip(d.dims[3:], tensors[d.name].shape[3:])}
        return evaluate_softmax(spec, tensors, params, dims, dtype, matmul_dtype), {}
    ev = _Evaluator(spec, tensors, params, chunk, dtype, matmul_dtype)
    ev.pos0 = pos_offset
    states = entering = ev.initial(initial_state)
    ops = spec.intra.ops + spec.merge.ops + spec.inter.ops
    reverse = {s.name for s in spec.reverse_states}
    # reverse states first: a right-to-left walk gives the value entering each chunk from its right (their
    # updates read no forward state: passes.legality)
    from_right = [dict() for _ in range(ev.n_chunks)]
    if reverse:
        rev_ops = needed(ops, tuple(next_state_name(s) for s in reverse))
        for n in reversed(range(ev.n_chunks)):
            from_right[n] = {s: states[s] for s in reverse}
            env = ev.chunk_env(n)
            env.update(from_right[n])
            ev.run(rev_ops, env, n)
            states = {**states, **{s: env[next_state_name(s)].expand_as(states[s]) for s in reverse}}
    outs = {o.name: [] for o in spec.outputs}
    for n in range(ev.n_chunks):
        env = ev.chunk_env(n)
        env.update(states)
        env.update(from_right[n])
        ev.run(ops, env, n)
        for o in spec.outputs:
            outs[o.name].append(ev.untile(env[o.name], o.tile.rank))
        states = {s.name: states[s.name] if s.reverse else env[next_state_name(s.name)].expand_as(states[s.name])
                  for s in spec.states}
    if ev.T == 0:  # an empty sequence (varlen): the one all-padding chunk run for the output shapes must not
        states = entering  # move the state (a decay from params, not inputs, would still act on it)
    return {k: torch.cat(v, 1)[:, :ev.T] for k, v in outs.items()}, states

