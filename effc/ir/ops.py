"""The tile operations the IR knows. Every layer (shape inference, oracle, codegen)
keys its per-op rules on these names; none knows a mechanism."""
from __future__ import annotations

UNARY = ("neg", "exp", "exp2", "log", "log2", "sigmoid", "logsigmoid", "softplus", "tanh",
         "relu", "sqrt", "rsqrt", "abs", "silu", "sin", "cos")
BINARY = ("add", "sub", "mul", "div", "maximum", "minimum", "pow")
# masks over a (C, C) score tile; optional second argument is the fill value (default 0).
# causal / strict keep key j <= i / j < i of query i; anticausal / antistrict keep j >= i / j > i (the
# in-chunk part of a reverse state's scan: the keys after the query)
MASKS = ("causal", "strict", "anticausal", "antistrict")
# reductions: name -> (axis reduced, combine)
REDUCTIONS = {"rowsum": (1, "sum"), "rowmax": (1, "max"), "colsum": (0, "sum"), "colmax": (0, "max")}
SCANS = ("cumsum", "revcumsum")  # along the chunk (token) axis, inclusive
# unit_lower_inv(A): (I + strict lower part of A)^-1 for a [C, C] tile: the UT / WY transform that
# chunks transitions of the form I - b k k^T (the delta rule)
SOLVES = ("unit_lower_inv",)
# maxall(x): the largest element of a tile, a scalar (running maxima of stabilised exponential gates)
WHOLE = ("maxall",)
# rotations of the feature (last) axis of a tile, as rotary position embeddings pair its features:
#   rotate_half(x):  [x1, x2] -> [-x2, x1], x1 and x2 the two halves (the NeoX / Llama convention)
#   rotate_pairs(x): (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...), adjacent pairs (GPT-J, interleaved)
# Both are x @ R for an antisymmetric signed permutation R, so each one's adjoint is its negation.
ROTATIONS = ("rotate_half", "rotate_pairs")
# fidx(D): the index of each feature along feature dim D, 0..D-1, shape (D,) (the rotary frequencies' index)
FEATURE = ("fidx",)
# Fenwick levels (log-linear attention; docs/design.md, level states):
#   level(a, b): the level of a pair of token positions (integers >= 0), 0 where a == b, else
#                floor(log2(a xor b)) + 1: the Fenwick bucket of b as seen from a (b < a)
#   gather(x, i): row t of a [C, D] tile picked at column i[t, ...]: out[t, ...] = x[t, i[t, ...]], 0 where i is
#                 not in 0..D-1; i a scalar, a [C] vector or a [C, n] tile (out [C], [C], [C, n])
# made by the autodiff pass: scatter(g, i, x), the adjoint of gather: a tile shaped like x, g summed into the
# columns i picked
LEVELS = ("level", "gather")
OTHER = ("matmul", "transpose", "last", "expand", "copy")
# made by the autodiff pass, not callable from specs:
#   unlast(x): a [C, ...] tile holding x at the last real token, 0 elsewhere (adjoint of last)
#   total(x): the sum of every element (adjoint of a broadcast from a scalar)
#   gtz(x), sign(x), ge(a, b): 1.0 / 0.0 (or -1.0) indicator tiles for relu, abs, max/min
#   bcast(x, like): x broadcast to the shape of `like`
# made by passes.decay_dot from a score matmul of factored decays, and by its adjoints (x, y, z [C, K];
# m, mt [C, C]; exponents eq, ek [C, K] or [C, 1]; diag 1.0 keeps j <= i, 0.0 keeps j < i; c [K], a centre
# with every eq - c and ek + c within the chunk's span / 2, or 0.0 for [C, 1] exponents; it changes no value):
#   decay_dot(x, y, eq, ek, diag, c)[i, j] = sum_k x_ik y_jk exp(eq_ik + ek_jk)       (kept pairs, else 0)
#   decay_mm(m, z, eq, ek, diag, c)[i, k] = sum_j m_ij z_jk exp(eq_ik + ek_jk)        (kept j)
#   decay_mm_t(mt, z, eq, ek, diag, c)[j, k] = sum_i mt_ji z_ik exp(eq_ik + ek_jk)    (kept i)
DECAY = ("decay_dot", "decay_mm", "decay_mm_t")
INTERNAL = ("unlast", "total", "gtz", "sign", "ge", "bcast", "scatter") + DECAY

