"""Reverse (right-to-left) states: the language (`state R: [K, V] reverse`, anticausal masks, both front
ends), the oracle against the full bidirectional attention matrix, and the generated Triton forward and
every gradient (interpreter, fp32) against the oracle and that matrix: T not a multiple of the chunk,
packed sequences with an empty one, strong decays, initial and final states of both directions; and the
errors for misuse."""
# Spec bodies name tile ops and dims that exist only in the spec language:
# ruff: noqa: F821
import pytest
import torch
import torch.nn.functional as F

import effc
from effc.codegen.tilelang import emit_module as tilelang_module
from effc.dsl import parse, parse_file
from effc.dsl.pyfront import Input, Output, State, inter, intra, merge
from effc.errors import SpecError
from effc.library import LIBRARY_DIR
from effc.passes.lower import lower
from effc.passes.shapes import infer_shapes
from effc.runtime.verify import judge_fp32, max_err

from naive import lion_s as naive_lion_s

K, V, H = 16, 16, 2


def full_matrix(q, k, v, g=None):
    """The bidirectional attention written out: o_i = sum_j M_ij phi(q_i).phi(k_j) v_j / sum_j (same), M_ij =
    exp(-|G_i - G_j|) for G the running sum of the log gates (1 without gates), phi = elu + 1. Float64."""
    phi = lambda x: F.elu(x.double()) + 1
    a = torch.einsum("bihk,bjhk->bhij", phi(q), phi(k))
    if g is not None:
        G = g.double().cumsum(1).permute(0, 2, 1)
        a = a * torch.exp(-(G[..., :, None] - G[..., None, :]).abs())
    return (torch.einsum("bhij,bjhv->bihv", a, v.double()) / a.sum(-1).permute(0, 2, 1)[..., None])


def inputs(name, B=2, T=45, strength=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen),
          torch.randn(B, T, H, V, generator=gen)]
    if name == "lion_s":  # log gates in (-strength, 0): strength 20 leaves almost nothing beyond a token
        xs.append(-strength * torch.rand(B, T, H, generator=gen))
    return xs


def grads(o, xs, seed=1):
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed)).to(o.dtype)
    return torch.autograd.grad(o, xs, do)


# -- the oracle -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lion", "lion_s"])
@pytest.mark.parametrize("chunk", [1, 16])
def test_oracle_is_the_full_attention_matrix(name, chunk):
    xs = inputs(name, T=37)
    o, _ = effc.load(name).reference(*xs, chunk=chunk)
    ref = full_matrix(*xs)
    assert max_err(o, ref) < 1e-12 * max(1.0, ref.abs().max().item())


def test_no_decay_is_lion_lit():
    q, k, v, g = inputs("lion_s", T=30)
    a, _ = effc.load("lion_s").reference(q, k, v, torch.zeros_like(g))
    b, _ = effc.load("lion").reference(q, k, v)
    assert max_err(a, b) < 1e-12


# -- the kernels ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,strength", [("lion", 0), ("lion_s", 1.0), ("lion_s", 20.0)],
                         ids=["lion", "lion_s", "lion_s-strong"])
def test_forward_and_every_gradient(name, strength):
    """T = 45, chunk 16: the last chunk is partial, and it is where the reverse walk starts."""
    op = effc.load(name)
    xs = [x.requires_grad_() for x in inputs(name, strength=strength)]
    o, _ = op(*xs, chunk=16)
    oracle, _ = op.reference(*xs, chunk=16)
    naive = full_matrix(*xs)
    assert judge_fp32(o, oracle).ok, judge_fp32(o, oracle)
    assert judge_fp32(o, naive).ok
    from_oracle = grads(oracle, xs)
    for got, want, name_x in zip(grads(o, xs), from_oracle, "qkvg"):
        assert judge_fp32(got, want).ok, (name_x, judge_fp32(got, want))
    # the oracle's gradients are the naive matrix's: both are differentiated by torch
    for got, want in zip(from_oracle, grads(naive, xs)):
        assert max_err(got, want) < 1e-9 * max(1.0, want.abs().max().item())


def test_varlen_with_an_empty_sequence_and_states_of_both_directions():
    """Packed sequences of 20, 0, 37 and 16 tokens: each reverse state starts at its sequence's end (from the
    initial state given for it) and leaves at its start. Outputs, final states and the gradients of the inputs
    and of every initial state against the oracle and the naive reference, sequence by sequence."""
    op = effc.load("lion_s")
    lens = [20, 0, 37, 16]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    xs = [x.requires_grad_() for x in inputs("lion_s", B=1, T=int(cu[-1]), strength=4.0)]
    gen = torch.Generator().manual_seed(3)
    s0 = [torch.randn(4, H, K, V, generator=gen) * 0.1, torch.rand(4, H, K, generator=gen) + 0.5,
          torch.randn(4, H, K, V, generator=gen) * 0.1, torch.rand(4, H, K, generator=gen) + 0.5]
    s0 = [s.requires_grad_() for s in s0]
    o, fin = op(*xs, cu_seqlens=cu, chunk=16, initial_state=tuple(s0), output_final_state=True)
    ref, ref_fin = op.reference(*xs, cu_seqlens=cu, chunk=16, initial_state=tuple(s0), output_final_state=True)
    c = cu.tolist()
    pieces = [naive_lion_s(*[x[:, a:b] for x in xs], initial_state=[s[i:i + 1] for s in s0])
              for i, (a, b) in enumerate(zip(c, c[1:]))]
    naive = torch.cat([p[0] for p in pieces], 1)
    naive_fin = [torch.cat([p[1][j] for p in pieces], 0) for j in range(4)]
    assert judge_fp32(o, ref).ok and judge_fp32(o, naive).ok
    for got, want, nv in zip(fin, ref_fin, naive_fin):
        assert judge_fp32(got, want).ok and judge_fp32(got, nv).ok
    # the empty sequence's final states are its initial ones, in both directions
    for got, init in zip(fin, s0):
        assert max_err(got[1], init[1]) < 1e-6
    gen = torch.Generator().manual_seed(4)
    seeds = [torch.randn(t.shape, generator=gen) for t in (o, *fin)]
    loss = lambda out, finals: sum((a * b.to(a.dtype)).sum() for a, b in zip((out, *finals), seeds))
    got = torch.autograd.grad(loss(o, fin), xs + s0)
    want = torch.autograd.grad(loss(ref, ref_fin), xs + s0)
    nv = torch.autograd.grad(loss(naive, naive_fin), xs + s0)
    for a, b, n in zip(got, want, nv):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)
        assert max_err(b, n) < 1e-9 * max(1.0, n.abs().max().item())


