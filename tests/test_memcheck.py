"""tests/memcheck.py, which conftest wraps around every interpreted test: it must flag what a GPU faults on."""
import pytest
import torch
import triton
import triton.language as tl
from memcheck import checked_memory

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks Triton's interpreter")


@triton.jit
def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.store(y_ptr + o, tl.load(x_ptr + o, mask=o < n), mask=o < n)


def test_an_access_past_every_tensor_argument_is_flagged_and_a_masked_one_is_not():
    base = torch.arange(12.0)
    x, y = base[2:10], torch.empty(8)  # a view: the 2 elements after it are the storage's, not x's
    with checked_memory():
        _copy[(1,)](x, y, 8, BLOCK=16)  # masked to the 8 elements
        assert torch.equal(y, x)
        with pytest.raises(Exception, match="_copy: load of 1 element.*nearest tensor below it: x"):
            _copy[(1,)](x, y, 9, BLOCK=16)
