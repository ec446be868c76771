"""The select stage (passes.select): MoBA-style top-k over pooled key blocks. The generated kernels
(interpreter, fp32) against the spec-derived oracle and an independent naive reference (tests/naive_softmax:
the choice by explicit loops, then dense masked softmax), forward and every gradient; the choice itself
against the naive one; T not a multiple of the block, grouped heads, packed sequences with an empty one,
ties; and the located errors of misuse."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from naive_softmax import block_choice, moba

import effc
from effc.compiler import compile_text
from effc.dsl import parse
from effc.errors import SpecError
from effc.runtime.verify import judge_fp32, max_err

SPECS = Path(__file__).parent / "specs"
# the library's MoBA with small blocks and k = 2, so the choice bites at test lengths
SMALL_MOBA = '''
import "moba.attn"
spec moba_small extends moba {
  select {
    block 16
    g = q @ blockmean(k).T
    mask kblock < qblock
    force kblock == qblock
    topk(g, 2)
  }
}
'''
# (op, the naive reference's settings)
CASES = {
    "moba_small": (lambda: effc.loads(SMALL_MOBA, "moba_small"), dict(block=16, topk=2)),
    "max_window": (lambda: effc.load(str(SPECS / "moba_max_window.attn")),
                   dict(block=16, topk=3, pool="max", window=2)),
}


def _inputs(T, H=2, hk=None, B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, 16, generator=g) for h in (H, hk or H, hk or H))
    return q, k, v


def _check_grads(op, xs, naive, out, **params):
    """Every gradient of the kernels against the oracle's (autograd, float64) and the naive reference's."""
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, xs, g)
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    ref, _ = op.reference(*ref_in, **params)
    ref_grads = torch.autograd.grad(ref, ref_in, g.double())
    nv_in = [x.detach().double().requires_grad_() for x in xs]
    nv_grads = torch.autograd.grad(naive(*nv_in), nv_in, g.double())
    for name, a, b, c in zip("qkv", grads, ref_grads, nv_grads):
        assert judge_fp32(a, b).ok, (name, judge_fp32(a, b))
        assert judge_fp32(a, c).ok, (name, judge_fp32(a, c))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("T, chunk", [(50, 16), (61, 32)])  # neither a multiple of the 16-token block
def test_forward_and_gradients(case, T, chunk):
    make, cfg = CASES[case]
    op = make()
    xs = [x.requires_grad_() for x in _inputs(T)]
    o, _ = op(*xs, chunk=chunk)
    ref, _ = op.reference(*[x.detach() for x in xs])
    naive = moba(*[x.detach() for x in xs], **cfg)
    assert max_err(ref, naive) < 1e-10  # the oracle's choice and the naive one agree
    assert judge_fp32(o, ref).ok, judge_fp32(o, ref)
    assert judge_fp32(o, naive).ok, judge_fp32(o, naive)
    _check_grads(op, xs, lambda *a: moba(*a, **cfg), o)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_choice_itself_matches_the_naive_one(case):
    make, cfg = CASES[case]
    op = make()
    q, k, v = _inputs(70, H=3, seed=1)
    chosen = op.select_blocks(q, k, v)  # (B, T, H, nb)
    naive = block_choice(q, k, cfg["block"], cfg["topk"], cfg.get("pool", "mean"), cfg.get("window", 1))
    assert chosen.shape == (1, 70, 3, 5)
    assert torch.equal(chosen.permute(0, 2, 1, 3), naive)
    # the choice bites: the last query block keeps k of its 5 blocks
    assert int(chosen[0, -1, 0].sum()) == cfg["topk"]


def test_dense_attention_differs():
    """The choice is not a no-op: the output differs from causal attention over every block."""
    op = CASES["moba_small"][0]()
    xs = _inputs(64)
    o, _ = op(*xs)
    dense, _ = effc.load("softmax_attn")(*xs)
    assert max_err(o, dense) > 1e-2


def test_ties_go_to_the_lower_block_index():
    """Keys all equal: every block's gate ties, so the choice is the own block and the lowest indices."""
    op = CASES["moba_small"][0]()
    q, _, v = _inputs(80)
    k = torch.ones_like(q)
    chosen = op.select_blocks(q, k, v)[0, :, 0]  # (T, nb)
    for i in range(80):
        qb = i // 16
        expect = {qb} | ({0} if qb > 0 else set())
        assert set(torch.nonzero(chosen[i]).flatten().tolist()) == expect, i
    o, _ = op(q, k, v)
    assert judge_fp32(o, moba(q, k, v, block=16, topk=2)).ok


