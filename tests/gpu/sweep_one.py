"""One library spec at every head dim and length of the GPU sweep (tests/gpu/test_real_inputs.py), run in its
own process so that a fault (a lost CUDA context) costs only this spec's row. Prints one JSON line per case:
`effc check`'s comparison (effc.runtime.verify.check_op): every output, final state and gradient in bf16
against the float64 oracle, judged by effc's low-precision policy."""
import json
import sys
import traceback

import torch

import effc
from effc.errors import BackwardRefused
from effc.runtime.verify import check_op

# cpu: fp32 under TRITON_INTERPRET=1, to try the script (the interpreter's bf16 dots are wrong)
DEVICE, DTYPE = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


def case(op, B, T, H, D):
    verdicts = check_op(op, B, T, H, {d: D for d in op.spec.dims}, DTYPE, DEVICE, seed=T + D)
    return {n: dict(ok=bool(v.ok), error=v.error, bound=v.bound) for n, v in verdicts}


def main(name, dims, lengths):
    op = effc.load(name)
    for D in dims:
        for T in lengths:
            row = dict(spec=name, D=D, T=T)
            try:
                row["checks"] = case(op, 2, T, 4, D)
                row["ok"] = all(c["ok"] for c in row["checks"].values())
            except BackwardRefused as e:  # refused on this GPU and Triton (policy.triton_faults): no failure
                row.update(ok=None, refused=str(e)[:2000])
            except Exception as e:  # noqa: BLE001 - the row reports it; a fault ends the process anyway
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-2000:])
            print("SWEEP " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(x) for x in sys.argv[2].split(",")], [int(x) for x in sys.argv[3].split(",")])
