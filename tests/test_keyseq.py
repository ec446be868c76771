"""A key sequence of its own (softmax family): key inputs over S keys, not the query's T tokens, placed on the
query's token axis by `keypos S = a * S + c` (NSA's compressed keys at block ends, memory tokens). Generated
kernels (interpreter, fp32) against the spec's oracle and a dense masked softmax written here, forward and
every gradient; T and S not multiples of the blocks, S < T and S > T, grouped heads; errors."""
from __future__ import annotations

import pytest
import torch

import effc
from effc.compiler import compile_text
from effc.errors import ArgumentError, SpecError
from effc.runtime.verify import judge_fp32, max_err

from naive_softmax import attend


def _spec(keypos: str = "keypos S = (S + 1) * 3 - 1", mask: str = "mask kpos <= qpos", name: str = "ks") -> str:
    return f"""
spec {name} {{
  input q: [B, T, H, K]
  input kc: [B, S, H, K] key
  input vc: [B, S, H, V] key
  output o: [B, T, H, V]
  param scale = K ** -0.5
  {keypos}
  score {{
    s = (q @ kc.T) * scale
    {mask}
  }}
  merge {{ o = softmax(s) @ vc }}
}}
"""


MEMORY = """
# memory tokens: M keys and values (e.g. learned, expanded over the batch) that every query sees, and nothing else
spec memory_tokens {
  input q: [B, T, H, K]
  input mk: [B, M, H, K] key
  input mv: [B, M, H, V] key
  output o: [B, T, H, V]
  param scale = K ** -0.5
  score { s = (q @ mk.T) * scale }
  merge { o = softmax(s) @ mv }
}
"""


def _naive(q, kc, vc, kpos, visible=lambda i, j: j <= i):
    """Dense softmax over the S keys, key s at position kpos[s] (None: every key visible)."""
    i = torch.arange(q.shape[1], dtype=torch.float64).reshape(-1, 1)
    mask = torch.ones(q.shape[1], kc.shape[1], dtype=torch.bool) if kpos is None else visible(i, kpos.reshape(1, -1))
    return attend(q, kc, vc, mask)[0]


def _inputs(B, T, S, H, HK=None, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    HK = HK or H
    return [torch.randn(shape, generator=g).requires_grad_() for shape in
            ((B, T, H, D), (B, S, HK, D), (B, S, HK, D))]


def _check(op, xs, kpos, **kw):
    o, _ = op(*xs, **kw)
    ref, _ = op.reference(*[x.detach() for x in xs])
    naive = _naive(*[x.detach() for x in xs], kpos)
    assert judge_fp32(o, ref).ok, judge_fp32(o, ref)
    assert judge_fp32(o, naive).ok, judge_fp32(o, naive)
    assert max_err(ref, naive) < 1e-10  # the oracle is exact
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, xs, g)
    leaves = [x.detach().double().requires_grad_() for x in xs]
    ref_grads = torch.autograd.grad(op.reference(*leaves)[0], leaves, g.double())
    naive_grads = torch.autograd.grad(_naive(*leaves, kpos), leaves, g.double())
    for name, a, b, c in zip(("q", "kc", "vc"), grads, ref_grads, naive_grads):
        assert a.shape == c.shape, name
        assert judge_fp32(a, b).ok, f"d{name} vs oracle: {judge_fp32(a, b)}"
        assert judge_fp32(a, c).ok, f"d{name} vs naive: {judge_fp32(a, c)}"
    return o


def test_nsa_compressed_branch():
    """nsa_cmp: T = 100 (not a multiple of 16), S = 3 compressed keys at 31, 63, 95; queries before 31 read 0."""
    op = effc.load("nsa_cmp")
    xs = _inputs(2, 100, 3, 2)
    o = _check(op, xs, (torch.arange(3) + 1) * 32.0 - 1, chunk=16)
    assert o[:, :31].abs().max() == 0 and o[:, 31:].abs().min() > 0


def test_nsa_grouped_heads():
    """4 query heads share 2 compressed key/value heads; T = 70, S = 2, query block 32, key block 16."""
    op = effc.load("nsa_cmp")
    _check(op, _inputs(1, 70, 2, 4, HK=2, seed=1), (torch.arange(2) + 1) * 32.0 - 1, chunk=32, block=16)


