"""`context_parallel(op)`: the path for the op's family."""
from __future__ import annotations

from .context_parallel import ContextParallelOp, check_schedule
from .hybrid import HybridContextParallel
from .softmax import SoftmaxContextParallel


def context_parallel(op, group=None, layout: str = "contiguous", schedule: str = "allgather", overlap: bool = True):
    """Wrap an effc op for context parallelism over `group` (None: the default group).

    The wrapper takes the op's arguments with every (B, T, H, D) input replaced by this rank's contiguous
    shard along T (ranks in order; shards may have different lengths, any length, even 0), and returns
    what the op returns for the shard's tokens:
    - linear family: (o_shard, final_state); `initial_state` is read on rank 0, the final state comes
      back on the last rank. Raises NotImplementedError for updates that are not affine in the state.
    - softmax family: (o_shard, None); every key-side input is all-gathered, the queries keep their
      absolute positions, so masks and modifiers are the single-process op's.
    - hybrid (e.g. swax): the softmax branch as above, the state branch as the linear family.
    With `cu_seqlens` (the global boundaries of one packed (1, total_T) stream), documents may cross
    ranks (docs/context-parallel.md).
    `layout="zigzag"`: each rank's shard is pieces r and 2N-1-r of the sequence cut into 2N
    (`shard(x, layout="zigzag")`), which balances causal softmax work over the ranks; the last piece, and
    so the final state, is on rank 0 then. Packed streams (cu_seqlens) with zigzag: softmax family only.
    `schedule="ring"` (state paths: the linear family, a hybrid's state branch): rank r receives the states
    entering its shard from rank r-1 and sends its final states to r+1, instead of the all-gather of shard
    summaries; contiguous dense shards, forward states only.
    `overlap` (state paths, dense all-gather calls, where the output is o(0) + u @ S_in): the last piece runs
    from a zero state while the all-gather is in flight and no piece walks twice; `cp.plan(...)` says whether
    it applies and why not; False keeps the serial schedule (summary, gather, fold, local run)."""
    family = op.comp.ir.family
    check_schedule(schedule)
    if family == "branched":
        raise NotImplementedError(f"context parallel for {op.name}: a spec with branches (passes.branches) is not "
                                  "sharded yet; each branch's spec alone is (effc.load of it, or its op.parts)")
    if family == "softmax":
        if schedule != "allgather":
            raise NotImplementedError(f"context parallel for {op.name}: schedule={schedule!r} for the softmax family "
                                      "(ring attention) is not implemented; it all-gathers the keys")
        return SoftmaxContextParallel(op, group, layout)
    if family == "hybrid":
        return HybridContextParallel(op, group, layout, schedule, overlap)
    return ContextParallelOp(op, group, layout, schedule, overlap)