# ops whose work a kernel would rather read through memory than repeat (passes.partition's common values,
# passes.hand_on's handed ones): the rest (elementwise ops, masks, reductions, layout) is recomputed where read
HEAVY = frozenset(("matmul",) + SOLVES + DECAY)

# comparisons and boolean logic give 1.0 / 0.0 tiles (`ge` is also made by the autodiff pass)
COMPARE = ("lt", "le", "gt", "ge", "eq", "ne")
LOGIC = ("and", "or", "not")
# the softmax family (passes.softmax): `key(x)` is the key-block tile of a per-token value x;
# softmax(s) and logsumexp(s) run over every key that the score stage's masks keep
# and `query(x)` its query-block tile; in score a per-token scalar is oriented against the [C, CK]
# pair tile: query side a column [C, 1], key side a row [1, CK]
SOFTMAX = ("where", "key", "query", "softmax", "logsumexp")
# the select stage (passes.select): blockmean(x) / blockmax(x) pool a per-token value over each key block,
# an [NB, D] tile (a row [1, NB] for a scalar); the select stage reads them against the queries
POOLS = {"blockmean": "mean", "blockmax": "max"}

ALL = frozenset(UNARY + BINARY + MASKS + tuple(REDUCTIONS) + SCANS + SOLVES + WHOLE + ROTATIONS + FEATURE + LEVELS + OTHER + INTERNAL
                + COMPARE + LOGIC + SOFTMAX + tuple(POOLS))

# name -> number of arguments for the functions callable in spec text
CALLABLE = {**{u: (1, 1) for u in UNARY if u != "neg"},
            "maximum": (2, 2), "minimum": (2, 2),
            **{m: (1, 2) for m in MASKS},
            **{r: (1, 1) for r in REDUCTIONS},
            **{s: (1, 1) for s in SCANS},
            "unit_lower_inv": (1, 1),
            "maxall": (1, 1),
            **{r: (1, 1) for r in ROTATIONS}, "fidx": (1, 1),
            "last": (1, 1),
            "level": (2, 2), "gather": (2, 2),
            "where": (3, 3), "not": (1, 1), "key": (1, 1), "query": (1, 1), "softmax": (1, 1), "logsumexp": (1, 1)}

# names a spec can read without declaring them
BUILTINS = {
    "idx": "position of each token inside its chunk, 0..C-1, shape (C,)",
    "pos": "absolute position of each token in its sequence, shape (C,) (chunked-scan stages; score has qpos, kpos)",
    "head": "index of the head, a scalar",
    "inf": "positive infinity (use -inf as a mask fill)",
}
RESERVED_DIMS = ("B", "T", "H")
# names of a spec with level states (`state A: [K, V] levels N`), substituted as numbers when the lowering
# expands them: `lvl` (0..N-1) inside `levelsum(...)` in merge and in a level state's update in inter;
# `nlevels` (N) in every stage
LEVEL_NAMES = {"lvl": "the level of the state being read or updated, 0..N-1",
               "nlevels": "the number of levels N of the spec's level states"}
# builtins of the score stage (softmax family): absolute positions oriented against the [C, CK] pair tile
PAIR_BUILTINS = {
    "qpos": "absolute position of each query token in its sequence, a column (C, 1)",
    "kpos": "absolute position of each key token in its sequence, a row (1, CK)",
}
# builtins of the select stage: block indices oriented against the [C, NB] (query, key block) tile
SELECT_BUILTINS = {
    "qblock": "the key block holding each query token (its position // block), a column (C, 1)",
    "kblock": "the index of each key block, a row (1, NB)",
}
# the select stage's criteria: name -> what its second argument is
CRITERIA = {"topk": "the number of blocks each query keeps (an integer >= 1)",
            "topp": "the cumulative mass of the normalised block scores to keep (0 < p <= 1, a number or a param)",
            "threshold": "the score a block must reach (a number or a param)"}
