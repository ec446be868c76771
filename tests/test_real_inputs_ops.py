"""Ops as real callers use them: decoding one token at a time in every family (a linear state from zeros,
a softmax branch's context of earlier tokens, a hybrid carrying both), a hybrid's errors naming the
user's spec, never one of its internal branches, and `effc check` on specs beyond the library's shapes
(two outputs, an input read only by a mask), judging every gradient in every family."""
from __future__ import annotations

import pytest
import torch

from typer.testing import CliRunner

import effc
from effc.tools.cli import app
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
def test_hybrid_step_carries_state_and_context(name, tmp_path, monkeypatch):
    """A hybrid decodes from nothing (state and context None), and after a prompt run by the kernels
    (its final state and the prompt as context): outputs and states are the oracle's on the whole sequence.
    The softmax branch runs its decode kernels, never its oracle."""
    op = _load(name, tmp_path)
    params = {"window": 4} if name == "swax" else {}
    xs = _inputs(op, 2, 9)
    ref, ref_state = op.reference(*xs, output_final_state=True, **params)

    def no_oracle(*a, **k):
        raise AssertionError("the softmax branch's step ran its oracle")
    monkeypatch.setattr(op.softmax, "reference", no_oracle)
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


# -- effc check -----------------------------------------------------------------------------------------

TWO_OUTPUTS = """
spec two_outputs {
  input q: [B, T, H, K]
  input k: [B, T, H, K]
  input v: [B, T, H, V]
  input g: [B, T, H] logdecay
  output o: [B, T, H, V]
  output gated: [B, T, H, V]
  state S: [K, V]
  param scale = K ** -0.5
  chunk 16

  intra {
    b = cumsum(g)
    qd = q * exp(b)[:, None] * scale
    o_intra = causal(qd @ (k * exp(-b)[:, None]).T) @ v
  }
  merge {
    y = o_intra + qd @ S
    o = y
    gated = y * sigmoid(y)
  }
  inter {
    bl = last(b)
    S = S * exp(bl) + (k * exp(bl - b)[:, None]).T @ v
  }
}
"""

# a per-token input that only a mask reads: document ids, or a prefix length per query
MASK_ONLY = """
spec {name} {{
  input q: [B, T, H, K]
  input k: [B, T, H, K] key
  input v: [B, T, H, V] key
  input {extra}: [B, T, H]
  output o: [B, T, H, V]
  param scale = K ** -0.5

  score {{
    s = (q @ k.T) * scale
    mask {mask}
  }}
  merge {{
    o = softmax(s) @ v
  }}
}}
"""
MASK_ONLY_SPECS = {"doc_mask": ("doc", "kpos <= qpos and key(doc) == query(doc)"),
                   "prefix_lm": ("plen", "kpos < query(plen) or kpos <= qpos")}


def _check(*args):
    r = CliRunner().invoke(app, ["check", *args, "--shape", "1,40,2", "--dims", "K=16,V=16", "--chunk", "16"])
    return r, {line.split(":")[0].strip(): line for line in r.output.splitlines() if line.startswith("  ")
               and ("oracle" in line)}


def _expected(spec) -> set[str]:
    names = ([f"output {o.name}" for o in spec.outputs] + [f"final state {s.name}" for s in spec.states]
             + [f"grad {d.name}" for d in spec.inputs] + [f"grad initial state {s.name}" for s in spec.states])
    return {f"kernel vs oracle, {n}" for n in names} | ({"oracle chunked vs recurrent"} if spec.states else set())


@pytest.mark.parametrize("name", ["two_outputs", "doc_mask", "prefix_lm"])
def test_check_specs_beyond_the_librarys_shapes(name, tmp_path):
    """effc check crashed on a linear spec with two outputs (it compared tuples) and on a softmax spec with an
    input read only by a mask (autograd: the input is not in the graph); both are judged, the mask's input
    by a zero gradient."""
    path = tmp_path / f"{name}.attn"
    path.write_text(TWO_OUTPUTS if name == "two_outputs" else
                    MASK_ONLY.format(name=name, extra=MASK_ONLY_SPECS[name][0], mask=MASK_ONLY_SPECS[name][1]))
    r, verdicts = _check(str(path))
    assert r.exit_code == 0, r.output
    assert set(verdicts) == _expected(effc.load(str(path)).spec), r.output
    assert all(line.endswith(" ok") and "(bound " in line for line in verdicts.values()), r.output
    if name != "two_outputs":
        extra = MASK_ONLY_SPECS[name][0]
        assert f"grad {extra}: max abs error 0.000e+00" in verdicts[f"kernel vs oracle, grad {extra}"]


@pytest.mark.parametrize("name", ["retention", "softmax_attn", "swax"])
def test_check_judges_every_gradient_in_every_family(name):
    """Every output, final state, input gradient and initial-state gradient, with its error and bound."""
    r, verdicts = _check(name)
    assert r.exit_code == 0, r.output
    assert set(verdicts) == _expected(effc.load(name).spec), r.output
    assert all(line.endswith(" ok") for line in verdicts.values()), r.output


class _DoubledGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return 2 * g


@pytest.mark.parametrize("name", ["retention", "swax"])
def test_check_fails_on_a_wrong_gradient(name, monkeypatch):
    """A kernel whose forward is right and whose gradients are not: check says FAIL and exits 1 (it did
    not look at the linear family's or a hybrid's gradients)."""
    from effc.runtime.op import AttentionOp
    call = AttentionOp.__call__
    monkeypatch.setattr(AttentionOp, "__call__", lambda self, *xs, **kw: call(
        self, *(_DoubledGradient.apply(x) for x in xs), **kw))
    r, verdicts = _check(name)
    assert r.exit_code == 1, r.output
    assert verdicts["kernel vs oracle, output o"].endswith(" ok")
    assert verdicts["kernel vs oracle, grad q"].endswith(" FAIL"), r.output


def test_hybrid_reference_takes_packed_sequences():
    """swax's oracle on packed sequences (one empty) equals the kernels and each sequence alone; it raised
    'multiple values for keyword argument cu_seqlens' before."""
    op = effc.load("swax")
    xs = random_inputs(op.spec, 1, 50, 2, {d: 16 for d in op.spec.dims}, torch.float32, "cpu", seed=1)
    cu = torch.tensor([0, 13, 13, 40, 50], dtype=torch.int32)
    o, final = op(*xs, cu_seqlens=cu, output_final_state=True)
    ref, ref_final = op.reference(*xs, cu_seqlens=cu, output_final_state=True)
    assert torch.allclose(o, ref.float(), atol=1e-4) and torch.allclose(final, ref_final.float(), atol=1e-4)
    c = cu.tolist()
    for a, b in zip(c, c[1:]):
        if b > a:
            alone, _ = op.reference(*[x[:, a:b] for x in xs])
            assert torch.allclose(alone, ref[:, a:b])
