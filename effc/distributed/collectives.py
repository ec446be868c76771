"""The collectives context parallel records in the autograd graph, shared by the linear and softmax paths."""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


class _Anchor(torch.autograd.Function):
    """`x` unchanged, tied to a gathered tensor so that every rank's backward runs the all-gather's
    backward (a collective: a rank that does not read the gathered values must join it all the same)."""

    @staticmethod
    def forward(ctx, x, gathered):
        ctx.shape, ctx.dtype = gathered.shape, gathered.dtype
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.zeros(ctx.shape, dtype=ctx.dtype, device=grad.device)


def anchor(o, gathered):
    """The output(s) `o`, the first tied to `gathered` (see _Anchor)."""
    return _Anchor.apply(o, gathered) if torch.is_tensor(o) else (_Anchor.apply(o[0], gathered),) + tuple(o[1:])


def gather_stacked(mine: torch.Tensor, group) -> torch.Tensor:
    """All ranks' `mine` (the same shape on every rank), stacked in rank order; autograd-aware (its backward,
    a reduce-scatter, is a collective too)."""
    if torch.is_grad_enabled() and not mine.requires_grad:
        # every rank must record the all-gather, or its backward (a collective) would run on some ranks
        # only and hang: zeros nobody reads, or a rank whose inputs need no gradient
        mine = mine.detach().requires_grad_(True)
    with warnings.catch_warnings():  # torch 2.13 marks it deprecated, with no autograd-aware successor
        warnings.simplefilter("ignore", FutureWarning)
        return torch.stack(dist_fn.all_gather(mine, group=group))


class _AsyncAllGather(torch.autograd.Function):
    """All ranks' `mine` stacked, issued with async_op=True: the returned buffer is filled in the background
    and must not be read before `pending.wait()`. Backward (synchronous): every rank's gradient of the rows
    gathered from this rank, summed onto it (a reduce-scatter on NCCL; an all-reduce elsewhere, where gloo
    has no reduce-scatter: world times the bytes, fine for the small summaries it carries)."""

    @staticmethod
    def forward(ctx, mine, group, pending):
        ctx.group = group
        world = dist.get_world_size(group)
        out = mine.new_empty((world,) + tuple(mine.shape))
        mine = mine.contiguous()
        if dist.get_backend(group) == dist.Backend.NCCL:
            pending.work = dist.all_gather_into_tensor(out, mine, group=group, async_op=True)
        else:
            pending.work = dist.all_gather(list(out.unbind(0)), mine, group=group, async_op=True)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            mine = grad.new_empty(grad.shape[1:])
            dist.reduce_scatter_tensor(mine, grad, group=ctx.group)
            return mine, None, None
        grad = grad.clone()  # all_reduce works in place: not on autograd's buffer
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None, None


class PendingGather:
    """An all-gather in flight (start_gather): do work that does not read it, then `wait()`."""

    def __init__(self):
        self.work, self.result = None, None

    def wait(self) -> torch.Tensor:
        """The stacked result (world, ...), autograd-aware, once the collective has completed."""
        self.work.wait()
        return self.result


def start_gather(mine: torch.Tensor, group) -> PendingGather:
    """Issue the all-gather of `mine` (the same shape on every rank) without waiting for it: the caller runs
    the work that does not depend on it, then `wait()`s. As gather_stacked, every rank records it (its
    backward is a collective)."""
    if torch.is_grad_enabled() and not mine.requires_grad:
        mine = mine.detach().requires_grad_(True)
    pending = PendingGather()
    pending.result = _AsyncAllGather.apply(mine, group, pending)
    return pending
