"""Context parallel for a hybrid (a state branch and a softmax branch in one spec, e.g. swax).

The hybrid op runs its softmax branch first (its reductions per token), then the state branch's walk,
which reads them in its merge. Over shards: the softmax branch through the all-gather of the keys
(effc.distributed.softmax), giving this rank's rows of the reductions; then the state branch through
the linear path (effc.distributed.context_parallel: shard summaries folded into the entering state),
with those rows as extra per-token inputs of the shard. The combination is the spec's merge, in the
state branch's kernels, exactly as in the single-process op."""
from __future__ import annotations

from dataclasses import dataclass

from ..runtime.checks import check_inputs
from .context_parallel import ContextParallelOp
from .softmax import SoftmaxContextParallel


@dataclass(frozen=True)
class HybridCPPlan:
    softmax: object  # SoftmaxCPPlan
    linear: object  # ContextParallelPlan

    @property
    def bytes_per_rank(self) -> int:
        return self.softmax.bytes_per_rank + self.linear.bytes_per_rank

    def __str__(self) -> str:
        return "\n".join(["softmax branch:", str(self.softmax), "state branch:", str(self.linear),
                          f"communicated per rank per call, both branches: {self.bytes_per_rank} bytes"])


class HybridContextParallel:
    """`op` (a HybridOp) over the sequence shards of `group`; call it as the op."""

    def __init__(self, op, group=None, layout: str = "contiguous", schedule: str = "allgather", overlap: bool = True):
        if op.split.prefix_inputs:
            raise NotImplementedError(f"context parallel for {op.name}: its state branch reads prefix values "
                                      f"({', '.join(op.split.prefix_inputs)}) computed over the whole sequence; "
                                      "not supported yet")
        self.op, self.group = op, group
        self.spec = op.spec
        self.softmax = SoftmaxContextParallel(op.softmax, group, layout)
        self.linear = ContextParallelOp(op.linear, group, layout, schedule, overlap)  # ring: the state branch only
        self.layout = layout

    def __repr__(self) -> str:
        return f"<effc context parallel {self.op.name}>"

    def _extras(self, tensors, cu_seqlens, kw):
        """This shard's rows of the softmax branch's reductions, in the inputs' dtype."""
        soft = {k: v for k, v in kw.items() if k not in ("segments", "save_states", "defer_merge")}
        r, _ = self.softmax(*tensors, cu_seqlens=cu_seqlens, **soft)
        return [x.to(tensors[0].dtype) for x in ((r,) if not isinstance(r, tuple) else r)]

    def plan(self, *tensors):
        """Both branches' communication for a call with these (local shard) inputs; `print` it."""
        dims = check_inputs(self.spec, tuple(tensors), for_kernels=False)[3]
        x0 = tensors[0]  # the reductions' shapes only: planning runs no collective
        extra = [x0.new_zeros(x0.shape[:3] + tuple(dims[n] for n in o.feature_dims)) for o in self.op.softmax.spec.outputs]
        return HybridCPPlan(self.softmax.plan(*tensors), self.linear.plan(*tensors, *extra))

    def __call__(self, *tensors, initial_state=None, output_final_state: bool = False, cu_seqlens=None, **kw):
        """(o, final_state) as the linear path returns them (docs/context-parallel.md): `initial_state` read
        on rank 0 (per document on every rank with cu_seqlens), the final state on the last rank."""
        if cu_seqlens is not None and self.layout != "contiguous":  # before any collective: every rank refuses
            raise NotImplementedError(f"context parallel for {self.op.name}: cu_seqlens with layout={self.layout!r}; "
                                      "packed documents use the contiguous layout (its state branch's varlen path)")
        extra = self._extras(tensors, cu_seqlens, kw)
        state_kw = {k: v for k, v in kw.items() if k != "block"}  # `block`: the softmax branch's key block
        return self.linear(*tensors, *extra, initial_state=initial_state, output_final_state=output_final_state,
                           cu_seqlens=cu_seqlens, **state_kw)
