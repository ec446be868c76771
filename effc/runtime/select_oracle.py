"""The select stage evaluated with PyTorch on whole sequences (passes.select): pooled key blocks, the
per-(query, key block) score, and the choice, with the kernels' rule (forced blocks first, then the score
descending over the candidates, ties to the lower block index by a stable sort; then the criterion along
that order: the first k, the prefix holding a mass p, or the scores >= x; optionally capped; shared: one
choice per key/value head group, on the group's summed or averaged scores)."""
from __future__ import annotations

import math

import torch

from ..errors import ArgumentError
from ..ir import ops as O
from ..ir.nodes import Selection, Spec
from ..passes.select import chooses_tokens


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


def check_criterion(spec: Spec, values: dict) -> None:
    """A criterion read from a param is checked at call time (`values`: name or p_name -> value)."""
    kind, value = spec.selection.criterion
    if not isinstance(value, str):
        return
    x = values.get(value, values.get(f"p_{value}"))
    x = float(x.flatten()[0]) if torch.is_tensor(x) else float(x)
    if kind == "topp" and not 0 < x <= 1:
        raise ArgumentError(f"{spec.name}: param {value} = {x:g} is topp's mass, which must be in (0, 1]")
    if math.isnan(x):
        raise ArgumentError(f"{spec.name}: param {value} is nan: {kind} would keep nothing")


def head_group(spec: Spec, tensors: dict, H: int) -> int:
    """The query heads that share one key head: H over the key inputs' heads (1 without grouped heads)."""
    heads = {tensors[d.name].shape[2] for d in spec.inputs if "key" in d.annotations and d.name in tensors}
    if len(heads) > 1:
        raise ArgumentError(f"{spec.name}: a shared select needs one head group, but the key inputs have "
                            f"{sorted(heads)} heads")
    return H // heads.pop() if heads else 1


def choose(g: torch.Tensor, candidate: torch.Tensor, forced: torch.Tensor, sel: Selection,
           value: float) -> torch.Tensor:
    """(…, nq, nb) scores and predicates -> the chosen blocks (bool), along the order: forced first, then
    g descending over the candidates (nan and -inf never chosen; ties to the lower block index); then
    topk: the first k; topp: forced blocks and the shortest prefix of the candidates whose softmax mass
    (over the candidates) reaches `value`; threshold: forced blocks and the candidates scoring >= `value`;
    `sel.limit`: at most that many in all, the first of the order."""
    g = g.detach()
    inf = torch.tensor(math.inf, dtype=g.dtype, device=g.device)
    key = torch.where(candidate & ~torch.isnan(g), g, -inf)
    key = torch.where(forced, inf, key)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    ks = torch.gather(key, -1, order)
    rank = torch.arange(key.shape[-1], device=g.device)
    kind = sel.criterion[0]
    own = ks.isfinite()  # the candidates proper: not forced, not -inf
    if kind == "topk":
        take = (rank < int(value)) & (ks > -inf)
    elif kind == "topp":
        top = torch.where(own, ks, -inf).amax(-1, keepdim=True)
        top = torch.where(top > -inf, top, torch.zeros_like(top))
        mass = torch.where(own, torch.exp(ks - top), torch.zeros_like(ks))
        mass = mass / mass.sum(-1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
        before = torch.cumsum(mass, -1) - mass
        take = (ks == inf) | (own & ((before < value) | (value >= 1)))
    else:
        take = (ks == inf) | (own & (ks >= value))
    if sel.limit is not None:
        take = take & (rank < sel.limit)
    chosen = torch.zeros_like(key, dtype=torch.bool)
    return chosen.scatter(-1, order, take)


def chosen_blocks(spec: Spec, env: dict, keys: dict, n: int, eval_op, group: int = 1) -> torch.Tensor:
    """The chosen key blocks (B, h, nq, nb) (bool) of one sequence of n tokens; a choice of key tokens
    (a [C, CK] score): the chosen keys (B, h, nq, n). `env` holds the query-side values of the score stage's
    evaluation (qpos, kpos, params, per-token leaves), `keys` the whole sequence's per-token values;
    `eval_op(op, args)` evaluates a shared tile op. `group`: the query heads sharing a key head (a shared
    select chooses per group; the h heads evaluated are whole groups)."""
    sel = spec.selection
    nb = n if chooses_tokens(spec) else -(-n // sel.block)
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
        src = keys if op.kind == "key" else local
        local[op.out] = eval_op(op, [a if isinstance(a, float) else src[a] for a in op.args[:n_args]])

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
    check_criterion(spec, env)
    value = sel.criterion[1]
    value = float(env[value].flatten()[0]) if isinstance(value, str) else value
    if sel.shared:  # one score per head group: the sum (mean) over the group's heads, every head choosing it
        h = env["head"].shape[-1]
        g = g.expand(g.shape[:1] + (h,) + g.shape[2:])
        g = g.reshape(g.shape[0], h // group, group, *g.shape[2:])
        g = (g.sum(2, keepdim=True) if sel.shared == "sum" else g.mean(2, keepdim=True)).expand_as(g).flatten(1, 2)
    g = g.expand(torch.broadcast_shapes(g.shape, cand.shape, forced.shape))
    return choose(g, cand.expand_as(g), forced.expand_as(g), sel, value)


def token_keep(spec: Spec, chosen: torch.Tensor, n: int) -> torch.Tensor:
    """chosen_blocks' result -> (…, nq, n): the (query, key) pairs of the chosen blocks (or keys)."""
    if chooses_tokens(spec):
        return chosen
    return chosen[..., torch.arange(n, device=chosen.device) // spec.selection.block]