def test_grouped_heads():
    """Keys and values with one head shared by two query heads: each query head chooses on its own."""
    op = CASES["moba_small"][0]()
    xs = [x.requires_grad_() for x in _inputs(45, H=2, hk=1, seed=3)]
    o, _ = op(*xs)
    naive = moba(*[x.detach() for x in xs], block=16, topk=2)
    assert judge_fp32(o, naive).ok, judge_fp32(o, naive)
    _check_grads(op, xs, lambda *a: moba(*a, block=16, topk=2), o)


@pytest.mark.parametrize("gq", [2, 4])
def test_grouped_heads_walked_by_one_dkv_program(monkeypatch, gq):
    """One key head for 4 query heads, each with its own choice: a dK/dV program walks `gq` query heads' lists
    in turn (the runtime's choice forced), its units counted over them when a long list splits."""
    from effc.runtime import softmax_op
    monkeypatch.setattr(softmax_op, "key_group", lambda group, *a: min(group, gq))
    op = CASES["moba_small"][0]()
    xs = [x.requires_grad_() for x in _inputs(61, H=4, hk=1, seed=4)]
    o, _ = op(*xs, chunk=32)
    naive = moba(*[x.detach() for x in xs], block=16, topk=2)
    assert judge_fp32(o, naive).ok, judge_fp32(o, naive)
    _check_grads(op, xs, lambda *a: moba(*a, block=16, topk=2), o)


def test_packed_sequences_with_an_empty_one():
    """Blocks, positions and the choice restart per sequence; an empty sequence has nothing to choose."""
    op = CASES["max_window"][0]()
    cfg = CASES["max_window"][1]
    cu = torch.tensor([0, 37, 37, 90], dtype=torch.int32)
    xs = [x.requires_grad_() for x in _inputs(90, seed=4)]
    o, _ = op(*xs, cu_seqlens=cu)
    parts = [moba(*[x.detach()[:, a:b] for x in xs], **cfg) for a, b in ((0, 37), (37, 90))]
    naive = torch.cat(parts, 1)
    assert judge_fp32(o, naive).ok, judge_fp32(o, naive)
    ref, _ = op.reference(*[x.detach() for x in xs], cu_seqlens=cu)
    assert judge_fp32(o, ref).ok
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, xs, g)
    nv = [x.detach().double().requires_grad_() for x in xs]
    out = torch.cat([moba(*[x[:, a:b] for x in nv], **cfg) for a, b in ((0, 37), (37, 90))], 1)
    for a, b in zip(grads, torch.autograd.grad(out, nv, g.double())):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)


def test_the_library_spec_runs_dense_at_short_lengths():
    """moba.attn itself (block 64, k 16): at 150 tokens every earlier block is chosen, as in causal attention."""
    op = effc.load("moba")
    xs = _inputs(150, seed=5)
    o, _ = op(*xs)
    assert judge_fp32(o, moba(*xs)).ok
    dense = effc.load("softmax_attn")(*xs)[0]
    assert judge_fp32(o, dense).ok


def test_the_schedule_and_plan_say_what_runs():
    comp = compile_text(SMALL_MOBA, "moba_small")
    text = str(comp.legality)
    assert "select: per query, the key blocks of 16 tokens" in text and "ties: the lower block index" in text
    names = [k.name for k in comp.plan.kernels]
    assert names[:3] == ["select_pool", "select", "select_t"]
    src = comp.source()
    assert "for t_sel in tl.range(0, n_sel)" in src and "tl.atomic" not in src


