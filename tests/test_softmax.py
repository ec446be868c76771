"""The softmax family: generated kernels (interpreter, fp32) against the oracle derived from the spec
and against independent naive references (explicit masks, plain PyTorch softmax), forward and
backward; block sparsity, grouped heads, packed sequences (document masks), errors, the schedule."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import sympy
import torch

import effc
from effc.dsl import parse
from effc.errors import SpecError
from effc.passes.blocksparse import I0, I1, J, J0, J1, I, derive, formula_range, numeric
from effc.compiler import compile_text
from effc.runtime.verify import judge_fp32, max_err, random_inputs

from naive_softmax import NAIVE_SOFTMAX, attend, positions

SOFTMAX = effc.library_names("softmax")
DIMS = {"K": 16, "V": 16, "R": 8, "I": 16}  # R: mla's RoPE part; I: dsa's indexer
# params that make the masks bite at test lengths (the library defaults suit long sequences)
SMALL = {"sliding_window": {"window": 20}, "sink_window": {"window": 20}, "based": {"window": 6}, "softcap": {"cap": 2.0}, "scale_invariant": {"tau": 3.0}}


def _naive(name, xs, params):
    fn = NAIVE_SOFTMAX[name]
    return fn(*xs, **params)


def _inputs(op, B, T, H, seed=0, heads=None):
    xs = random_inputs(op.spec, B, T, H, {d: DIMS[d] for d in op.spec.dims}, seed=seed)
    if heads:  # fewer heads for some inputs (grouped-query attention)
        xs = [x[:, :, :heads[d.name]].contiguous() if d.name in heads else x for d, x in zip(op.spec.inputs, xs)]
    return xs


def test_library_softmax_specs_have_naive_references():
    assert set(SOFTMAX) == set(NAIVE_SOFTMAX)


@pytest.mark.parametrize("name", SOFTMAX)
def test_forward_and_backward(name):
    """T=45 with 16-token blocks: the last query and key blocks are partial; the masks bite."""
    op = effc.load(name)
    params = SMALL.get(name, {})
    xs = [x.requires_grad_() for x in _inputs(op, 2, 45, 2)]
    outs, none = op(*xs, chunk=16, **params)
    assert none is None
    refs, _ = op.reference(*[x.detach() for x in xs], **params)
    naives = _naive(name, [x.detach() for x in xs], params)
    outs, refs, naives = (x if isinstance(x, tuple) else (x,) for x in (outs, refs, naives))  # rope_pp: two
    for o, ref, naive in zip(outs, refs, naives, strict=True):
        assert judge_fp32(o, ref).ok, judge_fp32(o, ref)
        assert judge_fp32(o, naive).ok, judge_fp32(o, naive)
        assert max_err(ref, naive) < 1e-10 * max(1.0, naive.abs().max().item())  # the oracle is exact
    g = tuple(torch.randn_like(o) for o in outs)
    # inputs read by a select stage alone (dsa's indexer) get no gradient: the choice is discrete
    grads = torch.autograd.grad(outs, xs, g, allow_unused=True)
    leaves = [x.detach().double().requires_grad_() for x in xs]
    naive_outs = _naive(name, leaves, params)
    naive_outs = naive_outs if isinstance(naive_outs, tuple) else (naive_outs,)
    naive_grads = torch.autograd.grad(naive_outs, leaves, tuple(x.double() for x in g), allow_unused=True)
    for d, a, b in zip(op.spec.inputs, grads, naive_grads):
        assert (a is None) == (b is None), f"d{d.name}: {a is None} against the naive {b is None}"
        assert a is None or judge_fp32(a, b).ok, f"d{d.name}: {judge_fp32(a, b)}"
    assert sum(a is None for a in grads) == (3 if name == "dsa" else 0)


@pytest.mark.parametrize("name", ["softmax_attn", "forgetting_transformer", "sliding_window"])
def test_other_blocks_and_lengths(name):
    """Query block 32, key block 16, T = 70 (not a multiple of either); B = 1, H = 3."""
    op = effc.load(name)
    params = SMALL.get(name, {})
    xs = [x.requires_grad_() for x in _inputs(op, 1, 70, 3, seed=4)]
    o, _ = op(*xs, chunk=32, block=16, **params)
    naive = _naive(name, [x.detach() for x in xs], params)
    assert judge_fp32(o, naive).ok, judge_fp32(o, naive)
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, xs, g)
    leaves = [x.detach().double().requires_grad_() for x in xs]
    for a, b in zip(grads, torch.autograd.grad(_naive(name, leaves, params), leaves, g.double())):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)


def test_grouped_query_attention():
    """4 query heads share 2 key/value heads; key and value gradients sum over each group."""
    op = effc.load("forgetting_transformer")
    xs = [x.requires_grad_() for x in _inputs(op, 1, 40, 4, seed=2, heads={"k": 2, "v": 2})]
    o, _ = op(*xs, chunk=16)
    naive = _naive("forgetting_transformer", [x.detach() for x in xs], {})
    assert judge_fp32(o, naive).ok
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, xs, g)
    leaves = [x.detach().double().requires_grad_() for x in xs]
    for a, b in zip(grads, torch.autograd.grad(_naive("forgetting_transformer", leaves, {}), leaves, g.double())):
        assert a.shape == b.shape and judge_fp32(a, b).ok


@pytest.mark.parametrize("gq", [1, 2, 4])
def test_key_heads_walked_by_one_dkv_program(monkeypatch, gq):
    """One key head for 4 query heads: a dK/dV program walks `gq` of them in turn (the runtime's choice
    forced), summing in registers; the other groups' sums are added after. Every gradient against the naive
    reference, over a sequence that is no multiple of the block."""
    from effc.runtime import softmax_op
    monkeypatch.setattr(softmax_op, "key_group", lambda group, *a: min(group, gq))
    op = effc.load("softmax_attn")
    xs = [x.requires_grad_() for x in _inputs(op, 2, 37, 4, seed=7, heads={"k": 1, "v": 1})]
    o, _ = op(*xs, chunk=16)
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, xs, g)
    leaves = [x.detach().double().requires_grad_() for x in xs]
    ref = _naive("softmax_attn", leaves, {})
    assert judge_fp32(o, ref).ok
    for a, b in zip(grads, torch.autograd.grad(ref, leaves, g.double())):
        assert a.shape == b.shape and judge_fp32(a, b).ok, judge_fp32(a, b)


def test_key_side_values_reading_the_head_keep_one_head_a_dkv_program(monkeypatch):
    from effc.passes.softmax_plan import dkv_groups_heads
    from effc.runtime import softmax_op
    monkeypatch.setattr(softmax_op, "key_group", lambda group, *a: group)  # grouping wherever it is legal
    # a key-side value that reads the head index: each query head scales the shared keys its own way, so one
    # dK/dV program may not walk several query heads from one key-side tile (GQ = 1, dkv_groups_heads)
    op = effc.loads(BASE.replace("s = q @ k.T", "kh = k * (head + 1.0)\n    s = (q @ kh.T) * 0.25"), "s")
    assert not dkv_groups_heads(op.comp.backward)
    xs = [x.requires_grad_() for x in _inputs(op, 1, 37, 4, seed=9, heads={"k": 1, "v": 1})]
    o, _ = op(*xs, chunk=16)
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, xs, g)
    leaves = [x.detach().double().requires_grad_() for x in xs]
    q, k, v = leaves
    k4, v4 = (x.repeat_interleave(4, dim=2) for x in (k, v))
    kh = k4 * torch.arange(1.0, 5.0, dtype=torch.float64)[None, None, :, None]
    i, j = positions(37)
    ref = attend(q, kh, v4, j <= i, scale=0.25)[0]
    assert judge_fp32(o, ref).ok
    for a, b in zip(grads, torch.autograd.grad(ref, leaves, g.double())):
        assert a.shape == b.shape and judge_fp32(a, b).ok, judge_fp32(a, b)


def test_key_group_keeps_enough_programs():
    """passes.softmax.key_group: the most query heads a dK/dV program walks, a divisor of the group, while the
    programs stay at least 4096 on a GPU; the whole group under the interpreter."""
    from effc.passes.softmax import key_group
    assert key_group(16, 32 * 8, 16, interpreting=False) == 1  # 8x2048, one key head: 4096 programs already
    assert key_group(16, 512, 16, interpreting=False) == 2  # 1x32768: 8192 one-head programs
    assert key_group(16, 2048, 16, interpreting=False) == 8  # 1x131072
    assert key_group(6, 4096, 6, interpreting=False) == 6  # a divisor of the group, never past it
    assert key_group(6, 1024, 6, interpreting=False) == 1  # 6144 programs: 2 and 3 would fall under 4096
    assert key_group(4, 2, 4, interpreting=True) == 4 and key_group(1, 2, 4, interpreting=True) == 1
    # the per-query-head copies' budget sets the fewest heads a program: a divisor of the group at or above it
    assert key_group(16, 32 * 8, 16, interpreting=False, fewest=2) == 2
    assert key_group(6, 1024, 6, interpreting=False, fewest=2) == 2 and key_group(6, 1024, 6, False, fewest=4) == 6
    assert key_group(16, 2048, 16, interpreting=False, fewest=2) == 8  # programs may ask for more


def test_copies_heads_keeps_the_copies_to_the_querys_size():
    """passes.softmax.copies_heads: with one key head for 16 query heads, bf16 dK and dV copies per query head
    are twice the query's bytes (two heads a program halve them), fp32 copies four times; none beyond it."""
    from effc.passes.softmax import copies_heads
    q = 2 * 8192 * 16 * 128 * 2
    assert copies_heads(2 * q, q) == 2 and copies_heads(4 * q, q) == 4
    assert copies_heads(q, q) == 1 and copies_heads(q // 8, q) == 1  # a compressed key sequence's copies


def test_document_masks_from_cu_seqlens():
    """Packed sequences: no attention across documents, positions (and FoX's cumsum) restart in each."""
    op = effc.load("forgetting_transformer")
    cu = torch.tensor([0, 13, 40, 57], dtype=torch.int32)
    xs = [x.requires_grad_() for x in _inputs(op, 1, 57, 2, seed=3)]
    o, _ = op(*xs, cu_seqlens=cu, chunk=16)
    ref, _ = op.reference(*[x.detach() for x in xs], cu_seqlens=cu)
    parts = [_naive("forgetting_transformer", [x.detach()[:, a:b] for x in xs], {})
             for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    naive = torch.cat(parts, 1)
    assert judge_fp32(o, ref).ok and judge_fp32(o, naive).ok
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, xs, g)
    leaves = [x.detach().double().requires_grad_() for x in xs]
    out = torch.cat([_naive("forgetting_transformer", [x[:, a:b] for x in leaves], {})
                     for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    for a, b in zip(grads, torch.autograd.grad(out, leaves, g.double())):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)


# A prefix-LM mask (bidirectional over the first `prefix` tokens), a log-sum-exp output, and a
# per-head logit scale and shift: constructs the library does not cover.
PREFIX_LM = """
spec prefix_lm {
  input q: [B, T, H, K]
  input k: [B, T, H, K] key
  input v: [B, T, H, V] key
  output o: [B, T, H, V]
  output lse: [B, T, H]
  param scale = K ** -0.5
  param plen = 20

  score {
    s = (q @ k.T) * (scale * (1 + 0.5 * head)) + 0.25 * head
    mask kpos < plen or kpos <= qpos
  }
  merge {
    o = softmax(s) @ v
    lse = logsumexp(s)
  }
}
"""


def _prefix_lm_naive(q, k, v, prefix=20):
    T, H = q.shape[1], q.shape[2]
    i, j = positions(T)
    mult = torch.tensor([1 + 0.5 * h for h in range(H)], dtype=torch.float64).reshape(1, H, 1, 1)
    return attend(q, k, v, (j < prefix) | (j <= i), bias=0.25 * torch.arange(H).double().reshape(1, H, 1, 1),
                  logit_map=lambda s: s * mult)


def test_prefix_lm_mask_lse_output_and_per_head_scale():
    op = effc.loads(PREFIX_LM)
    xs = [x.requires_grad_() for x in _inputs(op, 2, 50, 2, seed=1)]
    (o, lse), _ = op(*xs, chunk=16)
    no, nlse = _prefix_lm_naive(*[x.detach() for x in xs])
    assert judge_fp32(o, no).ok and judge_fp32(lse, nlse).ok
    (ro, rlse), _ = op.reference(*[x.detach() for x in xs])
    assert judge_fp32(lse, rlse).ok
    go, gl = torch.randn_like(o), torch.randn_like(lse)
    grads = torch.autograd.grad((o, lse), xs, (go, gl))
    leaves = [x.detach().double().requires_grad_() for x in xs]
    no, nlse = _prefix_lm_naive(*leaves)
    for a, b in zip(grads, torch.autograd.grad((no, nlse), leaves, (go.double(), gl.double()))):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)


def test_key_blocks_outside_the_window_are_never_loaded():
    """NaN values in keys and values that no query of the last block can see: if their blocks were
    loaded (and masked elementwise), 0 * NaN would reach the output rows of that block."""
    op = effc.load("sliding_window")
    q, k, v = _inputs(op, 1, 64, 1)
    clean = _naive("sliding_window", [q, k, v], {"window": 16})
    k[:, :32], v[:, :32] = float("nan"), float("nan")  # key blocks 0 and 1 (16 tokens each)
    o, _ = op(q, k, v, window=16, chunk=16)  # query block 3 ([48, 63]) sees keys [33, 63]
    assert torch.isfinite(o[:, 48:]).all()
    assert judge_fp32(o[:, 48:], clean[:, 48:]).ok
    assert torch.isnan(o[:, :47]).any()  # the earlier rows do see the poisoned keys


def _brute(pred, i0, i1, j_range):
    """Visible and mask-free key positions for queries [i0, i1], by enumeration."""
    vis = [j for j in j_range if any(pred(i, j) for i in range(i0, i1 + 1))]
    full = [j for j in j_range if all(pred(i, j) for i in range(i0, i1 + 1))]
    return vis, full


@pytest.mark.parametrize("case", ["causal", "window", "prefix_lm", "strict_window"])
def test_block_ranges_match_brute_force(case):
    W, P = sympy.Symbol("p_window", real=True), sympy.Symbol("p_prefix", real=True)
    f, pred, vals = {
        "causal": (sympy.Le(J, I, evaluate=False), lambda i, j: j <= i, {}),
        "window": (sympy.And(sympy.Le(J, I), sympy.Lt(I - J, W)), lambda i, j: j <= i and i - j < 7,
                   {"p_window": 7}),
        "prefix_lm": (sympy.Or(sympy.Lt(J, P), sympy.Le(J, I)), lambda i, j: j < 11 or j <= i, {"p_prefix": 11}),
        "strict_window": (sympy.And(sympy.Lt(J, I), sympy.Gt(J, I - W)), lambda i, j: i - 7 < j < i,
                          {"p_window": 7}),
    }[case]
    r = formula_range(f, J, I, I0, I1)
    for i0 in range(0, 40, 5):
        i1 = i0 + 4
        vis, full = _brute(pred, i0, i1, range(-5, 60))
        at = {"i0": i0, "i1": i1, **vals}
        lo, hi = numeric(r.lo, at), numeric(r.hi, at)
        assert all(lo <= j <= hi for j in vis), (case, i0, lo, hi, vis)
        if r.has_full:
            flo, fhi = numeric(r.flo, at), numeric(r.fhi, at)
            span = range(int(max(flo, -5)), int(min(fhi, 59)) + 1)
            assert all(j in full for j in span), (case, i0, flo, fhi)
    if case in ("causal", "window"):  # tight: the derived range is exactly the visible one
        at = {"i0": 20, "i1": 24, **vals}
        vis, full = _brute(pred, 20, 24, range(-5, 60))
        assert (numeric(r.hi, at), numeric(r.fhi, at)) == (max(vis), max(full))


def test_schedule_is_explained():
    comp = effc.load("sliding_window").comp
    text = str(comp.legality)
    assert "online softmax" in text and "log-sum-exp" in text
    assert "visible j in [i0 + floor(-p_window) + 1, i1]" in text
    assert "per query block:" in text and "per key block:" in text


def test_factorisable_key_sum_names_the_chunked_state_schedule():
    text = BASE.replace("o = softmax(s) @ v", "o = s @ v")
    with pytest.raises(SpecError) as e:
        compile_text(text, file="lin.attn").legality
    assert "admits the chunked-state (linear) schedule" in e.value.message
    assert str(e.value).startswith("lin.attn:11:9:")
    with pytest.raises(SpecError) as e:  # exp of a pair value: neither
        compile_text(BASE.replace("o = softmax(s) @ v", "o = exp(s) @ v"), file="lin.attn").legality
    assert "neither softmax nor factorisable" in e.value.message


BASE = """\
spec s {
  input q: [B, T, H, K]
  input k: [B, T, H, K] key
  input v: [B, T, H, V] key
  output o: [B, T, H, V]
  score {
    s = q @ k.T
    mask kpos <= qpos
  }
  merge {
    o = softmax(s) @ v
  }
}
"""


def _err(text: str) -> SpecError:
    with pytest.raises(SpecError) as e:
        compile_text(text, file="bad.attn").legality
    return e.value


ERRORS = [
    ("mask-outside-score", BASE.replace("o = softmax(s) @ v", "mask kpos <= qpos\n    o = softmax(s) @ v"),
     11, 5, "masks select the (query, key) pairs of a score stage", "inside 'score"),
    ("softmax-in-score", BASE.replace("s = q @ k.T", "s = softmax(q @ k.T)"),
     7, 9, "'softmax' runs over every key of a query: it belongs in merge", "in merge"),
    ("pair-read-in-merge", BASE.replace("o = softmax(s) @ v", "o = (softmax(s) @ v) * rowmax(s)[:, None]"),
     11, 28, "'s' holds one value per (query, key) pair", "softmax(s) @ x or logsumexp(s)"),
    ("softmax-not-contracted", BASE.replace("o = softmax(s) @ v", "o = rowsum(softmax(s))[:, None] * (softmax(s) @ v)"),
     11, 9, "softmax(s) is a distribution over every key", "softmax(s) @ x"),
    ("key-of-expression", BASE.replace("s = q @ k.T", "s = q @ key(q * 2).T"),
     7, 17, "'key(...)' takes the name of a per-token input or prefix value", "an input declared"),
    ("qpos-in-merge", BASE.replace("o = softmax(s) @ v", "o = softmax(s) @ v * qpos"),
     11, 26, "'qpos' is not visible in merge", None),
    ("cumsum-in-score", BASE.replace("s = q @ k.T", "s = q @ k.T + cumsum(qpos)"),
     7, 19, "'cumsum' runs along the token axis of a whole sequence", "in a prefix stage"),
    ("causal-in-score", BASE.replace("s = q @ k.T", "s = causal(q @ k.T)"),
     7, 9, "a score tile pairs two blocks", "mask kpos <= qpos"),
    ("no-softmax-in-merge", BASE.replace("o = softmax(s) @ v", "o = g * 2").replace(
        "  output o", "  input g: [B, T, H, V]\n  output o"),
     12, 9, "merge reads no softmax over keys", "softmax(s) @ v"),
    ("comparison-chain-syntax", BASE.replace("mask kpos <= qpos", "mask kpos <= "),
     9, 3, "unexpected '}'", "a number"),
    ("score-without-merge-softmax-key", BASE.replace("o = softmax(s) @ v", "o = softmax(s) @ q"),
     11, 9, "'@' inner dims differ: [C, CK] @ [C, K]", "[m, CK] @ [CK, n]"),
    ("prefix-reduces-tokens", BASE.replace("  score {", "  prefix {\n    z = colsum(q)\n  }\n  score {"),
     7, 9, "'colsum' in prefix", "cumsum"),
    ("intra-without-state", BASE.replace("  score {", "  intra {\n    z = q\n  }\n  score {"),
     6, 3, "an intra stage needs a declared state", "a 'state S: [K, V]' line"),
    ("comparison-in-linear-spec", """spec t {
  input q: [B, T, H, K]
  output o: [B, T, H, K]
  state z: [K]
  merge { o = where(q > 0, q, 0) * z }
  inter { z = z + colsum(q) }
}""", 5, 23, "'gt' belongs to the softmax family", None),
    ("mask-not-a-predicate", BASE.replace("mask kpos <= qpos", "mask q"),
     8, 10, "a mask must be a predicate", "mask kpos <= qpos"),
    ("mask-not-a-pair-tile", BASE.replace("mask kpos <= qpos", "mask q > 0"),
     8, 12, "this predicate is [C, K]", "a predicate over qpos, kpos"),
    ("prefix-value-with-unit-axis", BASE.replace("  score {", "  prefix {\n    n = rowsum(q * q)[:, None]\n  }\n"
                                                 "  score {").replace("s = q @ k.T", "s = q @ k.T * n"),
     10, 19, "a prefix value read in score is one per token, [C] or [C, D]; this one is [C, 1]", "without [:, None]"),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_errors_point_at_the_spec(case):
    _, text, line, col, message, expected = case
    e = _err(text) if "spec t" not in text else _linear_err(text)
    assert (e.loc.line, e.loc.column) == (line, col), str(e)
    assert message in e.message, str(e)
    if expected:
        assert e.expected and expected in e.expected, str(e)
    assert str(e).startswith(f"bad.attn:{line}:{col}: error: "), str(e)


def _linear_err(text):
    from effc.passes.lower import lower
    from effc.passes.shapes import infer_shapes
    with pytest.raises(SpecError) as e:
        infer_shapes(lower(parse(text, "bad.attn")))
    return e.value


def test_hybrid_split_needs_reductions_only_from_score():
    """In a hybrid, merge reads the score stage only through its reductions."""
    text = BASE.replace("  output o: [B, T, H, V]\n", "  output o: [B, T, H, V]\n  state S: [K, V]\n").replace(
        "  merge {", "  inter {\n    S = S + k.T @ v\n  }\n  merge {").replace(
        "o = softmax(s) @ v", "o = softmax(s) @ v + (q * kpos) @ S")
    e = _err(text)
    assert "'kpos' is not visible in merge" in e.message, str(e)
    text = text.replace("(q * kpos) @ S", "rowsum(s)[:, None] * (q @ S)")
    with pytest.raises(SpecError, match="merge reads the score stage only through"):
        compile_text(text).legality


def test_compile_cli_prints_the_schedule(tmp_path):
    p = subprocess.run([sys.executable, "-m", "effc.tools.cli", "compile", "forgetting_transformer", "-o", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "schedule online softmax" in p.stdout
    assert "exp of a pair-dependent score does not factor" in p.stdout
    assert "mask 1: j <= i" in p.stdout
    assert (tmp_path / "forgetting_transformer_triton.py").is_file()


def test_state_arguments_are_refused():
    op = effc.load("softmax_attn")
    xs = _inputs(op, 1, 16, 1)
    with pytest.raises(effc.ArgumentError, match="carries no state"):
        op(*xs, output_final_state=True)


def test_visible_pairs_and_flops():
    op = effc.load("sliding_window")
    assert op.visible_pairs(10, window=3) == sum(min(i + 1, 3) for i in range(10))
    assert effc.load("softmax_attn").flops(1, 8, 1, {"K": 16, "V": 16}) == 36 * (2 * 16 + 2 * 16)
    assert math.isclose(effc.load("softmax_full").flops(2, 8, 3, {"K": 16, "V": 16}), 2 * 3 * 64 * 64)
    # a bounded choice: a query keeps at most topk's 16 blocks of 64 keys (the causal ones when fewer)
    assert effc.load("infllm_v2").visible_pairs(4096) == sum(min(i + 1, 16 * 64) for i in range(4096))
    assert effc.load("dsa").visible_pairs(4096) == sum(min(i + 1, 2048) for i in range(4096))  # k = 2048 tokens


def test_visible_pairs_of_long_sequences_from_sampled_rows():
    """Past EXACT_PAIR_ROWS queries the masks are counted on evenly spaced rows (a T x T mask of 131072 tokens
    is 137 GB in float64: `effc bench` at 1x131072 was killed for host memory), close to the exact count."""
    from effc.runtime.softmax_op import EXACT_PAIR_ROWS
    T = 3 * EXACT_PAIR_ROWS + 5
    assert math.isclose(effc.load("softmax_attn").visible_pairs(T), T * (T + 1) // 2, rel_tol=1e-4)
    window = 1000
    assert math.isclose(effc.load("sliding_window").visible_pairs(T, window=window),
                        sum(min(i + 1, window) for i in range(T)), rel_tol=1e-4)


AOT = r"""
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
import effc
from effc.passes.softmax import choose_softmax_tiles
op = effc.load(sys.argv[1])
cfg = choose_softmax_tiles(op.spec, {d: 128 for d in op.spec.dims}, False)
inputs = {d.name for d in op.spec.inputs}
out = {}
for kn, (bm, bn, warps, stages) in (("fwd", cfg.fwd), ("bwd_pre", cfg.pre), ("bwd_dq", cfg.dq), ("bwd_dkv", cfg.dkv)):
    fn = getattr(op.module, f"{op.name}_{kn}_kernel")
    const = dict(H=16, BM=bm, BN=bn, IS_VARLEN=True, DOT_DTYPE=tl.bfloat16, PRECISION="tf32", SAVE=True,
                 **{d: 128 for d in op.spec.dims}, **{f"{d}{s}": 128 for d in op.spec.dims for s in ("_P", "_S")}, **{f"HX_{x}": 4 if x in ("k", "v") else 16 for x in op.sched.leaves})
    const = {c: v for c, v in const.items() if c in fn.arg_names}
    sig = {n: "constexpr" if n in const else "*bf16" if n[:-4] in inputs or n == "o_ptr" or n.endswith("_grad_ptr")
           else "*i32" if n == "cu_ptr" else "*fp32" if n.endswith("_ptr") else "fp32" if n.startswith("p_") else "i32"
           for n in fn.arg_names}
    k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    out[kn] = {"wgmma": "wgmma" in k.asm["ptx"], "shared": k.metadata.shared}
print("AOT " + json.dumps(out))
"""


def test_kernels_compile_for_sm90(tmp_path):
    """Triton's AOT path for Hopper (no GPU needed), at the GPU tile sizes, packed sequences and grouped
    heads: wgmma in every walk, shared memory within the H100's."""
    import json
    import os
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["EFFC_CACHE_DIR"] = str(tmp_path)
    p = subprocess.run([sys.executable, "-c", AOT, "forgetting_transformer"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.split("AOT ", 1)[1])
    assert set(res) == {"fwd", "bwd_pre", "bwd_dq", "bwd_dkv"}
    for kernel in ("fwd", "bwd_dq", "bwd_dkv"):
        assert res[kernel]["wgmma"], kernel
    assert all(r["shared"] <= 232448 for r in res.values()), res


def test_hybrid_swax_state_and_softmax_branch():
    """A state branch (chunked scan) and a sliding-window softmax branch merged: initial and final
    states, forward and gradients against the naive token-by-token reference."""
    from naive_softmax import swax
    from effc.runtime.verify import random_state
    op = effc.load("swax")
    assert "hybrid" in op.comp.schedule_name and "state branch" in str(op.comp.legality)
    # the softmax branch's result enters merge as a sum: its gradient is o's cotangent, passed on without a kernel
    plan = op.linear.comp.plan
    assert [o for _, o in plan.seed_grads] == ["o"]
    assert not {f"bwd_chunks_{x}" for x, _ in plan.seed_grads} & {k.name for k in plan.kernels}
    xs = [x.requires_grad_() for x in _inputs(op, 2, 45, 2)]
    s0 = random_state(op.spec, 2, 2, DIMS)
    o, final = op(*xs, chunk=16, window=8, initial_state=s0, output_final_state=True)
    ref, ref_final = op.reference(*[x.detach() for x in xs], window=8, initial_state=s0, output_final_state=True)
    naive, naive_final = swax(*[x.detach() for x in xs], window=8, initial_state=s0)
    assert judge_fp32(o, ref).ok and judge_fp32(final, ref_final).ok
    assert judge_fp32(o, naive).ok and judge_fp32(final, naive_final).ok
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, xs, g)
    leaves = [x.detach().double().requires_grad_() for x in xs]
    for a, b in zip(grads, torch.autograd.grad(swax(*leaves, window=8, initial_state=s0)[0], leaves, g.double())):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)


def test_two_softmax_groups_and_where_minus_inf():
    """Based in exact pair form (library/based.attn): two online softmaxes in one walk, one of them
    windowed by where(..., -inf) rather than a mask; against Based's feature-map form written in the test."""
    from naive_softmax import based
    op = effc.load("based")
    assert len(op.sched.groups) == 2
    xs = [x.requires_grad_() for x in _inputs(op, 2, 45, 2)]
    o, _ = op(*xs, chunk=16, window=6)
    assert judge_fp32(o, based(*[x.detach() for x in xs], window=6)).ok
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, xs, g)
    leaves = [x.detach().double().requires_grad_() for x in xs]
    for a, b in zip(grads, torch.autograd.grad(based(*leaves, window=6), leaves, g.double())):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)


def test_python_front_end_gives_the_same_ast():
    """@attention_spec: `with prefix:` / `with score:`, mask(...), comparisons and key() map line for line."""
    from effc.dsl.pyfront import parse_function
    from pyfront_softmax import forgetting_transformer
    from effc.library import LIBRARY_DIR
    text = (LIBRARY_DIR / "forgetting_transformer.attn").read_text()
    assert parse_function(forgetting_transformer).specs[0] == parse(text).specs[0]
    op = effc.attention_spec(forgetting_transformer)
    xs = _inputs(op, 1, 20, 1)
    o, _ = op(*xs, chunk=16)
    assert judge_fp32(o, _naive("forgetting_transformer", xs, {})).ok
