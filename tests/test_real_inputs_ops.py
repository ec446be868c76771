"""Ops as real callers use them: decoding one token at a time in every family (a linear state from zeros,
a softmax branch's context of earlier tokens, a hybrid carrying both), and a hybrid's errors naming the
user's spec, never one of its internal branches."""
from __future__ import annotations

import pytest
import torch

import effc
from effc.runtime.verify import judge_fp32, random_inputs, random_state

DIMS = {"K": 16, "V": 16}

# a hybrid whose state branch reads a prefix value (the softmax branch's FoX gate) in merge
PREFIX_HYBRID = """
spec fox_gla {
  input q: [B, T, H, K]
  input k: [B, T, H, K] key
  input v: [B, T, H, V] key
  input f: [B, T, H] logdecay
  output o: [B, T, H, V]
  state S: [K, V]
  param scale = K ** -0.5
  chunk 16

  prefix { F = cumsum(f) }
  score {
    s = (q @ k.T) * scale + F - key(F)
    mask kpos <= qpos
  }
  intra {
    qd = q * scale
    o_intra = causal(qd @ k.T) @ v
  }
  merge {
    o = softmax(s) @ v + (o_intra + qd @ S) * sigmoid(F)[:, None]
  }
  inter {
    S = S + k.T @ v
  }
}
"""


def _load(name, tmp_path):
    if name != "fox_gla":
        return effc.load(name)
    path = tmp_path / "fox_gla.attn"
    path.write_text(PREFIX_HYBRID)
    return effc.load(str(path))


def _inputs(op, B, T, H=2, seed=0):
    return random_inputs(op.spec, B, T, H, {d: DIMS[d] for d in op.spec.dims}, seed=seed)


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


# -- decoding -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["retention", "mlstm"])
def test_linear_step_from_no_state_starts_at_zero(name):
    """state=None is the zero state: one token's output and state are the oracle's on that token."""
    op = effc.load(name)
    xs = _inputs(op, 2, 1)
    o, state = op.step(*(x[:, 0] for x in xs), state=None)
    ref, ref_state = op.reference(*xs, output_final_state=True)
    assert judge_fp32(o, ref[:, 0]).ok
    assert all(judge_fp32(a, b).ok for a, b in zip(_tuple(state), _tuple(ref_state)))


@pytest.mark.parametrize("name, params, heads", [("forgetting_transformer", {}, 2), ("gated_attention", {}, 1),
                                                 ("sliding_window", {"window": 3}, 1), ("softmax_full", {}, 2)])
def test_softmax_step_attends_to_its_context(name, params, heads):
    """A prompt as the context, then one token at a time: each output is the last token's of the oracle on
    every token so far (FoX's prefix recomputed over the context, an epilogue reading the query's gate, a
    window, a bidirectional mask, grouped K/V heads)."""
    op = effc.load(name)
    xs = _inputs(op, 2, 7)
    xs = [x[:, :, :heads] if "key" in d.annotations else x for d, x in zip(op.spec.inputs, xs)]
    context = tuple(x[:, :3] for x in xs)
    for t in range(3, 7):
        o, context = op.step(*(x[:, t] for x in xs), context=context, **params)
        ref, _ = op.reference(*(x[:, :t + 1] for x in xs), **params)
        assert judge_fp32(o, ref[:, t]).ok, (t, judge_fp32(o, ref[:, t]))
    assert all(torch.equal(c, x) for c, x in zip(context, xs))


@pytest.mark.parametrize("name", ["swax", "fox_gla"])
def test_hybrid_step_carries_state_and_context(name, tmp_path):
    """A hybrid decodes from nothing (state and context None), and after a prompt run by the kernels
    (its final state and the prompt as context): outputs and states are the oracle's on the whole sequence."""
    op = _load(name, tmp_path)
    params = {"window": 4} if name == "swax" else {}
    xs = _inputs(op, 2, 9)
    ref, ref_state = op.reference(*xs, output_final_state=True, **params)
    state, context = None, None
    for t in range(3):
        o, state, context = op.step(*(x[:, t] for x in xs), state=state, context=context, **params)
        assert judge_fp32(o, ref[:, t]).ok, (t, judge_fp32(o, ref[:, t]))
    _, state = op(*(x[:, :5] for x in xs), output_final_state=True, chunk=16, **params)
    context = tuple(x[:, :5] for x in xs)
    for t in range(5, 9):
        o, state, context = op.step(*(x[:, t] for x in xs), state=state, context=context, **params)
        assert judge_fp32(o, ref[:, t]).ok, (t, judge_fp32(o, ref[:, t]))
    assert judge_fp32(state, ref_state).ok


