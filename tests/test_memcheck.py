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


@triton.jit
def _all_store_one(x_ptr, same: tl.constexpr):
    pid = tl.program_id(0)
    tl.store(x_ptr, 1.0 if same else pid.to(tl.float32))


@triton.jit
def _read_the_next(x_ptr, n):
    pid = tl.program_id(0)
    tl.store(x_ptr + pid, tl.load(x_ptr + (pid + 1) % n) + 1)


@triton.jit
def _own_element(x_ptr):
    pid = tl.program_id(0)
    tl.store(x_ptr + pid, tl.load(x_ptr + pid) + 1)


def test_races_between_the_programs_of_a_launch_are_flagged():
    """The interpreter runs programs one after another, so a race gives the answer of that order; a GPU's
    order is any: an element one program stores and another loads or stores is flagged, unless every
    program stores the same value there."""
    x = torch.zeros(4)
    with checked_memory(races=True):
        with pytest.raises(Exception, match=r"_all_store_one: element .* stored by program\(s\) \[0, 1, 2, 3\]"):
            _all_store_one[(4,)](x, same=False)
        with pytest.raises(Exception, match=r"_read_the_next: .* stored by program\(s\) \[0\] and touched by \[0, 3\]"):
            _read_the_next[(4,)](x, 4)
        _all_store_one[(4,)](x, same=True)
        _own_element[(4,)](x)
    _read_the_next[(4,)](x, 4)  # without races=True only bounds are checked
