"""The kernel plan of the softmax family (its four kernels, their roles) and of a hybrid (a plan per branch)."""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.nodes import Spec
from ..ir.printer import print_op
from .hybrid import HybridSplit
from .softmax import SoftmaxSchedule
from .softmax_bwd import SoftmaxBackward


@dataclass(frozen=True)
class SoftmaxKernel:
    name: str
    stages: tuple[str, ...]
    what: str
    ops: tuple = ()  # the linear family's per-chunk op list; FLOPs of this family: SoftmaxOp.flops


@dataclass(frozen=True)
class SoftmaxPlan:
    spec: Spec
    kernels: tuple[SoftmaxKernel, ...]
    schedule: SoftmaxSchedule
    backward: SoftmaxBackward

    def kernel(self, name: str) -> SoftmaxKernel:
        name = {"walk": "fwd"}.get(name, name)  # the forward kernel under the linear family's name
        return next(k for k in self.kernels if k.name == name)

    def __str__(self) -> str:
        lines = [f"plan {self.spec.name}: online softmax, {len(self.kernels)} kernels"]
        lines += [f"  kernel {k.name} [{' + '.join(k.stages)}]: {k.what}" for k in self.kernels]
        lines += ["  prefix (PyTorch pre-pass over whole sequences, differentiated by autograd):"
                  if self.spec.prefix.ops else "  prefix: none"]
        lines += [f"    {print_op(op)}" for op in self.spec.prefix.ops]
        lines.append(str(self.backward))
        return "\n".join(lines)


SOFTMAX_KERNELS = (
    SoftmaxKernel("fwd", ("score", "merge"), "grid (query blocks, B*H): walk the visible key blocks with a running "
                  "(max, sum, acc); the epilogue (normalise, merge ops) fused; saves the log-sum-exp"),
    SoftmaxKernel("bwd_pre", ("merge",), "grid (query blocks, B*H): the epilogue's VJP: dR, D = rowsum(dR * R) - dlse"),
    SoftmaxKernel("bwd_dq", ("score", "merge"), "grid (query blocks, B*H): walk the visible key blocks, recompute P "
                  "from the log-sum-exp, accumulate the query-side adjoints"),
    SoftmaxKernel("bwd_dkv", ("score", "merge"), "grid (key blocks, B*H): walk the query blocks that see the key "
                  "block, accumulate the key-side adjoints and P^T dR"),
)


@dataclass(frozen=True)
class HybridSchedule:
    """A state and a softmax branch (passes.hybrid): each with its own schedule."""

    split: HybridSplit
    softmax: SoftmaxSchedule
    linear: object  # passes.legality.Legality

    def __str__(self) -> str:
        return "\n".join([str(self.split), "softmax branch:", str(self.softmax), "state branch:", str(self.linear)])


@dataclass(frozen=True)
class HybridPlan:
    softmax: SoftmaxPlan
    linear: object  # passes.plan.Plan

    @property
    def kernels(self):
        return tuple(self.softmax.kernels) + tuple(self.linear.kernels)

    def kernel(self, name: str):
        return self.softmax.kernel(name)

    def __str__(self) -> str:
        return "\n".join(["softmax branch:", str(self.softmax), "state branch:", str(self.linear)])
