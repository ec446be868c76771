"""Where a forward call's time goes on the GPU: the do_bench median of the op, the host time per call
(launch-bound when it exceeds the kernels' time), and the same op with token-contracting matmuls masking
only their right operand (the printer before it masked both), to see what the extra mask costs.

usage: python scripts/host_overhead.py [SPEC] [BxT ...]
"""
from __future__ import annotations

import sys
import time

import torch
from triton.testing import do_bench

import effc
from effc.codegen.triton import printer
from effc.runtime.verify import random_inputs


def measure(spec: str, shapes, H: int = 16, D: int = 128, label: str = ""):
    op = effc.load(spec)
    for shape in shapes:
        B, T = map(int, shape.split("x"))
        xs = random_inputs(op.spec, B, T, H, {d: D for d in op.spec.dims}, torch.bfloat16, "cuda")
        op(*xs)
        torch.cuda.synchronize()
        ms = do_bench(lambda: op(*xs), warmup=25, rep=100, return_mode="median")
        t0 = time.perf_counter()
        for _ in range(50):
            op(*xs)
        host = (time.perf_counter() - t0) / 50 * 1e3
        torch.cuda.synchronize()
        print(f"HOST {label} {spec} {shape}: do_bench {ms:.3f} ms, host per call {host:.3f} ms, "
              f"config {op.last_config.chunk}/{op.last_config.block}/P{op.last_config.segments}", flush=True)


def main(spec: str, shapes):
    measure(spec, shapes, label="both-masked")
    # the same spec with the left operand of token-contracting matmuls left unmasked (a scratch variant:
    # the generated source differs, so it is a module of its own in the cache)
    src = open(printer.__file__).read()
    both = 'a = [f"tl.where(tv[None, :], {a[0]}, 0.0)", f"tl.where(tv[:, None], {a[1]}, 0.0)"]'
    if both in src:
        ns: dict = {"__name__": "effc.codegen.triton.printer_variant", "__package__": "effc.codegen.triton"}
        exec(compile(src.replace(both, 'a = [a[0], f"tl.where(tv[:, None], {a[1]}, 0.0)"]'), printer.__file__, "exec"),
             ns)
        import effc.codegen.triton.emit as emit
        emit.TritonPrinter = ns["TritonPrinter"]
        measure(spec, shapes, label="right-masked")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "retention", sys.argv[2:] or ["8x2048", "2x8192"])
