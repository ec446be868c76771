"""How the time axis is laid out over the ranks: which global tokens a rank's shard holds.

- contiguous: rank r holds one piece, the r-th of N near-equal pieces (or any lengths: shards may be uneven).
- zigzag: the sequence is cut into 2N near-equal pieces and rank r holds pieces r and 2N-1-r, in that order,
  concatenated along T. Under a causal mask the query-key pairs of piece p grow with p, so pairing an early
  piece with its mirror gives every rank the same work (causal_pairs); contiguous shards give rank r work
  proportional to 2r + 1.

A piece is a global token range (start, end). The wrappers learn every rank's shard length from one small
all-gather; for zigzag the lengths must be those of `shard(x, layout="zigzag")`."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import ArgumentError

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ArgumentError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    return layout


def near_equal(total: int, n: int) -> list[tuple[int, int]]:
    """`total` tokens cut into `n` pieces as torch.tensor_split does: the first total % n one token longer."""
    q, extra = divmod(total, n)
    bounds, s = [], 0
    for i in range(n):
        e = s + q + (1 if i < extra else 0)
        bounds.append((s, e))
        s = e
    return bounds


def zigzag_pieces(total: int, world: int) -> list[list[tuple[int, int]]]:
    """Per rank, its two pieces (r and 2N-1-r of 2N near-equal pieces), in the order its shard holds them."""
    p = near_equal(total, 2 * world)
    return [[p[r], p[2 * world - 1 - r]] for r in range(world)]


def rank_pieces(layout: str, lengths: list[int]) -> list[list[tuple[int, int]]]:
    """Per rank, the global pieces its shard holds, given every rank's shard length. Raises ArgumentError when
    the lengths are not those of the layout (zigzag: the cut of `shard(x, layout="zigzag")`)."""
    if layout == "contiguous":
        out, s = [], 0
        for n in lengths:
            out.append([(s, s + n)])
            s += n
        return out
    pieces = zigzag_pieces(sum(lengths), len(lengths))
    want = [sum(e - s for s, e in p) for p in pieces]
    if want != list(lengths):
        raise ArgumentError(f"layout='zigzag' expects each rank's shard to be pieces r and 2N-1-r of the sequence cut "
                            f"into 2N near-equal pieces (effc.distributed.shard(x, layout='zigzag')): shard lengths "
                            f"{want}; got {list(lengths)}")
    return pieces


def virtual_ids(layout: str, world: int, rank: int) -> list[int]:
    """The positions in sequence order (0 .. pieces-1) of this rank's pieces."""
    return [rank] if layout == "contiguous" else [rank, 2 * world - 1 - rank]


def shard_lengths(x0: torch.Tensor, group) -> list[int]:
    """Every rank's shard length along T (one small all-gather)."""
    world = dist.get_world_size(group)
    lengths = [torch.zeros(1, dtype=torch.int64, device=x0.device) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([x0.shape[1]], dtype=torch.int64, device=x0.device), group=group)
    return [int(n.item()) for n in lengths]


def split_pieces(x: torch.Tensor, pieces: list[tuple[int, int]], dim: int = 1) -> list[torch.Tensor]:
    """A shard cut back into its pieces along `dim`."""
    return list(x.split([e - s for s, e in pieces], dim))


def shard(x: torch.Tensor, group=None, dim: int = 1, layout: str = "contiguous") -> torch.Tensor:
    """This rank's shard of the full tensor `x` along `dim` (the time axis): its contiguous near-equal piece,
    or with layout="zigzag" pieces r and 2N-1-r of 2N, concatenated."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    return shard_of(x, world, rank, dim, layout)


def shard_of(x: torch.Tensor, world: int, rank: int, dim: int = 1, layout: str = "contiguous") -> torch.Tensor:
    """Rank `rank`'s shard of `x` among `world` ranks (no process group needed)."""
    check_layout(layout)
    if layout == "contiguous":
        return x.tensor_split(world, dim)[rank]
    pieces = zigzag_pieces(x.shape[dim], world)[rank]
    return torch.cat([x.narrow(dim, s, e - s) for s, e in pieces], dim)


def unshard(shards: list[torch.Tensor], dim: int = 1, layout: str = "contiguous") -> torch.Tensor:
    """The full tensor from every rank's shard (in rank order): the inverse of `shard`."""
    check_layout(layout)
    if layout == "contiguous":
        return torch.cat(list(shards), dim)
    pieces = rank_pieces(layout, [s.shape[dim] for s in shards])
    placed = [(p[0], part) for ps, x in zip(pieces, shards) for p, part in zip(ps, split_pieces(x, ps, dim))]
    return torch.cat([part for _, part in sorted(placed, key=lambda sp: sp[0])], dim)


def causal_pairs(total: int, world: int, layout: str = "contiguous") -> list[int]:
    """Per rank, the (query, key) pairs a causal mask keeps for its queries (key <= query): the work of the
    softmax family's kernels, up to the skipped halves of diagonal blocks."""
    pieces = rank_pieces(layout, [sum(e - s for s, e in p) for p in (
        [[b] for b in near_equal(total, world)] if layout == "contiguous" else zigzag_pieces(total, world))])
    return [sum((e * (e + 1) - s * (s + 1)) // 2 for s, e in ps) for ps in pieces]
