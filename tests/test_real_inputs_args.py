"""Arguments as real callers pass them: strided views, packed sequences, call knobs of the wrong kind,
float64 for the oracle. Every family: linear (retention), softmax (softmax_attn), hybrid (swax)."""
from __future__ import annotations

import pytest
import torch

import effc
import effc.library
from effc.runtime.verify import judge_fp32, random_inputs, random_state

FAMILIES = ("retention", "softmax_attn", "swax")
DIMS = {"K": 16, "V": 16}


def _inputs(op, B, T, H=2):
    return random_inputs(op.spec, B, T, H, {d: DIMS[d] for d in op.spec.dims})


def _first(o):
    return o[0] if isinstance(o, tuple) else o


def _run(op, xs, d_o, **kw):
    """The first output and the gradients of the inputs (and of the initial state, if given)."""
    leaves = [x.requires_grad_() for x in xs + ([kw["initial_state"]] if kw.get("initial_state") is not None else [])]
    o = _first(op(*xs, chunk=16, **kw)[0])
    return o, torch.autograd.grad(o, leaves, d_o)


def _strided(x):
    """The same values in a transposed layout: a non-contiguous view."""
    y = x.detach().transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not y.is_contiguous() and torch.equal(y, x)
    return y


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("name", FAMILIES)
def test_strided_cu_seqlens(name, dtype):
    """A strided view of cu_seqlens reads as its values, not as the memory under it (forward and backward)."""
    op = effc.load(name)
    xs = _inputs(op, 1, 21)
    dense = torch.tensor([0, 5, 21], dtype=dtype)
    view = torch.tensor([0, 0, 5, 5, 21, 21], dtype=dtype)[::2]
    assert not view.is_contiguous() and torch.equal(view, dense)
    d_o = torch.randn_like(_first(op(*xs, cu_seqlens=dense, chunk=16)[0]))
    o, g = _run(op, [x.clone() for x in xs], d_o, cu_seqlens=dense)
    o_view, g_view = _run(op, [x.clone() for x in xs], d_o, cu_seqlens=view)
    assert torch.equal(o, o_view)
    assert all(torch.equal(a, b) for a, b in zip(g, g_view))


@pytest.mark.parametrize("name", FAMILIES)
def test_non_contiguous_tensors(name):
    """Inputs, initial state and output cotangent as transposed views: the same output and gradients."""
    op = effc.load(name)
    xs = _inputs(op, 2, 21)
    kw = {"initial_state": random_state(op.spec, 2, 2, DIMS)} if op.spec.states else {}
    d_o = torch.randn_like(_first(op(*xs, chunk=16, **kw)[0]))
    o, g = _run(op, [x.clone() for x in xs], d_o, **{k: v.clone() for k, v in kw.items()})
    o_view, g_view = _run(op, [_strided(x) for x in xs], _strided(d_o), **{k: _strided(v) for k, v in kw.items()})
    assert judge_fp32(o_view, o).ok
    assert all(judge_fp32(a, b).ok for a, b in zip(g_view, g))


BAD_KNOBS = [("chunk", -32), ("chunk", 0), ("chunk", 24), ("chunk", "32"), ("block", -16), ("block", 12),
             ("block", 16.0), ("segments", 0), ("segments", "2"), ("num_warps", 3), ("num_warps", 64),
             ("num_stages", 0), ("num_stages", 2.5), ("save_states", "yes"), ("defer_merge", "no"),
             ("output_final_state", "yes"), ("scale", "0.5"), ("scale", True)]


@pytest.mark.parametrize("knob, value", BAD_KNOBS)
@pytest.mark.parametrize("name", FAMILIES)
def test_bad_knobs_are_named(name, knob, value):
    op = effc.load(name)
    with pytest.raises(effc.ArgumentError, match=knob):
        op(*_inputs(op, 1, 20), **{knob: value})


def test_bad_knob_messages_say_what_was_expected():
    op = effc.load("softmax_attn")
    xs = _inputs(op, 1, 20)
    for kw, message in ((dict(chunk=-32), "chunk must be a power of two >= 16, got -32"),
                        (dict(num_warps=3), "num_warps must be a power of two from 1 to 32, got 3"),
                        (dict(output_final_state="yes"), "output_final_state must be True or False, got 'yes'"),
                        (dict(scale="0.5"), "parameter scale must be a real number, got '0.5'")):
        with pytest.raises(effc.ArgumentError) as e:
            op(*xs, **kw)
        assert message in str(e.value)


def test_block_of_a_spec_that_splits_no_dim():
    """Its block is 1, as `effc tune` passes it; any other is refused."""
    text = (effc.library.LIBRARY_DIR / "linear_attn.attn").read_text()
    op = effc.loads(text.replace("linear_attn", "unsplit").replace(
        "o = o_intra + qs @ S", "o = o_intra + qs @ S - rowsum(o_intra + qs @ S)[:, None]"))
    assert op.comp.plan.split_dim is None
    xs = _inputs(op, 1, 20)
    o, _ = op(*xs, chunk=16, block=1)
    assert judge_fp32(o, op.reference(*xs)[0]).ok
    with pytest.raises(effc.ArgumentError, match=r"block must be 1 \(no dim is split\), got 16"):
        op(*xs, block=16)


@pytest.mark.parametrize("name", FAMILIES)
def test_reference_takes_float64(name):
    """The oracle runs in float64 whatever it is given, so float64 inputs (gradient checks) are welcome;
    only the kernels need 32- or 16-bit ones."""
    op = effc.load(name)
    xs = _inputs(op, 1, 20)
    leaves = [x.double().requires_grad_() for x in xs]
    ref = _first(op.reference(*leaves)[0])
    assert ref.dtype == torch.float64
    assert judge_fp32(ref, _first(op.reference(*xs)[0])).ok
    assert all(g is not None for g in torch.autograd.grad(ref.sum(), leaves))
    with pytest.raises(effc.ArgumentError, match="has dtype torch.float64; expected float32, bfloat16 or float16"):
        op(*leaves)


@pytest.mark.parametrize("name", ["softmax_attn", "forgetting_transformer"])  # the latter: a prefix stage
def test_softmax_reference_with_an_empty_packed_sequence(name):
    """An empty sequence has no tokens (and no key to take a softmax's max over): the others read as if
    evaluated alone, and the kernel agrees."""
    op = effc.load(name)
    xs = _inputs(op, 1, 21)
    cu = torch.tensor([0, 5, 5, 21])
    ref = op.reference(*xs, cu_seqlens=cu)[0]
    alone = torch.cat([op.reference(*[x[:, a:b] for x in xs])[0] for a, b in ((0, 5), (5, 21))], 1)
    assert torch.equal(ref, alone)
    assert judge_fp32(op(*xs, cu_seqlens=cu, chunk=16)[0], ref).ok
