"""The tile operations the IR knows. Every layer (shape inference, oracle, codegen)
keys its per-op rules on these names; none knows a mechanism."""
from __future__ import annotations

UNARY = ("neg", "exp", "exp2", "log", "log2", "sigmoid", "logsigmoid", "softplus", "tanh",
         "relu", "sqrt", "rsqrt", "abs", "silu")
BINARY = ("add", "sub", "mul", "div", "maximum", "minimum", "pow")
# masks over a (C, C) score tile; optional second argument is the fill value (default 0)
MASKS = ("causal", "strict")
# reductions: name -> (axis reduced, combine)
REDUCTIONS = {"rowsum": (1, "sum"), "rowmax": (1, "max"), "colsum": (0, "sum"), "colmax": (0, "max")}
SCANS = ("cumsum", "revcumsum")  # along the chunk (token) axis, inclusive
OTHER = ("matmul", "transpose", "last", "expand", "copy")
# made by the autodiff pass, not callable from specs:
#   unlast(x): a [C, ...] tile holding x at the last real token, 0 elsewhere (adjoint of last)
#   total(x): the sum of every element (adjoint of a broadcast from a scalar)
#   gtz(x), sign(x), ge(a, b): 1.0 / 0.0 (or -1.0) indicator tiles for relu, abs, max/min
#   bcast(x, like): x broadcast to the shape of `like`
INTERNAL = ("unlast", "total", "gtz", "sign", "ge", "bcast")

ALL = frozenset(UNARY + BINARY + MASKS + tuple(REDUCTIONS) + SCANS + OTHER + INTERNAL)

# name -> number of arguments for the functions callable in spec text
CALLABLE = {**{u: (1, 1) for u in UNARY if u != "neg"},
            "maximum": (2, 2), "minimum": (2, 2),
            **{m: (1, 2) for m in MASKS},
            **{r: (1, 1) for r in REDUCTIONS},
            **{s: (1, 1) for s in SCANS},
            "last": (1, 1)}

# names a spec can read without declaring them
BUILTINS = {
    "idx": "position of each token inside its chunk, 0..C-1, shape (C,)",
    "head": "index of the head, a scalar",
    "inf": "positive infinity (use -inf as a mask fill)",
}
RESERVED_DIMS = ("B", "T", "H")