# an anticausal-only spec (no forward state): the next tokens' linear attention, o_i = sum_{j >= i} q_i.k_j v_j,
# its in-chunk part written with causal(...).T instead of anticausal
SUFFIX = """
spec suffix_attn {
  input q: [B, T, H, K]
  input k: [B, T, H, K]
  input v: [B, T, H, V]
  output o: [B, T, H, V]
  state R: [K, V] reverse
  chunk 16
  intra { o_intra = causal(k @ q.T).T @ v }
  merge { o = o_intra + q @ R }
  inter { R = R + k.T @ v }
}
"""


def test_a_spec_with_only_a_reverse_state():
    op = effc.loads(SUFFIX)
    assert [k.name for k in op.comp.plan.kernels if not k.backward] == ["walk_rev", "out"]
    xs = [x.requires_grad_() for x in inputs("lion", T=40)]
    q, k, v = (x.double() for x in xs)
    naive = torch.einsum("bihk,bjhk->bhij", q, k).triu().mul(1.0)
    naive = torch.einsum("bhij,bjhv->bihv", naive, v)
    o, _ = op(*xs)
    assert judge_fp32(o, naive).ok
    for got, want in zip(grads(o, xs), grads(naive, xs)):
        assert judge_fp32(got, want).ok


# -- the language -----------------------------------------------------------------------------------------
def test_anticausal_masks_are_callable_and_mirror_causal():
    text = SUFFIX.replace("causal(k @ q.T).T", "anticausal(q @ k.T)").replace("suffix_attn", "suffix2")
    xs = inputs("lion", T=33)
    a, _ = effc.loads(text).reference(*xs)
    b, _ = effc.loads(SUFFIX).reference(*xs)
    assert max_err(a, b) < 1e-12


@effc.attention_spec(chunk=16)
def suffix_attn(q: Input("B", "T", "H", "K"), k: Input("B", "T", "H", "K"),
                v: Input("B", "T", "H", "V")) -> Output("o", "B", "T", "H", "V"):
    R = State("K", "V", "reverse")
    with intra:
        o_intra = causal(k @ q.T).T @ v
    with merge:
        o = o_intra + q @ R
    with inter:
        R = R + k.T @ v


def test_both_front_ends_give_the_same_ir():
    text = infer_shapes(lower(parse(SUFFIX)))
    assert suffix_attn.comp.typed == text
    assert [s.reverse for s in text.states] == [True]


def test_library_lion_declares_its_reverse_states():
    spec = lower(parse_file(LIBRARY_DIR / "lion_s.attn"))
    assert [s.name for s in spec.reverse_states] == ["R", "ZR"]
    assert "lion" in effc.library_names() and "lion_s" in effc.library_names("linear")


# -- misuse -------------------------------------------------------------------------------------------------
def test_reverse_on_an_input_is_an_error():
    text = SUFFIX.replace("input v: [B, T, H, V]", "input v: [B, T, H, V] reverse")
    with pytest.raises(SpecError, match="reverse on input 'v': only a state"):
        effc.loads(text)


def test_an_update_reading_the_other_direction_is_an_error():
    text = """
spec mixed {
  input q: [B, T, H, K]
  input k: [B, T, H, K]
  input v: [B, T, H, V]
  output o: [B, T, H, V]
  state S: [K, V]
  state R: [K, V] reverse
  merge { o = q @ S + q @ R }
  inter {
    S = S + k.T @ v
    R = R + S
  }
}
"""
    with pytest.raises(SpecError, match="update of reverse state 'R' reads forward state"):
        effc.loads(text).comp.legality


def test_decoding_a_reverse_state_is_an_error():
    op = effc.load("lion")
    q, k, v = (torch.randn(1, H, K) for _ in range(3))
    with pytest.raises(SpecError, match="cannot decode token by token: its reverse state 'R'"):
        op.step(q, k, v)


def test_unsupported_schedules_name_the_reverse_state():
    op = effc.load("lion")
    xs = inputs("lion", T=64)
    with pytest.raises(SpecError, match="reverse state R: segmented right-to-left walks are not implemented"):
        op(*xs, chunk=16, segments=3)
    with pytest.raises(SpecError, match="merge cannot be fused into a walk with reverse state"):
        op(*xs, chunk=16, defer_merge=False)
    with pytest.raises(NotImplementedError, match="backend 'tilelang' does not implement reverse states"):
        tilelang_module(op.comp.plan)
