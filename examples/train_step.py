"""Compile the specs in this folder and take a training step through each, checking output and gradients
against the oracle effc derives from the same spec.

    python examples/train_step.py            # GPU: bf16 at B=2, T=1000 (not a multiple of the chunk)
    python examples/train_step.py --small    # any machine: fp32 under Triton's interpreter, tiny shapes

What a user writes is the .attn file; everything below is the PyTorch side any model would have.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).parent
SMALL = "--small" in sys.argv or not __import__("torch").cuda.is_available()
if SMALL:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import torch  # noqa: E402

import effc  # noqa: E402
from effc.runtime.verify import judge_fp32, judge_low_precision, random_inputs  # noqa: E402


def step(path: Path) -> bool:
    op = effc.load(str(path))
    device, dtype = ("cpu", torch.float32) if SMALL else ("cuda", torch.bfloat16)
    B, T, H, D = (2, 45, 2, 16) if SMALL else (2, 1000, 8, 64)
    xs = [x.requires_grad_() for x in random_inputs(op.spec, B, T, H, {d: D for d in op.spec.dims}, dtype, device)]
    chunk = {"chunk": 16} if SMALL else {}
    o, _ = op(*xs, **chunk)
    grad = torch.randn_like(o)
    grads = torch.autograd.grad(o, xs, grad)

    # the oracle: the same spec evaluated by plain PyTorch (float64 inside), differentiated by autograd
    leaves = [x.detach().requires_grad_() for x in xs]

    def oracle(**precision):
        ref = op.reference(*leaves, **precision)[0]
        return [ref.detach()] + list(torch.autograd.grad(ref, leaves, grad.to(ref.dtype)))

    ref = oracle()
    # bf16 is judged against the error of a PyTorch computation of the same values with bf16 matmuls
    low = None if SMALL else oracle(dtype=torch.float32, matmul_dtype=torch.bfloat16)
    ok = True
    names = ["o"] + [f"d{d.name}" for d in op.spec.inputs]
    for i, (name, got) in enumerate(zip(names, [o.detach(), *grads])):
        verdict = judge_fp32(got, ref[i]) if SMALL else judge_low_precision(got.float(), ref[i], low[i])
        ok &= verdict.ok
        print(f"{op.name:22s} {name:6s} {verdict}")
    return ok


if __name__ == "__main__":
    results = [step(p) for p in sorted(HERE.glob("*.attn"))]
    sys.exit(0 if all(results) else 1)
