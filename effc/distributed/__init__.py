"""Context parallelism: one sequence split across the ranks of a torch.distributed process group
(docs/context-parallel.md)."""
from .affine import StateMap, state_maps
from .context_parallel import ContextParallelOp, ContextParallelPlan, shard
from .hybrid import HybridContextParallel
from .softmax import SoftmaxContextParallel
from .wrap import context_parallel

__all__ = ["ContextParallelOp", "ContextParallelPlan", "HybridContextParallel", "SoftmaxContextParallel",
           "StateMap", "context_parallel", "shard", "state_maps"]
