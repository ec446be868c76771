"""The collectives context parallel records in the autograd graph, shared by the linear and softmax paths."""
from __future__ import annotations

import warnings

import torch
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
