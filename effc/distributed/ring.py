"""The ring pass of states (`context_parallel(op, schedule="ring")`, linear family, dense contiguous shards).

Rank r receives the states entering its shard from rank r-1 (rank 0 reads `initial_state`), runs the op on its
shard from them, and sends its final states to rank r+1; the last rank returns them. No summary is formed: no
probe run, no [K, K] map, one state per hop. The walks are serial (rank r starts when r-1 has finished), so the
ring wins only where a summary is expensive (matrix transitions, many probes) or the all-gather's
(N - 1)(W + A) received per rank does not fit the bandwidth budget (docs/context-parallel.md).

The backward mirrors it: rank r receives the gradient of its final states from rank r+1 (which computed it as
the gradient of its entering states), runs the op's backward, and sends the gradient of its entering states to
r-1. Both directions are autograd Functions around point-to-point send / recv, so they work on every backend
with P2P (gloo, NCCL)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .collectives import anchor


class _RecvStates(torch.autograd.Function):
    """Forward: the packed states from `src` (a group rank). Backward: their gradient sent back to `src`.
    `token` (a scalar requiring grad) only makes autograd record the node, so that the backward send runs
    whether or not anything else here needs a gradient."""

    @staticmethod
    def forward(ctx, token, shape, dtype, src, group):
        ctx.src, ctx.group = src, group
        buf = torch.empty(shape, dtype=dtype, device=token.device)
        dist.recv(buf, group=group, group_src=src)
        return buf

    @staticmethod
    def backward(ctx, grad):
        dist.send(grad.contiguous(), group=ctx.group, group_dst=ctx.src)
        return None, None, None, None, None


class _SendStates(torch.autograd.Function):
    """Forward: `states` sent to `dst`; returns a scalar token to tie into this rank's output (its backward
    must run). Backward: the states' gradient received from `dst`."""

    @staticmethod
    def forward(ctx, states, dst, group):
        ctx.dst, ctx.group = dst, group
        ctx.shape, ctx.dtype = states.shape, states.dtype
        dist.send(states.contiguous(), group=group, group_dst=dst)
        return states.new_zeros(())

    @staticmethod
    def backward(ctx, _grad_token):
        grad = torch.empty(ctx.shape, dtype=ctx.dtype, device=_grad_token.device)
        dist.recv(grad, group=ctx.group, group_src=ctx.dst)
        return grad, None, None


def pack(states: list[torch.Tensor], dtype) -> torch.Tensor:
    """The states as one (B, H, L) tensor: one message per hop."""
    B, H = states[0].shape[:2]
    return torch.cat([s.to(dtype).reshape(B, H, -1) for s in states], -1)


def unpack(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    sizes = [math.prod(s[2:]) for s in shapes]
    return [part.reshape(s) for part, s in zip(flat.split(sizes, -1), shapes)]


def ring_pass(op, tensors, initial_state, output_final_state, kw, shapes, dtype, group, world, rank):
    """(o, final) of this rank's shard, the states passed rank to rank (see the module doc). `shapes`: each
    state's (B, H, ...) shape; `kw` the op's knobs (with this shard's pos_offset where the spec reads pos)."""
    grad = torch.is_grad_enabled()
    device = tensors[0].device
    last = rank == world - 1
    entering = None
    if rank > 0:
        token = torch.zeros((), device=device, requires_grad=grad)
        flat_in = _RecvStates.apply(token, (shapes[0][0], shapes[0][1], sum(math.prod(s[2:]) for s in shapes)),
                                    dtype, rank - 1, group)
        entering = unpack(flat_in, shapes)
        initial_state = entering[0] if len(entering) == 1 else tuple(entering)
    want_final = output_final_state or not last
    if tensors[0].shape[1] == 0:  # an empty shard: the states pass through
        o = op(*tensors, **kw)[0]
        final = initial_state
        if final is None:
            final = tuple(torch.zeros(s, dtype=dtype, device=device) for s in shapes)
    else:
        o, final = op(*tensors, initial_state=initial_state, output_final_state=want_final, **kw)
    if entering is not None:
        # the backward send to rank-1 must run even if nothing here reads the entering states' gradient
        o = anchor(o, flat_in)
    if last:
        return o, (final if output_final_state else None)
    flat_out = pack([final] if torch.is_tensor(final) else list(final), dtype)
    if grad and not flat_out.requires_grad:  # rank 0 with nothing to differentiate: still receive the gradient
        flat_out = flat_out.detach().requires_grad_(True)
    token = _SendStates.apply(flat_out, rank + 1, group)
    return anchor(o, token), None
