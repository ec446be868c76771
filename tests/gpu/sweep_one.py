"""One library spec at every head dim and length of the GPU sweep (tests/gpu/test_real_inputs.py), run in its
own process so that a fault (a lost CUDA context) costs only this spec's row. Prints one JSON line per case:
forward and every gradient in bf16 against the float64 oracle, judged by effc's low-precision policy."""
import json
import sys
import traceback

import torch

import effc
from effc.runtime.verify import judge_low_precision, random_inputs, random_state

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: under TRITON_INTERPRET=1, to try the script


def _tuple(s):
    return () if s is None else s if isinstance(s, tuple) else (s,)


def case(op, B, T, H, D):
    dims = {d: D for d in op.spec.dims}
    xs = [x.requires_grad_() for x in random_inputs(op.spec, B, T, H, dims, torch.bfloat16, DEVICE, seed=T + D)]
    s0 = tuple(s.requires_grad_() for s in _tuple(random_state(op.spec, B, H, dims, DEVICE)))
    kw = dict(initial_state=s0 or None, output_final_state=bool(s0))
    o, _ = op(*xs, **kw)
    g = torch.randn(o.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    leaves = xs + list(s0)
    got = torch.autograd.grad(o, leaves, g.to(o.dtype))
    verdicts = {}
    for name, dtype, mm in (("exact", torch.float64, None), ("low", torch.float32, torch.bfloat16)):
        ins = [x.detach().float().requires_grad_() for x in xs]
        st = tuple(s.detach().float().requires_grad_() for s in s0)
        r, _ = op.reference(*ins, initial_state=st or None, dtype=dtype, matmul_dtype=mm)
        verdicts[name] = (r,) + torch.autograd.grad(r, ins + list(st), g.to(r.dtype))
    names = ["o"] + [f"d{d.name}" for d in op.spec.inputs] + [f"d{s.name}0" for s in op.spec.states]
    out = {}
    for n, a, b, c in zip(names, (o,) + got, verdicts["exact"], verdicts["low"]):
        v = judge_low_precision(a.float(), b, c)
        out[n] = dict(ok=bool(v.ok and torch.isfinite(a).all()), error=v.error, bound=v.bound)
    return out


def main(name, dims, lengths):
    op = effc.load(name)
    for D in dims:
        for T in lengths:
            row = dict(spec=name, D=D, T=T)
            try:
                row["checks"] = case(op, 2, T, 4, D)
                row["ok"] = all(c["ok"] for c in row["checks"].values())
            except Exception as e:  # noqa: BLE001 - the row reports it; a fault ends the process anyway
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-2000:])
            print("SWEEP " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(x) for x in sys.argv[2].split(",")], [int(x) for x in sys.argv[3].split(",")])