def test_python_front_end_gives_the_same_tree():
    from effc.dsl.pyfront import parse_function

    def moba_py(q: Input("B", "T", "H", "K"), k: Input("B", "T", "H", "K", "key"),  # noqa: F821
                v: Input("B", "T", "H", "V", "key")) -> Output("o", "B", "T", "H", "V"):  # noqa: F821
        scale = Param(K ** -0.5)  # noqa: F821
        with select:  # noqa: F821
            block(16)  # noqa: F821
            g = q @ blockmean(k).T  # noqa: F821
            mask(kblock < qblock)  # noqa: F821
            force(kblock == qblock)  # noqa: F821
            topk(g, 2)  # noqa: F821
        with score:  # noqa: F821
            s = (q @ k.T) * scale
            mask(kpos <= qpos)  # noqa: F821
        with merge:  # noqa: F821
            o = softmax(s) @ v  # noqa: F821

    py_spec = parse_function(moba_py)
    text = SMALL_MOBA.replace('import "moba.attn"\n', "").replace("spec moba_small extends moba {", """spec moba_py {
  input q: [B, T, H, K]
  input k: [B, T, H, K] key
  input v: [B, T, H, V] key
  output o: [B, T, H, V]
  param scale = K ** -0.5""").replace("  }\n}", """  }
  score {
    s = (q @ k.T) * scale
    mask kpos <= qpos
  }
  merge {
    o = softmax(s) @ v
  }
}""")
    assert parse(text).specs[0].stages == py_spec.specs[0].stages


# ---- errors ---------------------------------------------------------------------------------------
def _spec(select: str, score: str = "s = (q @ k.T) * scale\n    mask kpos <= qpos") -> str:
    return f'''spec bad {{
  input q: [B, T, H, K]
  input k: [B, T, H, K] key
  input v: [B, T, H, V] key
  output o: [B, T, H, V]
  param scale = K ** -0.5
  select {{
{select}
  }}
  score {{
    {score}
  }}
  merge {{
    o = softmax(s) @ v
  }}
}}
'''


GOOD = "    block 16\n    g = q @ blockmean(k).T\n    mask kblock < qblock\n    force kblock == qblock\n"


@pytest.mark.parametrize("select, score, message, where", [
    ("    g = q @ blockmean(k).T\n    topk(g, 2)", None, "a select stage needs its key block", "select {"),
    ("    block 24\n    g = q @ blockmean(k).T\n    topk(g, 2)", None, "block 24 is not a power of two", "block 24"),
    (GOOD + "    topk(g, 2)\n    topk(g, 3)", None, "select has two criteria", "topk(g, 3)"),
    (GOOD + "    topq(g, 2)", None, "unknown select criterion 'topq'", "topq(g, 2)"),
    (GOOD, None, "a select stage needs a criterion", "select {"),
    (GOOD + "    topk(g, 2.5)", None, "topk keeps 2.5 blocks", "topk(g, 2.5)"),
    ("    block 16\n    g = q @ k.T + kblock\n    topk(g, 2)", None, "cannot broadcast [C, CK] with [1, NB]",
     "+ kblock"),
    ("    block 16\n    g = q @ blockmean(k).T\n    mask g\n    topk(g, 2)", None, "must be a predicate", "mask g"),
    ("    block 16\n    g = q @ blockmean(k).T + kpos\n    topk(g, 2)", None, "cannot broadcast [C, NB] with [1, CK]", "+ kpos"),
    (GOOD + "    topk(g, 2)", "s = (q @ k.T) * scale + g", "'g' is not visible in score", "scale + g"),
    (GOOD + "    topk(g, 2)", "s = (q @ k.T) * scale + blockmean(k)", "pools a value over each key block",
     "scale + blockmean(k)"),
    ("    block 16\n    g = rowsum(q) + kblock\n    topk(g, 2)", None, "in select: select values are one per",
     "rowsum(q)"),
    ("    block 16\n    g = q @ blockmean(k).T\n    topk(q, 2)", None, "the score of topk is one value per", "topk(q, 2)"),
])
def test_misuse_is_a_located_error(select, score, message, where):
    text = _spec(select, score) if score else _spec(select)
    with pytest.raises(SpecError) as e:
        _ = compile_text(text).typed
    assert message in str(e.value), str(e.value)
    assert e.value.loc is not None and where in e.value.loc.text, (e.value.loc, str(e.value))


