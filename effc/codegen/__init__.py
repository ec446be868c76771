"""Kernel plan -> source. One printer per backend; none knows a mechanism, only tile ops."""
import re
from functools import lru_cache
from pathlib import Path

import jinja2

# Bump when generated kernels change in a way that can change which tile configuration is fastest
# (loop structure, what is kept on chip, how loads are issued): tuned configurations recorded under an
# older version are then ignored, and `effc tune` records new ones.
CODEGEN_VERSION = 15  # 15: bwd_inject writes per-token terms, the adjoint scan hands dv on to the gradient kernels, the walk v - w S to out, the backward loads the outputs it formed again; 14: a chunk-parallel kernel's one chunk under an if, not a one-trip loop; 13: the serial loops store the state first, chunk counters in 32 bits; 12: the walk loads dot-only tiles as stored, the serial kernels the gates' cumsum from prep; 11: the in-chunk inverse in exact fp32 (ieee), not tf32x3; 10: loads at their first reader only in kernels that spill without (runtime.launch.spill_free); 9: tile loads at their first reader (chunk-parallel kernels); 8: serial loops load vectors and injected terms a chunk ahead; 7: the in-chunk inverse's blocks of one size as one batch; 6: the in-chunk inverse by halves; 5: transposes of matmul results computed as transposed matmuls (passes.transpose_sink); 2: per-block adjoint histories, padded rows masked at overflowing ops, 16-bit dO in softmax bwd; 3: CSE, tf32x3 in-chunk inverse; 4: hoisted solves (prep), deferred merge (out)
# FMA contraction asked for by name in every Triton compile and launch: Triton 3.9 warns at each compile that
# leaves it to the default, which Triton 3.10 turns off (slower kernels, numerics unlike those measured)
FP_FUSION = {"enable_fp_fusion": True}

_LOAD = re.compile(r"^\s*(v_\w+) = tl\.load\(")
_CONTINUED = ("else", "elif")  # lines that continue the compound statement above them


def at_first_use(block: str, move: bool = True) -> str:
    """A block of generated lines with each tile load (`v_x = tl.load(...)`) moved down to just before the first
    line that reads `v_x`: a tile loaded at the top of a loop body stays live in registers through every line
    before its use (gated_delta_net's bwd_sums spilled 784 B a thread on sm_90 with its loads at the top of
    its loop over V, 140 B with each at its first use). Loads only move down, past lines that neither read
    their value nor define what their address reads, so the block computes the same. `move`: False leaves
    the block as it is."""
    if not move:
        return block
    out: list[str] = []
    waiting: list[tuple[str, str]] = []  # (name, load line), in their order, not yet placed
    indent = lambda line: len(line) - len(line.lstrip())
    for line in block.split("\n"):
        m = _LOAD.match(line)
        if m:
            waiting.append((m.group(1), line))
            continue
        defined = re.match(r"^\s*(\w+)\s*=", line)
        ended = [w for w in waiting if line.strip() and indent(line) < indent(w[1])]
        out += [load for _, load in ended]  # their block ends here, unread in it: placed at its end
        waiting = [w for w in waiting if w not in ended]
        for name, load in list(waiting):
            if re.search(rf"\b{name}\b", line) or (  # read here, or what its address reads is redefined
                    defined is not None and re.search(rf"\b{defined.group(1)}\b", load.split("=", 1)[1])):
                at = len(out)
                if indent(line) > indent(load):  # inside a nested block: above the statement that opened it
                    while at > 1 and (indent(out[at - 1]) > indent(load) or out[at - 1].lstrip().startswith(_CONTINUED)):
                        at -= 1
                    at -= 1
                out.insert(at, load)
            else:
                continue
            waiting.remove((name, load))
        out.append(line)
    return "\n".join(out + [ld for _, ld in waiting])


@lru_cache(maxsize=None)
def template(module_file: str, name: str) -> jinja2.Template:
    """The Jinja template `name` beside the module `module_file` (pass `__file__`), loaded once."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(module_file).parent),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["at_first_use"] = at_first_use
    return env.get_template(name)


# how a backend's math namespace spells an elementwise select
_WHERE = {"tl": "tl.where", "T": "T.if_then_else"}


def power(base: str, exponent, lib: str, exponent_text: str) -> str:
    """`base ** exponent` as torch.pow computes it (the oracle), in a backend's math namespace `lib` (tl, T).
    passes.lower makes integer exponents up to MAX_PRODUCT_EXPONENT products; here are +-1/2 (sqrt, rsqrt),
    other numbers and runtime scalars (a param): exp2(e * log2|base|), negated for a negative base and an odd
    integer e; a negative base and a non-integer e give NaN (log2 of a negative number), as in torch."""
    if exponent == 0.5:
        return f"{lib}.sqrt({base})"
    if exponent == -0.5:
        return f"{lib}.rsqrt({base})"
    signed = f"{lib}.exp2({exponent_text} * {lib}.log2({base}))"
    if isinstance(exponent, float) and not exponent.is_integer():
        return signed
    where, e = _WHERE[lib], exponent_text
    size = f"{lib}.exp2({e} * {lib}.log2({lib}.abs({base})))"
    odd = f"{where}({base} < 0.0, -{size}, {size})"
    if isinstance(exponent, float):  # a large integer
        return odd if exponent % 2 else size
    # a runtime exponent: its parity and integrality are known only in the kernel
    parity = f"{where}({lib}.floor({e} * 0.5) * 2.0 == {e}, {size}, {odd})"
    return f"{where}({lib}.floor({e}) == {e}, {parity}, {signed})"
