"""Token routing for mixtures of memories (MoM, sparse state expansion): each token goes to its top-k
memories, every memory runs the op over the tokens routed to it as packed sequences (one per batch row
and memory, in token order), and the outputs return to their tokens weighted by the router.

The op runs once for all memories (varlen, `cu_seqlens`): a memory that no token of a row reaches is an
empty sequence, whose final state is its initial state. Everything here is gather / scatter on the
device, differentiable by autograd; the op's own kernels do the scan.
"""
from __future__ import annotations

import torch

from ..errors import ArgumentError


def _check(router_logits, inputs, top_k: int):
    if router_logits.dim() != 3:
        raise ArgumentError(f"router_logits must be [B, T, M] (one logit per token and memory), got shape "
                            f"{tuple(router_logits.shape)}")
    B, T, M = router_logits.shape
    if not isinstance(top_k, int) or not 1 <= top_k <= M:
        raise ArgumentError(f"top_k must be an integer from 1 to the number of memories ({M}), got {top_k!r}")
    for i, x in enumerate(inputs):
        if not torch.is_tensor(x) or x.dim() < 3 or tuple(x.shape[:2]) != (B, T):
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ArgumentError(f"input {i} must be [B, T, H, ...] with B={B}, T={T} as router_logits, got {shape}")
    return B, T, M


def route_to_memories(op, router_logits: torch.Tensor, *inputs: torch.Tensor, top_k: int = 2,
                      initial_state=None, output_final_state: bool = False, **kwargs):
    """(o, final_states): `op` (a linear-family op, e.g. `effc.load("gla")`) run per memory over the tokens
    routed to it. `router_logits` [B, T, M]; each token goes to its `top_k` memories with weights the
    softmax of its top-k logits; o[b, t] = sum over its memories m of weight * op's output at that token
    in memory m's sequence of row b. `initial_state`: per (row, memory) states, the op's state shape with
    [B, M] in front (a tensor, or a tuple of them for several states); final states come back the same
    way. Other keyword arguments go to the op."""
    B, T, M = _check(router_logits, inputs, top_k)
    device = router_logits.device
    top, memory = router_logits.topk(top_k, dim=-1)  # [B, T, k]
    weight = top.softmax(-1)
    # the routed (row, memory, token) triples, ordered by memory then row then token: a sequence per (m, b)
    rows = torch.arange(B, device=device)[:, None, None].expand(B, T, top_k)
    tokens = torch.arange(T, device=device)[None, :, None].expand(B, T, top_k)
    sequence = memory * B + rows  # which packed sequence each routed copy joins
    order = torch.argsort((sequence * T + tokens).flatten(), stable=True)
    flat_rows, flat_tokens = rows.flatten()[order], tokens.flatten()[order]
    lengths = torch.bincount(sequence.flatten(), minlength=M * B)
    cu_seqlens = torch.zeros(M * B + 1, dtype=torch.int32, device=device)
    cu_seqlens[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    packed = [x[flat_rows, flat_tokens].unsqueeze(0) for x in inputs]
    init = None
    if initial_state is not None:
        states = initial_state if isinstance(initial_state, (tuple, list)) else (initial_state,)
        for s in states:
            if s.dim() < 2 or tuple(s.shape[:2]) != (B, M):
                raise ArgumentError(f"initial_state must be [B, M, ...] with B={B}, M={M} (a state per row and "
                                    f"memory), got {tuple(s.shape)}")
        init = tuple(s.transpose(0, 1).reshape(M * B, *s.shape[2:]) for s in states)
        init = init if isinstance(initial_state, (tuple, list)) else init[0]
    o, final = op(*packed, initial_state=init, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                  **kwargs)
    routed_weight = weight.flatten()[order].to(o.dtype)
    contribution = o[0] * routed_weight.view(-1, *([1] * (o.dim() - 2)))
    out = o.new_zeros((B * T,) + tuple(o.shape[2:]))
    out = out.index_add(0, flat_rows * T + flat_tokens, contribution).view(B, T, *o.shape[2:])
    if not output_final_state:
        return out, None
    finals = final if isinstance(final, (tuple, list)) else (final,)
    finals = tuple(f.reshape(M, B, *f.shape[1:]).transpose(0, 1) for f in finals)
    return out, finals if isinstance(final, (tuple, list)) else finals[0]
