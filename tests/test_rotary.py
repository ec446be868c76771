"""In-kernel rotary position embeddings: sin, cos, rotate_half, rotate_pairs, fidx(D) and pos.

Every kernel runs under Triton's interpreter in fp32 and is checked against the spec's float64 oracle and
against a naive reference written here from RoFormer (Su et al., arXiv:2104.09864): q and k rotated in
PyTorch, then plain attention (causal softmax, or RetNet's decayed recurrence). Forward and dq, dk, dv; T not
a multiple of the block; packed sequences with an empty one (positions restart per sequence); a padded head
dim (48 is a 64-column tile, where rotate_half gathers instead of shuffling); a spec outside the library
(partial-channel, interleaved RoPE) in both front ends; located errors for misuse."""
# The @attention_spec body names tile ops and dims that exist only in the spec language:
# ruff: noqa: F821
import math

import pytest
import torch

import effc
from effc.dsl import parse
from effc.dsl.pyfront import Input, Output, Param, mask, merge, score
from effc.dsl.pyfront import parse_function
from effc.errors import ArgumentError, SpecError
from effc.library import LIBRARY_DIR
from effc.runtime.verify import judge_fp32

BASE = 10000.0


# ---- the naive references ---------------------------------------------------------------------------
def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def rotate_pairs(x):
    return torch.stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)


