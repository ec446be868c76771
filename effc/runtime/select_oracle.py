"""The select stage evaluated with PyTorch on whole sequences (passes.select): pooled key blocks, the
per-(query, key block) score, and the choice, with the kernels' rule (forced blocks first, then the score
descending over the candidates, the first k; ties to the lower block index, by a stable sort)."""
from __future__ import annotations

import math

import torch

from ..ir import ops as O
from ..ir.nodes import Spec


def pool(x: torch.Tensor, block: int, kind: str) -> torch.Tensor:
    """(B, H, n, ...) per-token values -> (B, H, nb, ...): the mean or max over each block's tokens that exist
    (the last block may be partial)."""
    B, H, n = x.shape[:3]
    nb = -(-n // block)
    pad = nb * block - n
    fill = 0.0 if kind == "mean" else -math.inf
    xp = torch.cat([x, x.new_full((B, H, pad) + x.shape[3:], fill)], 2) if pad else x
    xp = xp.reshape((B, H, nb, block) + x.shape[3:])
    if kind == "max":
        return xp.amax(3)
    count = torch.full((nb,), float(block), dtype=x.dtype, device=x.device)
    count[-1] = n - (nb - 1) * block
    return xp.sum(3) / count.reshape((nb,) + (1,) * (x.dim() - 3))


def choose(g: torch.Tensor, candidate: torch.Tensor, forced: torch.Tensor, k: int) -> torch.Tensor:
    """(…, nq, nb) scores and predicates -> the chosen blocks (bool): forced first, then g descending over
    the candidates (nan and -inf never chosen); the first k; ties to the lower block index."""
    inf = torch.tensor(math.inf, dtype=g.dtype, device=g.device)
    key = torch.where(candidate & ~torch.isnan(g), g, -inf)
    key = torch.where(forced, inf, key)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :k]
    top = torch.gather(key, -1, order)
    chosen = torch.zeros_like(key, dtype=torch.bool)
    return chosen.scatter(-1, order, top > -inf)


def chosen_blocks(spec: Spec, env: dict, keys: dict, n: int, eval_op) -> torch.Tensor:
    """The chosen key blocks (B, h, nq, nb) (bool) of one sequence of n tokens. `env` holds the query-side
    values of the score stage's evaluation (qpos, params, per-token leaves), `keys` the whole sequence's
    per-token values; `eval_op(op, args)` evaluates a shared tile op."""
    sel = spec.selection
    nb = -(-n // sel.block)
    dtype, device = env["qpos"].dtype, env["qpos"].device
    local = dict(env)
    local["qblock"] = torch.floor(env["qpos"] / sel.block)
    local["kblock"] = torch.arange(nb, dtype=dtype, device=device).reshape(1, 1, 1, nb)
    for op in spec.select.ops:
        if op.kind in O.POOLS:
            x = keys[op.args[0]]
            p = pool(x, sel.block, O.POOLS[op.kind])
            local[op.out] = p.unsqueeze(-2) if x.dim() == 3 else p  # a scalar's pool is a row [1, NB]
            continue
        n_args = 1 if op.kind == "expand" else len(op.args)
        local[op.out] = eval_op(op, [a if isinstance(a, float) else local[a] for a in op.args[:n_args]])

    def full(x):
        x = torch.as_tensor(x, dtype=dtype, device=device)
        while x.dim() < 4:
            x = x.unsqueeze(0)
        return x

    g = full(local[sel.score])
    nq = local["qpos"].shape[2]
    shape = torch.broadcast_shapes(g.shape, (1, 1, nq, nb))
    cand = torch.ones(shape, dtype=torch.bool, device=device)
    for m in sel.candidates:
        cand = cand & (full(local[m]) != 0)
    forced = torch.zeros(shape, dtype=torch.bool, device=device)
    for f in sel.forced:
        forced = forced | (full(local[f]) != 0)
    g = g.expand(torch.broadcast_shapes(g.shape, cand.shape, forced.shape))
    return choose(g, cand.expand_as(g), forced.expand_as(g), sel.k)


def token_keep(chosen: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """(…, nq, nb) chosen blocks -> (…, nq, n): the (query, key) pairs of the chosen blocks."""
    return chosen[..., torch.arange(n, device=chosen.device) // block]
