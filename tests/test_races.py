"""No races between the programs of one launch in any library spec's kernels (tests/memcheck.py, races=True):
forward and backward under the interpreter, with a dim in parts for the linear family (K=96 as 64 + 32, V in
two blocks), T not a multiple of the chunk. The interpreter runs a launch's programs in order, so a race
there gives a right answer that a GPU, running them in any order, would not."""
import pytest
import torch
from memcheck import checked_memory

import effc
from effc.runtime.verify import random_inputs

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks Triton's interpreter")


def _train_step(op, D: int, T: int, **knobs):
    dims = {d: D for d in op.spec.dims}
    xs = [x.requires_grad_() for x in random_inputs(op.spec, 1, T, 2, dims, torch.float32, "cpu", seed=3)]
    out = op(*xs, **knobs)
    while isinstance(out, tuple):
        out = out[0]
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    assert all(torch.isfinite(x.grad).all() for x in xs if x.grad is not None)  # a selection's score: no grad


@pytest.mark.slow
@pytest.mark.parametrize("name", effc.library_names("linear"))
def test_linear_kernels_in_parts_have_no_race(name):
    op = effc.load(name)
    with checked_memory(races=True):
        _train_step(op, 96, 63, dim_parts=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", effc.library_names("softmax") + effc.library_names("hybrid"))
def test_softmax_and_hybrid_kernels_have_no_race(name):
    with checked_memory(races=True):
        _train_step(effc.load(name), 64, 63)


@pytest.mark.slow
@pytest.mark.parametrize("partition", ["block", "loop", "cut"])
def test_every_gradient_partition_has_no_race(partition):
    """delta_net_l2's gradient partitions (passes.partition) over five chunks of 16 with K=96 in parts and V in
    two blocks: the cut's per-token sums written by one kernel and read by the next."""
    with checked_memory(races=True):
        _train_step(effc.load("delta_net_l2"), 96, 80, partition=partition, chunk=16)


@pytest.mark.slow
def test_segments_and_their_fold_have_no_race():
    """A segmentable walk in 3 segments (a summary pass, the fold, the segments' walks) and the segmented
    reverse scan, over several V blocks."""
    with checked_memory(races=True):
        _train_step(effc.load("retention"), 32, 80, segments=3, chunk=16, block=16)
