"""Kernel plan -> source. One printer per backend; none knows a mechanism, only tile ops."""
from functools import lru_cache
from pathlib import Path

import jinja2

# Bump when generated kernels change in a way that can change which tile configuration is fastest
# (loop structure, what is kept on chip, how loads are issued): tuned configurations recorded under an
# older version are then ignored, and `effc tune` records new ones.
CODEGEN_VERSION = 5  # 5: transposes of matmul results computed as transposed matmuls (passes.transpose_sink); 2: per-block adjoint histories, padded rows masked at overflowing ops, 16-bit dO in softmax bwd; 3: CSE, tf32x3 in-chunk inverse; 4: hoisted solves (prep), deferred merge (out)


@lru_cache(maxsize=None)
def template(module_file: str, name: str) -> jinja2.Template:
    """The Jinja template `name` beside the module `module_file` (pass `__file__`), loaded once."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(module_file).parent),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template(name)


def power(base: str, exponent, lib: str, exponent_text: str) -> str:
    """`base ** exponent` in a backend's math namespace `lib` (tl, T): products for small integer
    exponents, sqrt and rsqrt for +-1/2, else exp2(exponent * log2(base)), which needs a positive base."""
    if isinstance(exponent, float) and exponent.is_integer() and 1 <= exponent <= 4:
        return "(" + " * ".join([base] * int(exponent)) + ")"
    if exponent == 0.5:
        return f"{lib}.sqrt({base})"
    if exponent == -0.5:
        return f"{lib}.rsqrt({base})"
    return f"{lib}.exp2({exponent_text} * {lib}.log2({base}))"
