"""Call-time choices of the decoding kernels (runtime.softmax_decode): tiles and the split of the keys.

A decoding step reads every visible cached key once per query head and does little arithmetic on it: it
is bound by memory bandwidth, so it needs enough programs in flight to keep every multiprocessor loading.
With one program per (request, head) a small batch leaves most of the GPU idle; splitting each request's
keys over several programs (flash-decoding) fills it, at the price of a partial result per split that the
combine kernel reads back."""
from __future__ import annotations

import math

from .tiling import padded

WAVES = 2  # programs per multiprocessor to aim for: one loading while the other waits on memory
MIN_BLOCKS_PER_SPLIT = 2  # a split's partial (BM x (D + 2) floats) stays well below the keys it reads
MAX_SPLITS = 64  # the combine walks the splits one by one


def decode_tiles(n_queries: int, widest_dim: int, interpreting: bool) -> tuple[int, int, int, int]:
    """(BM, BN, warps, stages): the query tile holds every new query of a request (tl.dot needs >= 16
    rows); the key block as the forward's for the feature width (small blocks under the interpreter, to
    exercise the splits and the masks)."""
    bm = padded(n_queries)
    if interpreting:
        return bm, 16, 4, 1
    bn = 64 if padded(widest_dim) <= 128 else 32
    return bm, bn, 4, 2


MAX_GROUP_ROWS = 64  # a program's rows: new tokens x query heads of a group


def decode_group(heads: int, key_heads: list[int], n_queries: int) -> int:
    """How many query heads one program serves: those sharing their key heads (grouped-query attention), so
    each key block is read once for them, as long as their rows (new tokens x heads) fit MAX_GROUP_ROWS;
    otherwise one head a program. Key-side inputs with as many heads as the queries: 1."""
    shared = heads // max(key_heads, default=heads)  # query heads per key head
    return max(g for g in range(1, shared + 1) if shared % g == 0 and (g == 1 or n_queries * g <= MAX_GROUP_ROWS))


def decode_splits(batch_heads: int, key_blocks: int, sm_count: int) -> int:
    """Splits of each request's keys: enough programs for WAVES per multiprocessor, each split keeping at
    least MIN_BLOCKS_PER_SPLIT key blocks, rounded down to a power of two (each count is a compiled
    variant of the kernels)."""
    want = math.ceil(WAVES * sm_count / max(1, batch_heads))
    most = max(1, key_blocks // MIN_BLOCKS_PER_SPLIT)
    n = max(1, min(want, most, MAX_SPLITS))
    return 1 << (n.bit_length() - 1)
