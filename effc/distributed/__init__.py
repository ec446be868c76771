"""Context parallelism: one sequence split across the ranks of a torch.distributed process group
(docs/context-parallel.md)."""
from .affine import StateMap, state_maps
from .context_parallel import ContextParallelOp, ContextParallelPlan, context_parallel, shard

__all__ = ["ContextParallelOp", "ContextParallelPlan", "StateMap", "context_parallel", "shard", "state_maps"]
