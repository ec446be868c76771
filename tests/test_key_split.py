"""dK/dV's split of long transposed lists (passes.softmax_plan.KEY_SPLIT): a key block that every query takes
(the sink block) lists every query block; its list is walked in segments by extra programs and a second
launch sums them in order. Under the interpreter a segment may be one unit, so these shapes split: checked
here before the numbers, which must match the unsplit walk, the oracle and the naive reference, and repeat
bitwise (no atomics)."""
from __future__ import annotations

import pytest
import torch
from test_select_head_rows import SMALL_SHARED, _inputs, _load, _naive

import effc.runtime.softmax_op as softmax_op
from effc.runtime.verify import judge_fp32


def _grads(op, xs, partition, cu=None):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    o = op(*xs, partition=partition, cu_seqlens=cu)[0]
    return [o.detach()] + list(torch.autograd.grad(o, xs, torch.ones_like(o)))


def _split_lists(op, xs, partition, cu=None) -> tuple[int, list]:
    """How many key blocks' lists the kernels split: the unit counts the launch reads, against the segment
    length the kernel derives from them (the test's precondition, not its check); and that call's output and
    gradients (_grads), so a test need not run the kernels again for its numbers."""
    seen = []
    launch = softmax_op.SoftmaxOp._launch_split

    def record(self, kernel, cfg_k, n_bh, named, meta):
        seen.append((kernel, named["ktok_ptr" if kernel.endswith("_rows") else "kcnt_ptr"].clone(), n_bh,
                     named["NKB"]))
        return launch(self, kernel, cfg_k, n_bh, named, meta)
    softmax_op.SoftmaxOp._launch_split = record
    try:
        got = _grads(op, xs, partition, cu)
    finally:
        softmax_op.SoftmaxOp._launch_split = launch
    (kernel, units, n_bh, n_kb), = seen
    assert kernel.endswith("_rows") == (partition == "heads")
    extra, least = softmax_op.key_split(n_kb, n_bh, True)
    per_row = units.reshape(-1, n_kb).long()
    seg = torch.clamp(-(-2 * per_row.sum(1, keepdim=True) // extra), min=least)
    return int((per_row > seg).sum()), got


@pytest.mark.parametrize("partition", ["heads", "tokens"])
def test_split_lists_match_the_unsplit_walk_and_the_references(partition, monkeypatch):
    op = _load(SMALL_SHARED)
    xs = _inputs(70, 4, 1, seed=3)  # 5 blocks of 16 tokens, the last one partial
    n_split, split = _split_lists(op, xs, partition)
    assert n_split > 0
    assert all(torch.equal(a, b) for a, b in zip(split, _grads(op, xs, partition)))  # deterministic
    monkeypatch.setattr(softmax_op, "key_split", lambda n_kb, n_bh, interp: (1, 1 << 30))  # never split
    n_split, whole = _split_lists(op, xs, partition)
    assert n_split == 0
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    ref = op.reference(*ref_in)[0]
    nv_in = [x.detach().double().requires_grad_() for x in xs]
    nv = _naive(*nv_in)
    refs = [ref.detach()] + list(torch.autograd.grad(ref, ref_in, torch.ones_like(ref)))
    nvs = [nv.detach()] + list(torch.autograd.grad(nv, nv_in, torch.ones_like(nv)))
    for name, a, b, r, n in zip(("o", "q", "k", "v"), split, whole, refs, nvs):
        assert judge_fp32(a, b.double()).ok, (name, judge_fp32(a, b.double()))
        assert judge_fp32(a, r).ok, (name, judge_fp32(a, r))
        assert judge_fp32(a, n).ok, (name, judge_fp32(a, n))


@pytest.mark.slow
def test_split_lists_of_packed_sequences():
    """Each packed sequence (one of them empty) splits its own lists: against the unsplit walk's oracle."""
    op = _load(SMALL_SHARED)
    cu = torch.tensor([0, 70, 70, 133], dtype=torch.int32)
    xs = _inputs(133, 4, 1, seed=5)
    n_split, got = _split_lists(op, xs, "heads", cu)
    assert n_split > 0
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    ref = op.reference(*ref_in, cu_seqlens=cu)[0]
    refs = [ref.detach()] + list(torch.autograd.grad(ref, ref_in, torch.ones_like(ref)))
    for name, a, r in zip(("o", "q", "k", "v"), got, refs):
        assert judge_fp32(a, r).ok, (name, judge_fp32(a, r))
