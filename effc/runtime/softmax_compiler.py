"""The pipeline for specs with a score stage (the softmax family), stage for stage like Compilation:

    text -> AST -> IR (passes.lower_softmax) -> typed (passes.softmax.infer_softmax_shapes)
         -> legality = the schedule (passes.softmax.analyze_softmax: sides, online softmax, block sparsity)
         -> backward (passes.softmax_bwd) -> kernels (codegen.triton.softmax_emit)
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from ..ir.nodes import Spec
from ..passes.hybrid import HybridSplit, split_hybrid
from ..passes.softmax import SoftmaxSchedule, analyze_softmax, infer_softmax_shapes
from ..passes.softmax_bwd import SoftmaxBackward, differentiate_softmax
from .compiler import BACKENDS, Compilation


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
        from ..ir.printer import print_op
        lines += [f"    {print_op(op)}" for op in self.spec.prefix.ops]
        lines.append(str(self.backward))
        return "\n".join(lines)


_KERNELS = (
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


class SoftmaxCompilation(Compilation):
    """All stages of compiling one softmax-family spec; each computed on first use. A spec that also
    declares a state is a hybrid: `split` gives its two branches, each compiled on its own."""

    @cached_property
    def typed(self) -> Spec:
        return infer_softmax_shapes(self.ir)

    @cached_property
    def split(self) -> HybridSplit | None:
        if not self.typed.states:
            return None
        from ..passes.softmax import softmax_value_types
        return split_hybrid(self.typed, softmax_value_types(self.typed))

    @cached_property
    def softmax_part(self) -> "SoftmaxCompilation":
        return _FromSpecSoftmax.of(self.split.softmax) if self.split else self

    @cached_property
    def linear_part(self) -> Compilation | None:
        return _FromSpecLinear.of(self.split.linear) if self.split else None

    @cached_property
    def legality(self):
        if self.split:
            return HybridSchedule(self.split, self.softmax_part.legality, self.linear_part.legality)
        return analyze_softmax(self.typed)

    @cached_property
    def backward(self) -> SoftmaxBackward:
        if self.split:
            return self.softmax_part.backward
        return differentiate_softmax(self.legality)

    @cached_property
    def fused(self):
        if self.split:
            return HybridPlan(self.softmax_part.fused, self.linear_part.fused)
        return SoftmaxPlan(self.typed, _KERNELS, self.legality, self.backward)

    @cached_property
    def plan(self):
        if self.split:
            return HybridPlan(self.softmax_part.plan, self.linear_part.plan)
        return self.fused

    @property
    def schedule_name(self) -> str:
        if self.typed.states:
            return "hybrid: online softmax (FlashAttention-2) for the score branch + chunked-state scan"
        return "online softmax (FlashAttention-2 walk over key blocks)"

    def _source(self, backend: str) -> str:
        if backend != "triton":
            raise NotImplementedError(f"backend '{backend}' is not implemented for the softmax family yet; "
                                      f"available: {', '.join(BACKENDS)}")
        if self.split:
            return self.softmax_part._source(backend) + "\n\n" + self.linear_part._source(backend)
        from ..codegen.triton.softmax_emit import emit_softmax_module
        return emit_softmax_module(self.legality, self.backward)


class _FromSpec:
    """Mixed into a compilation that starts from IR (a hybrid's branch) rather than text."""

    ir = property(lambda self: self._spec)

    @classmethod
    def of(cls, spec: Spec):
        c = cls(None, spec.name)
        c._spec = spec
        return c


class _FromSpecSoftmax(_FromSpec, SoftmaxCompilation):
    pass


class _FromSpecLinear(_FromSpec, Compilation):
    pass
