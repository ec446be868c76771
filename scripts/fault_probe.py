"""Which generated kernel faults: one spec's forward and backward in bf16 with a synchronize after every
launch, so an illegal memory access is reported at the launch that caused it (name, grid, tile config)
instead of at some later call. Run each probe in a fresh process: a fault loses the CUDA context.

usage: python scripts/fault_probe.py SPEC BxTxH [knob=value ...]     (D=128; e.g. partition=cut segments=1)
       bwd_warps=N: the gradient kernels' warps, past policy.triton_faults.backward_warps; dim=N: D;
       refused=run: run a backward that policy.triton_faults.backward_fault refuses on this GPU;
       experiment=NAME: one of scripts/backward_experiments.py's (whole_scan: the adjoint scan unsplit);
       serial_stages=N: the serial kernels' pipeline stages (runtime.launch.SERIAL_STAGES, 2), where a fault may be
       Triton's pipeliner's
"""
from __future__ import annotations

import sys

import torch

import effc
from effc.runtime import launch
from effc.runtime.launch import Launcher
from effc.runtime.verify import random_inputs, random_state

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU: under TRITON_INTERPRET=1, a dry run


def _synchronizing(launch):
    def run(self, kp, grid, values, options):
        launch(self, kp, grid, values, options)
        try:
            if DEVICE == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - reported with the kernel's name, then the process ends
            print(f"FAULT in kernel {kp.name}, grid {grid}, options {options}: {str(e).splitlines()[0]}", flush=True)
            raise SystemExit(1) from None
    return run


def probe_knobs(args: list[str]) -> tuple[dict, int]:
    """The call knobs of `knob=value` words, and every feature dim's size (`dim`, default 128); `bwd_warps` is
    taken out and overrides the gradient warps."""
    kw = {k: int(v) if v.lstrip("-").isdigit() else v for k, v in (a.split("=", 1) for a in args)}
    if "bwd_warps" in kw:
        warps = kw.pop("bwd_warps")
        launch.backward_warps = lambda num_warps, kernels, device: warps
    if kw.pop("refused", None) == "run":
        launch.backward_fault = lambda *a: None
    if "serial_stages" in kw:
        launch.SERIAL_STAGES = kw.pop("serial_stages")
    if "experiment" in kw:
        from backward_experiments import apply  # this folder: scripts/
        apply(kw.pop("experiment"))
    return kw, kw.pop("dim", 128)


def main() -> None:
    name, shape, *knobs = sys.argv[1:]
    B, T, H = map(int, shape.split("x"))
    kw, D = probe_knobs(knobs)
    Launcher._launch = _synchronizing(Launcher._launch)
    op = effc.load(name)
    dims = {d: D for d in op.spec.dims}
    xs = [x.requires_grad_() for x in random_inputs(op.spec, B, T, H, dims, torch.bfloat16, DEVICE, seed=7)]
    s0 = random_state(op.spec, B, H, dims, DEVICE) if op.spec.states else ()
    s0 = tuple(x.requires_grad_() for x in (s0 if isinstance(s0, tuple) else (s0,)))
    state = {"initial_state": s0 if len(s0) != 1 else s0[0], "output_final_state": True} if s0 else {}
    out = op(*xs, **state, **kw)
    o, finals = (out[0], out[1]) if s0 else (out[0] if isinstance(out, tuple) else out, ())
    print(f"{name} {shape} {kw}: forward ok, {op.last_config}".splitlines()[0], flush=True)
    finals = finals if isinstance(finals, tuple) else (finals,)
    torch.autograd.backward([o, *finals], [torch.randn_like(o), *(torch.randn_like(s) for s in finals)])
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    print(f"{name} {shape} {kw}: backward ok", flush=True)


if __name__ == "__main__":
    main()
