"""One spec's gradients on the GPU against the float64 oracle, beside a PyTorch reference with 16-bit matmul
operands (the bf16 judge's yardstick), for one tile config or call knob at a time: which knob, dtype or
initial state makes a gradient drift. Prints a line per gradient: effc's relative error and the reference's.

usage: python scripts/grad_probe.py SPEC BxTxH [dtype=bf16|fp16|fp32] [state=randn|abs|none] [knob=value ...]
       (knobs as fault_probe.py takes them, bwd_warps=N too)
       (D=128; state=abs draws |randn| initial states, for counts and normalisers that are never negative)
"""
from __future__ import annotations

import sys

import torch

import effc
from effc.runtime.verify import random_inputs, random_state, rel_err
from fault_probe import probe_knobs  # this folder: scripts/

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _tuple(s) -> tuple:
    return s if isinstance(s, tuple) else (s,)


def main() -> None:
    name, shape, *args = sys.argv[1:]
    kw, D = probe_knobs(args)
    dtype, state = DTYPES[kw.pop("dtype", "bf16")], kw.pop("state", "randn")
    B, T, H = map(int, shape.split("x"))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    op = effc.load(name)
    dims = {d: D for d in op.spec.dims}
    xs = [x.requires_grad_() for x in random_inputs(op.spec, B, T, H, dims, dtype, dev, seed=7)]
    s0 = () if state == "none" or not op.spec.states else _tuple(random_state(op.spec, B, H, dims, dev))
    s0 = tuple((x.abs() if state == "abs" else x).requires_grad_() for x in s0)
    leaves = xs + list(s0)
    st = {"initial_state": s0, "output_final_state": True} if s0 else {}

    def grads(fn):
        out = fn()
        o, finals = (out[0], _tuple(out[1])) if s0 else (out[0] if isinstance(out, tuple) else out, ())
        gen = torch.Generator(device="cpu").manual_seed(11)  # the same cotangents for every call
        d_o, *d_s = (torch.randn(x.shape, generator=gen).to(dev, x.dtype) for x in (o, *finals))
        torch.autograd.backward([o, *finals], [d_o, *d_s])
        g = [x.grad.clone() for x in leaves]
        for x in leaves:
            x.grad = None
        return g

    got = grads(lambda: op(*xs, **st, **kw))
    ref = grads(lambda: op.reference(*xs, **st))
    low = grads(lambda: op.reference(*xs, **st, dtype=torch.float32, matmul_dtype=dtype))
    print(f"{name} {shape} {str(dtype)[6:]} state={state} {kw}: {str(op.last_config).splitlines()[0]}")
    names = [d.name for d in op.spec.inputs] + [f"initial {s.name}" for s in op.spec.states]
    for n, a, b, c in zip(names, got, ref, low):
        print(f"  d{n:<12} effc {rel_err(a.float(), b):.3e}   reference {rel_err(c, b):.3e}   "
              f"|grad| {b.double().norm().item():.3e}", flush=True)


if __name__ == "__main__":
    main()
