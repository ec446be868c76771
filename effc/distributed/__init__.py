"""Context parallelism: one sequence split across the ranks of a torch.distributed process group
(docs/context-parallel.md)."""
from .affine import StateMap, state_maps
from .context_parallel import ContextParallelOp, ContextParallelPlan
from .hybrid import HybridContextParallel
from .layout import LAYOUTS, causal_pairs, shard, shard_of, unshard
from .softmax import SoftmaxContextParallel
from .wrap import context_parallel

__all__ = ["LAYOUTS", "ContextParallelOp", "ContextParallelPlan", "HybridContextParallel", "SoftmaxContextParallel",
           "StateMap", "causal_pairs", "context_parallel", "shard", "shard_of", "state_maps", "unshard"]
