"""Where the packed documents of a varlen call fall on one rank's shard (context parallel with cu_seqlens).

The global stream (1, total_T, H, D) is cut contiguously over the ranks, so a rank sees, in order:
  - at most one *continuation*: the rest of a document that started on an earlier rank. Its initial
    state is the state entering the shard (composed from the earlier ranks' summaries);
  - the documents *starting* on the shard (owned: the rank reads their rows of `initial_state`), the
    last of which may run on into later ranks.
A document's final state is produced on the rank that holds its last token; an empty document belongs
to the rank holding the token at its position (the last rank for one at total_T), like a start.
Pure bookkeeping on Python ints: no tensors, no communication."""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass


@dataclass(frozen=True)
class ShardLayout:
    start: int  # the shard is global tokens [start, end)
    end: int
    cont: int | None  # the document continuing from the previous rank, if any
    cont_len: int  # its tokens on this shard (the shard's first cont_len tokens; may be 0 on an empty shard)
    owned: range  # documents starting on this shard, in order
    owned_cu: tuple[int, ...]  # their cu_seqlens relative to token start + cont_len
    ends_here: tuple[int, ...]  # documents whose final state this rank produces
    continues_out: bool  # a document runs on past `end` into the next rank: its state leaves this shard

    @property
    def cont_ends_here(self) -> bool:
        return self.cont is not None and self.cont in self.ends_here


def shard_layout(cu: list[int], bounds: list[tuple[int, int]], rank: int) -> ShardLayout:
    """The layout of rank `rank`'s shard [bounds[rank]) of the packed stream with global boundaries `cu`."""
    s, e = bounds[rank]
    n = len(cu) - 1
    last = rank == len(bounds) - 1
    k = bisect_left(cu, s)  # first boundary at or after s: document k-1 holds token s-1
    cont = k - 1 if 0 < k <= n and cu[k] > s else None
    cont_len = min(cu[cont + 1], e) - s if cont is not None else 0
    i0 = bisect_left(cu, s, 0, n)
    i1 = n if last else bisect_left(cu, e, 0, n)  # the last rank also owns empty documents at total_T
    owned = range(i0, i1)
    base = s + cont_len
    owned_cu = tuple(cu[i] - base for i in owned) + (e - base,) if len(owned) else ()
    ends = ([cont] if cont is not None and cu[cont + 1] <= e else []) + [i for i in owned if cu[i + 1] <= e]
    k = bisect_left(cu, e)
    continues_out = not last and 0 < k <= n and cu[k] > e
    return ShardLayout(s, e, cont, cont_len, owned, owned_cu, tuple(ends), continues_out)