def test_fewer_keys_than_queries_inexact_stride():
    """Stride 3 (1/3 is inexact in fp32: the block bounds take half a token of margin): T = 45, S = 17."""
    op = effc.loads(_spec())
    src = op.comp.source("triton")
    assert "kpos_f = (r_N.to(tl.float32) * 3.0 + 2.0)" in src and "+ 0.5)" in src
    _check(op, _inputs(1, 45, 17, 2, seed=2), (torch.arange(17) + 1) * 3.0 - 1, chunk=16, block=16)


def test_more_keys_than_queries():
    """Two keys per query position (S = 2 T + 5: some keys past every query); T = 37, S = 79."""
    op = effc.loads(_spec("keypos S = S / 2 - 1"))
    _check(op, _inputs(1, 37, 79, 2, seed=3), torch.arange(79) / 2.0 - 1, chunk=16, block=16)


def test_memory_tokens_visible_to_every_query():
    """A spec not in the library: 4 memory keys, no mask, no positions; T = 30."""
    op = effc.loads(MEMORY)
    assert op.spec.keyseq.dim == "M" and op.spec.keyseq.pos is None
    _check(op, _inputs(2, 30, 4, 2, seed=4), None, chunk=16)


def test_key_blocks_past_the_queries_are_never_loaded():
    """The walk's key range comes from the positions: a query block [i0, i1] sees keys s <= (i1 - 31) / 32."""
    op = effc.load("nsa_cmp")
    text = str(op.comp.legality)
    assert "visible j in [-oo, floor(i1/32 - 31/32)]" in text
    assert "visible i in [32*j0 + 31, oo]" in text
    assert op.visible_pairs(100) == (100 - 31) + (100 - 63) + (100 - 95)  # 4 keys at 31, 63, 95, 127


# ---- errors -----------------------------------------------------------------------------------------
def _err(text):
    with pytest.raises(SpecError) as e:
        compile_text(text, file="bad.attn").legality
    return e.value


def test_two_key_sequences_in_one_score_is_an_error():
    e = _err(_spec(mask="mask kpos <= qpos").replace("input vc: [B, S, H, V] key", "input vc: [B, T, H, V] key"))
    assert "two sequences" in str(e) and e.loc.line > 0 and "softmax(s) @ vc" in e.loc.text


def test_kpos_needs_declared_positions():
    e = _err(_spec(keypos=""))
    assert "kpos of the key sequence S is not declared" in str(e) and "mask kpos <= qpos" in e.loc.text


@pytest.mark.parametrize("line,msg", [
    ("keypos S = S * S", "affine"),
    ("keypos S = 5 - S", "increase"),
    ("keypos S = (S + 1) * width", "unknown name 'width'"),
    ("keypos T = T", "keypos T"),
])
def test_bad_keypos_lines(line, msg):
    e = _err(_spec(keypos=line))
    assert msg in str(e) and "keypos" in e.loc.text


def test_key_sequence_in_prefix_or_queries_is_an_error():
    e = _err(_spec().replace("merge {", "prefix { m = rowsum(kc) }\n  merge {"))
    assert "prefix runs over the query's tokens" in str(e)
    bad = _spec().replace("input q: [B, T, H, K]\n  input kc: [B, S, H, K] key", "input kc: [B, S, H, K] key\n"
                          "  input q: [B, T, H, K]")
    assert "sets the query tokens" in str(_err(bad))


def test_call_time_errors():
    op = effc.load("nsa_cmp")
    q, kc, vc = _inputs(1, 40, 2, 2)
    with pytest.raises(ArgumentError, match="argument 'vc' has S=3 but 'kc' has S=2"):
        op(q, kc, torch.randn(1, 3, 2, 16))
    with pytest.raises(NotImplementedError, match="cu_seqlens_k"):
        op(q, kc, vc, cu_seqlens=torch.tensor([0, 40], dtype=torch.int32))
    with pytest.raises(NotImplementedError, match=r"are not tokens; decode\(\.\.\.\) takes them whole"):
        op.step(q[:, 0], kc[:, 0], vc[:, 0])
