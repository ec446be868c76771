"""runtime.launch.launch_fitting: a kernel whose compiled form needs more shared memory than the GPU has
launches again with fewer pipeliner stages (mla's backward at 128-wide parts in fp32 needed 320 KiB on
the H200's 227 KiB); one that does not fit at one stage raises effc's ResourceError naming it."""
import pytest
from triton.runtime.errors import OutOfResources

from effc.errors import ResourceError
from effc.runtime.launch import launch_fitting


class FakeKernel:
    """Needs `per_stage` bytes of shared memory a stage; the GPU has `limit`."""
    __name__ = "fake_bwd_dq_kernel"

    def __init__(self, per_stage: int, limit: int = 232448, name: str = "shared memory"):
        self.per_stage, self.limit, self.name, self.launched, self.tried = per_stage, limit, name, [], []

    def __getitem__(self, grid):
        def run(**kw):
            self.tried.append(kw["num_stages"])
            need = self.per_stage * kw["num_stages"]
            if need > self.limit:
                raise OutOfResources(need, self.limit, self.name)
            self.launched.append((grid, kw))
        return run


def test_fewer_stages_until_it_fits():
    fn = FakeKernel(per_stage=110_000)
    launch_fitting(fn, (4, 2), {"x": 1}, {"num_warps": 8, "num_stages": 3})
    assert fn.launched == [((4, 2), {"x": 1, "num_warps": 8, "num_stages": 2})]


def test_the_next_launch_starts_at_the_stages_that_fitted():
    fn = FakeKernel(per_stage=80_000)
    for x in (1, 2):  # runtime ints differ per call; the compiled form, hence its fit, does not
        launch_fitting(fn, (4,), {"x": x}, {"num_warps": 8, "num_stages": 4})
    assert fn.tried == [4, 3, 2, 2]  # the second launch fits at once
    assert [kw["num_stages"] for _, kw in fn.launched] == [2, 2]
    other = FakeKernel(per_stage=80_000)  # another kernel fits on its own
    launch_fitting(other, (4,), {"x": 1}, {"num_warps": 8, "num_stages": 4})
    assert other.tried == [4, 3, 2]


def test_fits_at_first_try_launches_once():
    fn = FakeKernel(per_stage=1000)
    launch_fitting(fn, (1,), {}, {"num_warps": 4, "num_stages": 3})
    assert [kw["num_stages"] for _, kw in fn.launched] == [3]


def test_too_big_at_one_stage_names_the_kernel():
    fn = FakeKernel(per_stage=300_000)
    with pytest.raises(ResourceError, match=r"fake_bwd_dq_kernel: shared memory 300000 > 232448.*num_stages=1"):
        launch_fitting(fn, (1,), {}, {"num_warps": 4, "num_stages": 2})


def test_other_resources_are_not_retried():
    fn = FakeKernel(per_stage=10, limit=5, name="registers")
    with pytest.raises(ResourceError, match="registers"):
        launch_fitting(fn, (1,), {}, {"num_warps": 4, "num_stages": 3})
    assert fn.launched == []