def test_step_arguments_are_named():
    op = effc.load("swax")
    xs = _inputs(op, 1, 4)
    tokens = [x[:, 0] for x in xs]
    with pytest.raises(effc.ArgumentError, match="swax.step takes 4 tokens"):
        op.step(*tokens[:3])
    with pytest.raises(effc.ArgumentError, match="token 'q' must be one token of shape"):
        op.step(xs[0], *tokens[1:])
    with pytest.raises(effc.ArgumentError, match="context must hold the earlier tokens"):
        op.step(*tokens, context=xs[0])
    with pytest.raises(effc.ArgumentError, match="token 'k' has shape"):
        op.step(*tokens, context=[x[:, :, :1] if i == 1 else x for i, x in enumerate(xs)])


# -- a hybrid's arguments -------------------------------------------------------------------------------

HYBRID_ERRORS = [
    (lambda xs, s0: ((*xs[:3],), {}), "swax takes 4 tensors"),
    (lambda xs, s0: (xs, {"gamma": 0.5}), "swax has no parameter"),
    (lambda xs, s0: (xs, {"initial_state": {"X": s0}}), r"every state of swax|swax has \['S'\]"),
    (lambda xs, s0: (xs, {"initial_state": (s0, s0)}), "initial_state must hold 1 tensor"),
    (lambda xs, s0: (xs, {"initial_state": s0[:, :1]}), "initial_state 'S' must have shape"),
]


@pytest.mark.parametrize("case, message", HYBRID_ERRORS)
@pytest.mark.parametrize("call", ["op", "reference"])
def test_hybrid_errors_name_the_users_spec(case, message, call):
    """A hybrid's branches carry its name: their errors named swax_softmax or swax_state."""
    op = effc.load("swax")
    xs, kw = case(_inputs(op, 1, 20), random_state(op.spec, 1, 2, DIMS))
    with pytest.raises(effc.ArgumentError, match=message) as e:
        (op if call == "op" else op.reference)(*xs, **kw)
    assert "swax_" not in str(e.value)


GENERAL_HYBRID = """
spec delta_window {
  input q: [B, T, H, K]
  input k: [B, T, H, K] key
  input v: [B, T, H, V] key
  output o: [B, T, H, V]
  state S: [K, V]
  param scale = K ** -0.5
  chunk 16

  score {
    s = (q @ k.T) * scale
    mask qpos - 4 < kpos <= qpos
  }
  intra { qd = q * scale }
  merge { o = softmax(s) @ v + qd @ S }
  inter { S = S + k.T @ (v - k @ S) }
}
"""


def test_hybrid_tiling_errors_name_the_users_spec(tmp_path):
    """segments on a hybrid whose state update is not diagonal-affine: the tiling's error names the spec."""
    path = tmp_path / "delta_window.attn"
    path.write_text(GENERAL_HYBRID)
    op = effc.load(str(path))
    with pytest.raises(effc.SpecError, match="spec 'delta_window' cannot run in 2 segments"):
        op(*_inputs(op, 1, 20), segments=2)


@pytest.mark.parametrize("knobs", [{"save_states": True}, {"save_states": False}, {"defer_merge": True},
                                   {"defer_merge": False}])
def test_hybrid_takes_the_state_branchs_knobs(knobs):
    """save_states= and defer_merge= reach the state branch: the same output and gradients as the oracle."""
    op = effc.load("swax")
    xs = [x.requires_grad_() for x in _inputs(op, 1, 40)]
    s0 = random_state(op.spec, 1, 2, DIMS).requires_grad_()
    o, _ = op(*xs, initial_state=s0, chunk=16, window=8, **knobs)
    d_o = torch.randn_like(o)
    grads = torch.autograd.grad(o, xs + [s0], d_o)
    leaves = [x.detach().double().requires_grad_() for x in xs + [s0]]
    ref, _ = op.reference(*leaves[:-1], initial_state=leaves[-1], window=8)
    assert judge_fp32(o, ref).ok
    for a, b in zip(grads, torch.autograd.grad(ref, leaves, d_o.double())):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)
