"""Kernel plan -> a TileLang module: the `summary` and `walk` kernels of passes/plan.py, with the
Triton backend's semantics (masked padded tokens, segments folded from summaries, initial, final and
per-chunk states, the split dim in blocks, packed sequences, grouped heads).

How ops become TileLang (printer.py, one method per IR op):
- elementwise ops (unary, binary, pow, expand, transpose, copy, causal/strict, last, a matmul with an
  inner dim of 1) are expressions inlined into the T.Parallel loop of whoever consumes them;
- matmul -> T.gemm on operands staged in shared memory in the input dtype (transposes become
  transpose_A/B), accumulating into the state's fragment for `S = S * d + x @ y`; a matmul with an
  outer dim of 1 -> a broadcast product and T.reduce_sum;
- cumsum / revcumsum -> T.cumsum into a buffer of its own; rowsum/colsum/rowmax/colmax -> T.reduce_*.

Not expressible here yet (refused with NotImplementedError naming the op and this backend; see
printer.UNSUPPORTED): unit_lower_inv (DeltaNet's (I + L)^-1), and the backward kernels (the Triton
backward reads the history the TileLang walk stores). The softmax family has plans of its own.
Work-arounds for TileLang 0.1.15: kernels with a scan run without warp specialization (its scan
templates assume the compute threads start at 0); gemms whose tile cannot give every warp 16 rows
and 8 columns (chunk 16) run with fewer threads.
"""
from .emit import FORWARD, emit_module, factory_name, kernel_params  # noqa: F401
