"""The softmax family's `queries=(lo, hi)` knob: only the query rows lo <= t < hi are computed, against
every key. Those rows (and every gradient, which then comes from those rows alone) must equal the full
call's, the oracle and the hand-written references of tests/naive_softmax.py; the other rows are zero."""
import pytest
import torch

import effc
from effc.errors import ArgumentError
from effc.runtime.verify import random_inputs

from naive_softmax import NAIVE_SOFTMAX

T = 45  # never a multiple of the blocks (16)
RANGES = [(20, 45), (17, 33), (0, 1), (45, 45)]  # a tail, a middle cut inside blocks, one row, none


def _inputs(op, B=2, seed=0):
    return random_inputs(op.spec, B, T, 2, {d: 16 for d in op.spec.dims if d not in ("B", "T", "H")}, seed=seed)


def _run(op, xs, grad, **kw):
    a = [x.detach().clone().requires_grad_(True) for x in xs]
    o, _ = op(*a, chunk=16, block=16, **kw)
    (o * grad).sum().backward()
    return o.detach(), [x.grad for x in a]


def _close(got, want, what, tol=2e-5):
    if want.numel() == 0:
        assert got.shape == want.shape, what
        return
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), f"{what}: max error {err:.3g}"


@pytest.mark.parametrize("name,kw", [("softmax_attn", {}), ("sliding_window", {"window": 7}), ("alibi", {}),
                                     ("forgetting_transformer", {}), ("softmax_full", {}), ("gated_attention", {})])
def test_rows_match_the_full_call_and_the_naive_reference(name, kw):
    op = effc.load(name)
    xs = _inputs(op)
    grad = torch.randn(xs[0].shape[:3] + (16,), generator=torch.Generator().manual_seed(1))
    for lo, hi in RANGES:
        rows = torch.zeros(T, dtype=torch.bool)
        rows[lo:hi] = True
        g = grad * rows.reshape(1, T, 1, 1)  # the full call's gradient from these rows alone
        o, grads = _run(op, xs, grad, queries=(lo, hi), **kw)
        o_full, grads_full = _run(op, xs, g, **kw)
        assert (o[:, ~rows] == 0).all(), f"{name} {lo, hi}: rows outside the range must be zero"
        _close(o[:, rows], o_full[:, rows], f"{name} {lo, hi}: output against the full call")
        for i, (a, b) in enumerate(zip(grads, grads_full)):
            _close(a, b, f"{name} {lo, hi}: grad of input {i}")
        naive = NAIVE_SOFTMAX[name](*xs, **kw)
        _close(o[:, rows], naive[:, rows], f"{name} {lo, hi}: output against the naive reference")
        ref, _ = op.reference(*xs, queries=(lo, hi), **kw)
        _close(o, ref, f"{name} {lo, hi}: against the oracle")


def test_packed_stream_range_cuts_documents():
    """With cu_seqlens the range counts tokens of the packed stream: it may start inside one document and
    end inside another; positions stay per document."""
    op = effc.load("sliding_window")
    xs = _inputs(op, B=1, seed=3)
    cu = torch.tensor([0, 10, 10, 30, 45], dtype=torch.int32)
    grad = torch.randn(1, T, 2, 16, generator=torch.Generator().manual_seed(4))
    lo, hi = 5, 27
    rows = torch.zeros(T, dtype=torch.bool)
    rows[lo:hi] = True
    o, grads = _run(op, xs, grad, queries=(lo, hi), cu_seqlens=cu, window=6)
    o_full, grads_full = _run(op, xs, grad * rows.reshape(1, T, 1, 1), cu_seqlens=cu, window=6)
    assert (o[:, ~rows] == 0).all()
    _close(o, o_full * rows.reshape(1, T, 1, 1), "packed: output")
    for a, b in zip(grads, grads_full):
        _close(a, b, "packed: gradient")
    c = cu.tolist()
    naive = torch.cat([NAIVE_SOFTMAX["sliding_window"](*[x[:, a:b] for x in xs], window=6)
                       for a, b in zip(c, c[1:]) if b > a], 1)
    _close(o[:, rows], naive[:, rows], "packed: against the naive reference")


@pytest.mark.parametrize("bad", [(3, 2), (-1, 4), (0, T + 1), (1.0, 4), (1,)])
def test_bad_range_is_named(bad):
    op = effc.load("softmax_attn")
    with pytest.raises(ArgumentError, match="queries must be a pair"):
        op(*_inputs(op), queries=bad)