def test_every_criterion_parses_and_lowers():
    """topp and threshold (tests/test_select_criteria.py runs them) type as topk does."""
    for line, criterion in (("topp(g, 0.9)", ("topp", 0.9)), ("threshold(g, -1, 4)", ("threshold", -1.0))):
        comp = compile_text(_spec(GOOD + "    " + line))
        assert comp.ir.selection.criterion == criterion
        assert comp.typed.selection is not None


def test_select_without_score_and_call_time_block():
    text = _spec(GOOD + "    topk(g, 2)").replace("  score {\n    s = (q @ k.T) * scale\n    mask kpos <= qpos\n  }\n", "")
    with pytest.raises(SpecError, match="a select stage chooses the key blocks of a score stage"):
        _ = compile_text(text).ir
    op = effc.loads(_spec(GOOD + "    topk(g, 2)"))
    with pytest.raises(SpecError, match="selects key blocks of 16 tokens"):
        op(*_inputs(20), block=32)


@pytest.mark.parametrize("word", ["block", "force", "select"])
def test_the_select_words_are_keywords(word):
    text = _spec(GOOD + "    topk(g, 2)", f"{word} = (q @ k.T) * scale\n    s = {word}\n    mask kpos <= qpos")
    with pytest.raises(SpecError, match="a keyword, not usable as a name"):
        _ = compile_text(text).ir


def test_a_hybrid_with_a_select_stage():
    """tests/specs/swax_select.attn: the softmax branch walks its chosen blocks, the state branch scans; forward,
    final state and every gradient against a naive reference (MoBA's choice, then attention over it, plus the
    token-by-token decayed recurrence)."""
    from naive import diagonal_recurrence
    from naive_softmax import attend, block_choice, positions
    op = effc.load(str(SPECS / "swax_select.attn"))
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 90, 2, 16, generator=g).requires_grad_() for _ in range(3))
    gate = torch.nn.functional.logsigmoid(torch.randn(2, 90, 2, generator=g) + 2).requires_grad_()
    s0 = torch.randn(2, 2, 16, 16, generator=g).requires_grad_()

    def naive(q, k, v, gate, s0):
        i, j = positions(90)
        chosen = block_choice(q, k, 16, 2)
        mask = chosen[..., j.reshape(-1) // 16].reshape(chosen.shape[:3] + (90,)) & (j <= i)
        decay = gate.double().exp()[..., None].expand(q.shape)
        lin, state = diagonal_recurrence(q, k, v, decay, 16 ** -0.5, s0)
        return attend(q, k, v, mask)[0] + lin, state

    o, s = op(q, k, v, gate, initial_state=s0, output_final_state=True, chunk=16)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, gate, s0)]
    no, ns = naive(*leaves)
    assert judge_fp32(o, no).ok and judge_fp32(s, ns).ok, (judge_fp32(o, no), judge_fp32(s, ns))
    w, ws = torch.randn_like(o), torch.randn_like(s)
    ours = torch.autograd.grad((o * w).sum() + (s * ws).sum(), (q, k, v, gate, s0))
    theirs = torch.autograd.grad((no * w.double()).sum() + (ns * ws.double()).sum(), leaves)
    for name, a, b in zip(("q", "k", "v", "g", "s0"), ours, theirs):
        assert judge_fp32(a, b).ok, f"d{name}: {judge_fp32(a, b)}"


def test_a_hybrid_with_a_select_stage_decodes():
    """Its step: the softmax branch's new row chosen over the context (the select stage decodes through the
    forward's kernels), then the state branch's walk on the token; the same as the whole-sequence call."""
    from effc.runtime.verify import random_inputs
    op = effc.load(str(SPECS / "swax_select.attn"))
    xs = random_inputs(op.spec, 1, 40, 2, {"K": 16, "V": 16}, seed=2)
    o, s = op(*xs, output_final_state=True)
    _, s39 = op(*[x[:, :39] for x in xs], output_final_state=True)
    o_t, s_t, _ = op.step(*[x[:, 39] for x in xs], state=s39, context=tuple(x[:, :39] for x in xs))
    assert judge_fp32(o_t, o[:, 39]).ok and judge_fp32(s_t, s).ok
