"""Random inputs that respect each input's annotation, and the tolerance policy.

Policy (one place, used by `effc check`, the tests and the GPU suite):
- fp32 kernels: max |kernel - oracle| <= 1e-4 * max(1, max |oracle|), the oracle in float64.
- bf16/fp16 kernels: normwise error ||kernel - oracle|| / ||oracle|| no worse than 2x that of
  a PyTorch chunked reference run at the same precision (the oracle with its matmul operands
  rounded to the input dtype), plus 1e-6 slack for exact references.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ir.nodes import Spec

FP32_TOL = 1e-4
LOW_PRECISION_FACTOR = 2.0


def random_inputs(spec: Spec, B: int, T: int, H: int, dims: dict[str, int], dtype=torch.float32,
                  device="cpu", seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for d in spec.inputs:
        shape = (B, T, H) + tuple(dims[n] for n in d.feature_dims)
        x = torch.randn(shape, generator=gen)
        if "logdecay" in d.annotations:
            x = F.logsigmoid(x + 2.0)  # decays mostly in (0.5, 1): long memory, like trained gates
        elif "unit" in d.annotations:
            x = torch.sigmoid(x)
        elif "positive" in d.annotations:
            x = F.softplus(x)
        elif "unitnorm" in d.annotations:
            x = F.normalize(x, dim=-1)
        out.append(x.to(device=device, dtype=dtype))
    return out


def random_state(spec: Spec, B: int, H: int, dims: dict[str, int], device="cpu", seed: int = 1):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    states = tuple(torch.randn((B, H) + tuple(dims[n] for n in s.dims), generator=gen).to(device)
                   for s in spec.states)
    return states[0] if len(states) == 1 else states


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@dataclass
class Verdict:
    ok: bool
    error: float
    bound: float
    metric: str

    def __str__(self) -> str:
        return f"{self.metric} {self.error:.3e} (bound {self.bound:.3e}) {'ok' if self.ok else 'FAIL'}"


def judge_fp32(out: torch.Tensor, oracle: torch.Tensor) -> Verdict:
    bound = FP32_TOL * max(1.0, oracle.abs().max().item())
    err = max_err(out, oracle)
    return Verdict(err <= bound, err, bound, "max abs error")


def judge_low_precision(out: torch.Tensor, oracle: torch.Tensor, reference: torch.Tensor) -> Verdict:
    bound = LOW_PRECISION_FACTOR * rel_err(reference, oracle) + 1e-6
    err = rel_err(out, oracle)
    return Verdict(err <= bound, err, bound, "relative error")
