"""`pos` in a softmax spec's prefix stage: a token's position in its sequence, so per-token positional values
(RoPE's rotation of q and k) are computed once per token before the walks instead of once per (query block,
key block) step. A spec not in the library: RoPE in the prefix, against the fused library spec's oracle and
the naive RoFormer reference (fp32, interpreter), packed sequences with an empty one (positions restart),
decoding (the new tokens' positions after the cache's), and the errors that name the construct."""
from __future__ import annotations

import pytest
import torch
from naive_softmax import softmax_rope as naive_rope

import effc
from effc.errors import SpecError
from effc.runtime.verify import judge_fp32

ROPE_PREFIX = """
spec rope_prefix {
  input q: [B, T, H, K]
  input k: [B, T, H, K] key
  input v: [B, T, H, V] key
  output o: [B, T, H, V]
  param scale = K ** -0.5
  param base = 10000

  prefix {
    i = where(fidx(K) < K / 2, fidx(K), fidx(K) - K / 2)
    angle = pos[:, None] * exp(-2 * i / K * log(base))
    qr = q * cos(angle) + rotate_half(q) * sin(angle)
    kr = k * cos(angle) + rotate_half(k) * sin(angle)
  }
  score {
    s = (qr @ key(kr).T) * scale
    mask kpos <= qpos
  }
  merge {
    o = softmax(s) @ v
  }
}
"""


def _inputs(B, T, H=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g) for _ in range(3)]


def _grads(fn, xs):
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    o = fn(leaves)
    return [o.detach()] + list(torch.autograd.grad(o, leaves, torch.ones_like(o)))


@pytest.mark.parametrize("packed", [False, True])
def test_rope_in_the_prefix_matches_the_fused_rotation(packed):
    op, fused = effc.loads(ROPE_PREFIX, "rope_prefix"), effc.load("softmax_rope")
    cu = torch.tensor([0, 30, 30, 61], dtype=torch.int32) if packed else None
    xs = _inputs(1 if packed else 2, 61)
    got = _grads(lambda t: op(*t, cu_seqlens=cu)[0], xs)
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    ref = fused.reference(*ref_in, cu_seqlens=cu)[0]
    refs = [ref.detach()] + list(torch.autograd.grad(ref, ref_in, torch.ones_like(ref)))
    nv_in = [x.detach().double().requires_grad_() for x in xs]
    spans = [(0, 61)] if cu is None else [(0, 30), (30, 61)]  # the empty sequence holds no token
    nv = torch.cat([naive_rope(*[x[:, a:b] for x in nv_in]) for a, b in spans], 1)
    nvs = [nv.detach()] + list(torch.autograd.grad(nv, nv_in, torch.ones_like(nv)))
    for name, a, r, n in zip(("o", "q", "k", "v"), got, refs, nvs):
        assert judge_fp32(a, r).ok, (name, judge_fp32(a, r))
        assert judge_fp32(a, n).ok, (name, judge_fp32(a, n))


def test_decoding_continues_the_positions_after_the_cache():
    """Two requests with 0 and 9 cached tokens, 2 new ones each: the cached rotated keys and the new tokens'
    rotation at positions len..len+1 give the full sequence's last outputs."""
    op = effc.loads(ROPE_PREFIX, "rope_prefix")
    lens = torch.tensor([0, 9], dtype=torch.int32)
    xs = _inputs(2, 11, seed=1)
    cache = op.new_cache(*[x[:, :2] for x in xs], max_len=12)
    assert set(cache) == {"kr", "v"}
    for b, n in enumerate(lens.tolist()):  # the context, decoded in one call from an empty cache
        if n:
            ctx = [x[b:b + 1, :n] for x in xs]
            one = {name: c[b:b + 1] for name, c in cache.items()}
            op.decode(*ctx, cache=one, cache_seqlens=torch.zeros(1, dtype=torch.int32))
    new = [torch.stack([x[b, n:n + 2] for b, n in enumerate(lens.tolist())]) for x in xs]
    out = op.decode(*new, cache=cache, cache_seqlens=lens)
    for b, n in enumerate(lens.tolist()):
        want = naive_rope(*[x[b:b + 1, :n + 2].double() for x in xs])[0, n:n + 2]
        assert judge_fp32(out[b], want).ok, (b, judge_fp32(out[b], want))


def test_pos_is_visible_in_the_prefix_only():
    with pytest.raises(SpecError, match="'pos' is not visible in score.*prefix"):
        effc.loads(ROPE_PREFIX.replace("s = (qr @ key(kr).T) * scale", "s = (qr @ key(kr).T) * scale * pos"),
                   "rope_prefix")
    broadcast = ROPE_PREFIX.replace("angle = pos[:, None] * exp", "angle = pos * exp")
    with pytest.raises(SpecError, match=r"cannot broadcast \[C\] with \[K\]"):
        effc.loads(broadcast, "rope_prefix")
    per_feature = ROPE_PREFIX.replace("s = (qr @ key(kr).T) * scale", "s = (qr @ key(kr).T) * scale + rowsum(i)")
    with pytest.raises(SpecError, match=r"takes a per-token value, got \[K\]"):  # [K]: the prefix's own
        effc.loads(per_feature, "rope_prefix")


def test_the_python_front_end_reads_pos_in_its_prefix():
    """`with prefix:` reads pos as the .attn prefix does: the same AST."""
    from effc.dsl import parse
    from effc.dsl.pyfront import Input, Output, Param, merge, parse_function, prefix, score

    def rope_prefix(q: Input("B", "T", "H", "K"), k: Input("B", "T", "H", "K", "key"),  # noqa: F821
                    v: Input("B", "T", "H", "V", "key")) -> Output("o", "B", "T", "H", "V"):
        scale = Param(K ** -0.5)  # noqa: F821
        base = Param(10000)
        with prefix:
            i = where(fidx(K) < K / 2, fidx(K), fidx(K) - K / 2)  # noqa: F821
            angle = pos[:, None] * exp(-2 * i / K * log(base))  # noqa: F821
            qr = q * cos(angle) + rotate_half(q) * sin(angle)  # noqa: F821
            kr = k * cos(angle) + rotate_half(k) * sin(angle)  # noqa: F821
        with score:
            s = (qr @ key(kr).T) * scale  # noqa: F821
            mask(kpos <= qpos)  # noqa: F821
        with merge:
            o = softmax(s) @ v  # noqa: F821, F841

    assert parse_function(rope_prefix).specs[0] == parse(ROPE_PREFIX).specs[0]


def test_prefix_values_read_only_as_products_are_handed_over_narrow():
    """RoPE's rotated q and k feed the score's product only: the runtime hands them to the kernels in the
    inputs' 16-bit dtype (the walks load half the bytes); a prefix value with another use stays fp32."""
    assert effc.loads(ROPE_PREFIX, "rope_prefix").sched.operand_prefix == {"qr", "kr"}
    fox = effc.load("forgetting_transformer")
    assert [x for x in fox.sched.leaves if x not in {d.name for d in fox.spec.inputs}] and not fox.sched.operand_prefix
