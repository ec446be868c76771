"""Random inputs that respect each input's annotation, the tolerance policy, and `effc check`'s comparison.

Policy (one place, used by `effc check`, the tests and the GPU suite):
- fp32 kernels: max |kernel - oracle| <= 1e-4 * max(1, max |oracle|), the oracle in float64.
- bf16/fp16 kernels: normwise error ||kernel - oracle|| / ||oracle|| no worse than 2x that of
  a PyTorch chunked reference run at the same precision (the oracle with its matmul operands
  rounded to the input dtype), plus FP32_SUM_FLOOR for references exact up to fp32 summation order.
"""
from __future__ import annotations

import math

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ir.nodes import Spec

FP32_TOL = 1e-4
LOW_PRECISION_FACTOR = 2.0


def keyseq_length(spec: Spec, T: int, dims: dict[str, int]) -> int:
    """The length of a key sequence of its own for T queries: `dims[S]` when given, else enough keys to
    cover the T positions (ceil(T / a) for positions a * s + c), or T."""
    ks = spec.keyseq
    if ks.dim in dims:
        return dims[ks.dim]
    a = ks.pos[0] if ks.pos is not None else None
    if a is not None and getattr(a, "is_number", isinstance(a, (int, float))) and float(a) >= 1:
        return max(1, math.ceil(T / float(a)))
    return T


def input_shape(spec: Spec, d, B: int, T: int, H: int, dims: dict[str, int],
                kv_heads: int | None = None) -> tuple[int, ...]:
    """Input `d`'s shape in a call of B sequences of T tokens: (B, T or its key sequence's length, H, ...);
    `kv_heads`: the heads of a `key` input (grouped-query attention), H without it."""
    heads = kv_heads if kv_heads and "key" in d.annotations else H
    return (B, T if d.seq == "T" else keyseq_length(spec, T, dims), heads) + tuple(dims[n] for n in d.feature_dims)


def random_inputs(spec: Spec, B: int, T: int, H: int, dims: dict[str, int], dtype=torch.float32,
                  device="cpu", seed: int = 0, strong_gates: bool = False,
                  kv_heads: int | None = None) -> list[torch.Tensor]:
    """Inputs as their annotations promise. `strong_gates`: log decays of about -20 a token (a chunk's decay
    far past fp32's range), the case factored decays overflow on (passes.decay_dot). `kv_heads`: the heads
    of the `key` inputs (None: H)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for d in spec.inputs:
        x = torch.randn(input_shape(spec, d, B, T, H, dims, kv_heads), generator=gen)
        if "logdecay" in d.annotations:
            # decays mostly in (0.5, 1): long memory, like trained gates
            x = F.logsigmoid(x - 2.0) * 10.0 if strong_gates else F.logsigmoid(x + 2.0)
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
    states = tuple(_random_state(s, (B, H) + tuple(dims[n] for n in s.dims), gen).to(device) for s in spec.states)
    return states[0] if len(states) == 1 else states


def _random_state(decl, shape, gen) -> torch.Tensor:
    x = torch.randn(shape, generator=gen)
    if "gram" in decl.annotations:  # a Gram matrix: x x^T over as many outer products as the matrix is wide
        return x @ x.transpose(-1, -2) / shape[-1]
    if "positive" in decl.annotations:  # a count or a normaliser: a negative one is no state the scan reaches
        return F.softplus(x)
    return x


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


# a gradient that no 16-bit rounding reaches (lion's initial-state gradient sums fp32 products only) still
# differs from the reference by the order of an fp32 sum over thousands of tokens: 4.3e-6 at T=2048 on the
# H200, where the reference's own error was 1.0e-6
FP32_SUM_FLOOR = 1e-5


def judge_low_precision(out: torch.Tensor, oracle: torch.Tensor, reference: torch.Tensor) -> Verdict:
    bound = LOW_PRECISION_FACTOR * rel_err(reference, oracle) + FP32_SUM_FLOOR
    err = rel_err(out, oracle)
    return Verdict(err <= bound, err, bound, "relative error")


def check_op(op, B: int, T: int, H: int, dims: dict[str, int], dtype=torch.float32, device="cpu", seed: int = 0,
             **knobs) -> list[tuple[str, Verdict]]:
    """`effc check` for every family: one call of the op (`knobs`: chunk=, segments=, ...) on random inputs
    and a random initial state, with random cotangents, against the oracle in float64 with autograd. Judges
    each output and final state, and the gradient of each input and initial state (an input that reaches no
    output differentiably, e.g. one read only by a mask, has a zero gradient); a spec with a state also
    checks its oracle against the recurrence (the oracle at chunk 1)."""
    spec = op.spec
    leaves = random_inputs(spec, B, T, H, dims, dtype, device, seed)
    if spec.states:
        leaves += list(_tensors(random_state(spec, B, H, dims, device)))

    def run(fn, as_dtype=None, **kw):
        """Outputs, then final states, of fn on the leaves (inputs, then initial states) as_dtype; the leaves."""
        xs = [x.detach().to(as_dtype or x.dtype).requires_grad_() for x in leaves]
        state = {"initial_state": tuple(xs[len(spec.inputs):]), "output_final_state": True} if spec.states else {}
        o, final = fn(*xs[:len(spec.inputs)], **state, **kw)
        return list(_tensors(o)) + (list(_tensors(final)) if spec.states else []), xs

    def with_grads(outs, xs):
        gs = torch.autograd.grad(outs, xs, [c.to(o.dtype) for c, o in zip(cotangents, outs)], allow_unused=True)
        return [o.detach() for o in outs] + [torch.zeros_like(x) if g is None else g for g, x in zip(gs, xs)]

    outs, xs = run(op, **knobs)
    gen = torch.Generator(device="cpu").manual_seed(seed + 2)
    cotangents = [torch.randn(o.shape, generator=gen).to(device) for o in outs]
    got = with_grads(outs, xs)
    want = with_grads(*run(op.reference, torch.float64))
    names = ([f"output {o.name}" for o in spec.outputs] + [f"final state {s.name}" for s in spec.states]
             + [f"grad {d.name}" for d in spec.inputs] + [f"grad initial state {s.name}" for s in spec.states])
    if dtype == torch.float32:
        verdicts = [judge_fp32(a, b) for a, b in zip(got, want)]
    else:  # the bound: a PyTorch reference at the same precision (its matmul operands rounded to dtype)
        low = with_grads(*run(op.reference, torch.float32, dtype=torch.float32, matmul_dtype=dtype))
        verdicts = [judge_low_precision(a, b, c) for a, b, c in zip(got, want, low)]
    verdicts = [(f"kernel vs oracle, {n}", v) for n, v in zip(names, verdicts)]
    if spec.states:
        rec, _ = run(op.recurrent_reference, torch.float64)
        flat = lambda ts: torch.cat([t.detach().flatten() for t in ts])  # noqa: E731
        verdicts.insert(0, ("oracle chunked vs recurrent", judge_fp32(flat(rec), flat(want[:len(rec)]))))
    return verdicts


def _tensors(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)