def rope_neox(x, base=BASE):
    """x: (B, T, H, D) rotated by its positions 0..T-1; feature i and i + D/2 share the angle t * base^(-2i/D)."""
    T, D = x.shape[1], x.shape[-1]
    inv = base ** (-2 * torch.arange(D // 2, dtype=x.dtype) / D)
    ang = torch.arange(T, dtype=x.dtype)[:, None] * torch.cat((inv, inv))[None]  # (T, D)
    return x * ang.cos()[None, :, None] + rotate_half(x) * ang.sin()[None, :, None]


def rope_partial_pairs(x, r, base=BASE):
    """The first r features rotated in adjacent pairs (GPT-J): pair j turns by t * base^(-2j/r); the rest kept."""
    T = x.shape[1]
    inv = base ** (-2 * torch.arange(r // 2, dtype=x.dtype) / r)
    ang = torch.arange(T, dtype=x.dtype)[:, None] * inv.repeat_interleave(2)[None]  # (T, r)
    head = x[..., :r]
    rot = head * ang.cos()[None, :, None] + rotate_pairs(head) * ang.sin()[None, :, None]
    return torch.cat((rot, x[..., r:]), -1)


def causal_softmax(q, k, v, scale):
    T = q.shape[1]
    s = torch.einsum("bthk,bshk->bhts", q, k) * scale
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    return torch.einsum("bhts,bshv->bthv", s.softmax(-1), v)


def retention(q, k, v, scale):
    """RetNet's recurrence S_t = gamma_h S_{t-1} + k_t^T v_t, o_t = q_t S_t * scale, gamma_h = 1 - 2^(-5-h)."""
    B, T, H, K = q.shape
    out = torch.zeros(B, T, H, v.shape[-1], dtype=q.dtype)
    S = torch.zeros(B, H, K, v.shape[-1], dtype=q.dtype)
    gamma = 1 - 2.0 ** (-5 - torch.arange(H, dtype=q.dtype))
    for t in range(T):
        S = S * gamma[None, :, None, None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        out[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S)
    return out


def naive(name, q, k, v):
    scale = q.shape[-1] ** -0.5
    if name == "softmax_rope":
        return causal_softmax(rope_neox(q), rope_neox(k), v, scale)
    if name == "retention_rope":
        return retention(rope_neox(q), rope_neox(k), v, scale)
    raise KeyError(name)


def packed(fn, xs, cu):
    """fn run on each packed sequence alone (an empty one gives nothing)."""
    c = cu.tolist()
    return torch.cat([fn(*(x[:, a:b] for x in xs)) for a, b in zip(c, c[1:]) if b > a], 1)


# ---- helpers ----------------------------------------------------------------------------------------
def _inputs(B, T, H, K, V, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, d, generator=gen, dtype=torch.float64) for d in (K, K, V)]


def _grads(fn, xs, dtype, cot):
    leaves = [x.detach().to(dtype).requires_grad_() for x in xs]
    o = fn(*leaves)
    o = o[0] if isinstance(o, tuple) else o
    return [o.detach()] + list(torch.autograd.grad(o, leaves, cot.to(dtype)))


def _check(op, xs, ref_fn, **kw):
    """Kernel (fp32) against the oracle and ref_fn (float64): the output and dq, dk, dv."""
    cot = torch.randn(xs[0].shape[:3] + (xs[2].shape[-1],), generator=torch.Generator().manual_seed(7),
                      dtype=torch.float64)
    got = _grads(lambda *a: op(*a, **kw), xs, torch.float32, cot)
    oracle = _grads(lambda *a: op.reference(*a, **kw), xs, torch.float64, cot)
    ref = _grads(ref_fn, xs, torch.float64, cot)
    for name, g, o, r in zip(("o", "dq", "dk", "dv"), got, oracle, ref):
        assert (o - r).abs().max() < 1e-9, f"{op.name} {name}: oracle vs naive {(o - r).abs().max():.3g}"
        verdict = judge_fp32(g, o)
        assert verdict.ok, f"{op.name} {name}: {verdict}"


# ---- the library specs ------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [32, 48], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("name", ["softmax_rope", "retention_rope"])
def test_rope_forward_and_gradients(name, K):
    """T = 37: a partial last block (softmax) / chunk (retention, chunk 16); K = 48 is a padded tile."""
    op = effc.load(name)
    xs = _inputs(2, 37, 2, K, 16)
    _check(op, xs, lambda q, k, v: naive(name, q, k, v), **({"chunk": 16} if name == "retention_rope" else {}))


@pytest.mark.parametrize("name", ["softmax_rope", "retention_rope"])
def test_rope_packed_sequences_restart_positions(name):
    """cu_seqlens with an empty sequence: each sequence's tokens are rotated from position 0."""
    op = effc.load(name)
    cu = torch.tensor([0, 21, 21, 40], dtype=torch.int32)
    xs = _inputs(1, 40, 2, 32, 16, seed=3)
    _check(op, xs, lambda q, k, v: packed(lambda *a: naive(name, *a), (q, k, v), cu), cu_seqlens=cu,
           **({"chunk": 16} if name == "retention_rope" else {}))


def test_rope_head_dim_96_and_grouped_heads():
    """A 96-wide head (a 128-column tile) with 2 K/V heads shared by 4 query heads."""
    op = effc.load("softmax_rope")
    q, k, v = _inputs(1, 20, 4, 96, 16, seed=5)
    k, v = k[:, :, :2].contiguous(), v[:, :, :2].contiguous()
    rep = lambda x: x.repeat_interleave(2, dim=2)  # noqa: E731
    _check(op, [q, k, v], lambda q, k, v: naive("softmax_rope", q, rep(k), rep(v)))


def test_retention_rope_chunk_sizes_agree_with_the_recurrence():
    """pos is absolute: the chunked oracle at any chunk equals the token-by-token recurrence."""
    op = effc.load("retention_rope")
    xs = _inputs(1, 37, 2, 32, 16, seed=4)
    rec, _ = op.recurrent_reference(*xs)
    for chunk in (16, 32):
        o, _ = op.reference(*xs, chunk=chunk)
        assert (o - rec).abs().max() < 1e-10
    assert (rec - naive("retention_rope", *xs)).abs().max() < 1e-10


def test_softmax_rope_decoding_step_rotates_by_the_context_length():
    op = effc.load("softmax_rope")
    q, k, v = (x.float() for x in _inputs(1, 9, 2, 32, 16, seed=6))
    o_t, _ = op.step(q[:, 8], k[:, 8], v[:, 8], context=(q[:, :8], k[:, :8], v[:, :8]))
    full = naive("softmax_rope", q.double(), k.double(), v.double())[:, 8]
    assert (o_t.double() - full).abs().max() < 1e-5


# ---- a spec outside the library: partial-channel interleaved RoPE -----------------------------------
PARTIAL = """
# RoPE on the first R features only, in adjacent pairs (GPT-J); the other K - R features carry no position
spec rope_partial {
  input q: [B, T, H, K]
  input k: [B, T, H, K] key
  input v: [B, T, H, V] key
  output o: [B, T, H, V]
  param scale = K ** -0.5
  param R = 16

  score {
    j = (fidx(K) - (1 - cos(3.141592653589793 * fidx(K))) / 2) / 2   # the pair of each feature
    theta = exp(-2 * j / R * log(10000))
    qr = where(fidx(K) < R, q * cos(qpos * theta) + rotate_pairs(q) * sin(qpos * theta), q)
    kr = where(fidx(K) < R, k * cos(kpos.T * theta) + rotate_pairs(k) * sin(kpos.T * theta), k)
    s = (qr @ kr.T) * scale
    mask kpos <= qpos
  }
  merge {
    o = softmax(s) @ v
  }
}
"""


def test_partial_interleaved_rope_outside_the_library():
    op = effc.loads(PARTIAL)
    xs = _inputs(2, 37, 2, 48, 16, seed=8)

    def ref(q, k, v):
        return causal_softmax(rope_partial_pairs(q, 16), rope_partial_pairs(k, 16), v, q.shape[-1] ** -0.5)
    _check(op, xs, ref)
    _check(op, xs, lambda q, k, v: causal_softmax(rope_partial_pairs(q, 8), rope_partial_pairs(k, 8), v,
                                                  q.shape[-1] ** -0.5), R=8.0)


def softmax_rope(q: Input("B", "T", "H", "K"), k: Input("B", "T", "H", "K", "key"),
                 v: Input("B", "T", "H", "V", "key")) -> Output("o", "B", "T", "H", "V"):
    scale = Param(K ** -0.5)
    base = Param(10000)
    with score:
        i = where(fidx(K) < K / 2, fidx(K), fidx(K) - K / 2)
        theta = exp(-2 * i / K * log(base))
        qr = q * cos(qpos * theta) + rotate_half(q) * sin(qpos * theta)
        kr = k * cos(kpos.T * theta) + rotate_half(k) * sin(kpos.T * theta)
        s = (qr @ kr.T) * scale
        mask(kpos <= qpos)
    with merge:
        o = softmax(s) @ v


def test_python_front_end_gives_the_library_spec():
    text = (LIBRARY_DIR / "softmax_rope.attn").read_text()
    assert parse_function(softmax_rope).specs[0] == parse(text).specs[0]
    op = effc.attention_spec(softmax_rope)
    xs = _inputs(1, 20, 1, 32, 16, seed=9)
    o, _ = op(*(x.float() for x in xs))
    assert judge_fp32(o, naive("softmax_rope", *xs)).ok


# ---- the ops themselves -----------------------------------------------------------------------------
def test_rotation_adjoint_is_its_negation():
    """The VJP rule the backward uses: <R x, g> = <x, -R g> for both rotations."""
    from effc.ir.nodes import Op
    from effc.runtime.oracle_ops import eval_op
    x, g = torch.randn(2, 1, 8, 6, dtype=torch.float64), torch.randn(2, 1, 8, 6, dtype=torch.float64)
    for kind, ref in (("rotate_half", rotate_half), ("rotate_pairs", rotate_pairs)):
        rx = eval_op(Op("y", kind, ("x",)), [x], 8, 8)
        assert torch.equal(rx, ref(x))
        assert torch.allclose((rx * g).sum(), -(x * eval_op(Op("y", kind, ("g",)), [g], 8, 8)).sum())


# ---- misuse -----------------------------------------------------------------------------------------
SOFTMAX = """spec bad {{
  input q: [B, T, H, K]
  input k: [B, T, H, K] key
  input v: [B, T, H, V] key
  output o: [B, T, H, V]
  score {{
    {line}
    mask kpos <= qpos
  }}
  merge {{
    o = softmax(s) @ v
  }}
}}"""

LINEAR = """spec bad {{
  input q: [B, T, H, K]
  input k: [B, T, H, K]
  input v: [B, T, H, V]
  output o: [B, T, H, V]
  state S: [K, V]
  intra {{
    {line}
  }}
  merge {{
    o = qr @ S
  }}
  inter {{
    S = S + k.T @ v
  }}
}}"""


@pytest.mark.parametrize("template,line,message,col", [
    (SOFTMAX, "s = rotate_half(q @ k.T)", "'rotate_half' rotates the features of a tile's last axis, but its "
     "argument is [C, CK]", 9),
    (LINEAR, "qr = rotate_pairs(causal(q @ k.T)) @ k", "'rotate_pairs' rotates the features", 10),
    (LINEAR, "qr = q * fidx(H)", "fidx takes the name of a feature dim", 19),
    (LINEAR, "qr = q * fidx(q)", "fidx takes the name of a feature dim", 19),
    (SOFTMAX, "s = q @ k.T * pos", "'pos' is not visible in score", 19),
], ids=["pair-tile", "chunk-tile", "fidx-head", "fidx-tensor", "pos-in-score"])
def test_misuse_is_located(template, line, message, col):
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")) as e:
        effc.loads(template.format(line=line))
    line_no = next(i for i, text in enumerate(template.splitlines(), 1) if "{line}" in text)
    assert (e.value.loc.line, e.value.loc.column) == (line_no, col), e.value.loc


def test_odd_rotated_dim_names_the_argument():
    op = effc.load("softmax_rope")
    q, k, v = (x.float() for x in _inputs(1, 8, 1, 33, 16))
    with pytest.raises(ArgumentError, match="argument 'q' has K=33, but 'rotate_half' at .*softmax_rope.attn:18"):
        op(q, k, v)


def test_pos_offset_continues_a_sequence():
    """`pos_offset=s`: the tokens from s on, run from the state the first s leave, at positions s, s+1, ... give
    the whole sequence's rows (kernel, oracle, gradients through both pieces); step() at a position too."""
    op = effc.load("retention_rope")
    xs = [x.float() for x in _inputs(1, 45, 2, 32, 16, seed=9)]  # 45 = 19 + 26: neither a multiple of 16
    full, fin = op(*xs, output_final_state=True, chunk=16)
    want = naive("retention_rope", *(x.double() for x in xs))
    s = 19
    head, mid = op(*(x[:, :s] for x in xs), output_final_state=True, chunk=16)
    tail, fin2 = op(*(x[:, s:] for x in xs), initial_state=mid, output_final_state=True, chunk=16, pos_offset=s)
    assert (torch.cat([head, tail], 1).double() - want).abs().max() < 1e-4
    assert (fin2 - fin).abs().max() < 1e-4
    wrong, _ = op(*(x[:, s:] for x in xs), initial_state=mid)  # positions from 0: not the sequence's rows
    assert (wrong.double() - want[:, s:]).abs().max() > 1e-2
    ref, _ = op.reference(*(x[:, s:] for x in xs), initial_state=mid, pos_offset=s)
    assert (ref - want[:, s:]).abs().max() < 1e-4
    # gradients: the tail's through pos_offset equal the whole sequence's rows
    leaves = [x[:, s:].clone().requires_grad_() for x in xs]
    o, _ = op(*leaves, initial_state=mid, pos_offset=s)
    cot = torch.randn(o.shape, generator=torch.Generator().manual_seed(3))
    (o * cot).sum().backward()
    ref_leaves = [x[:, s:].double().clone().requires_grad_() for x in xs]
    r, _ = op.reference(*ref_leaves, initial_state=mid.double(), pos_offset=s)
    (r * cot.double()).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        assert (a.grad.double() - b.grad).abs().max() < 1e-4
    # decoding: the token at position s from the state of the tokens before it
    o_t, _ = op.step(*(x[:, s] for x in xs), state=mid, pos_offset=s)
    assert (o_t.double() - want[:, s]).abs().max() < 1e-4
    with pytest.raises(ArgumentError, match="pass pos_offset="):
        op.step(*(x[:, s] for x in xs), state=mid)
    with pytest.raises(ArgumentError, match="pos_offset must be an int >= 0"):
        op(*xs, pos_offset=-1)
