"""The select kernel's streaming over chunks of key blocks (passes.select: a running top-k of (score, block)
keys, then a cut-off key per query). More key blocks than one chunk holds: 300 tokens in 16-token blocks
are 19 key blocks, scored 4 at a time (the chunk width forced small) or 16 at a time (the interpreter's
default), with gates that tie across chunks. The choice against the naive references' loops (ties to the
lower block index, forced blocks first), and the attention against the naive dense masked softmax."""
from __future__ import annotations

import pytest
import torch
from naive_softmax import block_choice, moba
from test_select_criteria import _spec, naive, naive_choice

import effc
from effc.runtime import select_op
from effc.runtime.verify import judge_fp32
from test_select import SMALL_MOBA

T, BLOCK = 300, 16  # 19 key blocks, the last one partial
MOBA_K3 = SMALL_MOBA.replace("moba_small", "moba_k3").replace("topk(g, 2)", "topk(g, 3)")  # k = 3
MOBA_LIKE = "    g = q @ blockmean(k).T\n    mask kblock < qblock\n    force kblock == qblock\n"
# criteria with a bounded list (streamed) and the uncapped threshold (one pass, no list)
CRITERIA = {
    "topp_cap": (_spec(MOBA_LIKE + "    topp(g, 0.7, 4)"), dict(kind="topp", value=0.7, limit=4)),
    "threshold_cap": (_spec(MOBA_LIKE + "    threshold(g, -0.2, 3)"), dict(kind="threshold", value=-0.2, limit=3)),
    "threshold": (_spec(MOBA_LIKE + "    threshold(g, 0.3)"), dict(kind="threshold", value=0.3)),
}


def _tied_inputs(H=1, seed=0):
    """Keys whose blocks 1, 4, 6, 9, 12, 17 are copies of one block: equal gates for every query, in
    different chunks of 4 (and of 16), so the order among them is the tie rule's."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, T, H, 16, generator=g) for _ in range(3))
    for b in (4, 6, 9, 12, 17):
        k[:, b * BLOCK:(b + 1) * BLOCK] = k[:, BLOCK:2 * BLOCK]
    return q, k, v


# the fast tier runs chunks of 4 (several chunks, and the list merged across them); 16 in the slow tier
@pytest.fixture(params=[4, pytest.param(16, marks=pytest.mark.slow)], ids=["chunk4", "chunk16"])
def chunk(request, monkeypatch):
    monkeypatch.setattr(select_op, "select_chunk", lambda bm, n_kb, interpreting: request.param)
    return request.param


def test_topk_over_many_chunks_with_ties(chunk):
    op = effc.loads(MOBA_K3, "moba_k3")
    q, k, v = _tied_inputs()
    chosen = op.select_blocks(q, k, v).permute(0, 2, 1, 3)  # (B, H, T, nb)
    expect = block_choice(q, k, BLOCK, 3)
    assert chosen.shape[-1] == 19 and torch.equal(chosen, expect)
    # the tie bites: some query takes one of the copies and leaves a later copy out
    copies = expect[..., [1, 4, 6, 9, 12, 17]]
    assert bool((copies.any(-1) & ~copies.all(-1)).any())


@pytest.mark.slow
def test_all_gates_tied():
    """Every key equal: each query takes its own block and the lowest indices, whatever chunk they are in."""
    op = effc.loads(MOBA_K3, "moba_k3")
    q, _, v = _tied_inputs()
    k = torch.ones_like(q)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(select_op, "select_chunk", lambda bm, n_kb, interpreting: 4)
        chosen = op.select_blocks(q, k, v)[0, :, 0]
    for i in range(0, T, 7):
        qb = i // BLOCK
        expect = {qb} | set(range(min(qb, 2)))
        assert set(torch.nonzero(chosen[i]).flatten().tolist()) == expect, i


@pytest.mark.parametrize("case", [c if c == "topp_cap" else pytest.param(c, marks=pytest.mark.slow)
                                  for c in sorted(CRITERIA)])
def test_other_criteria_over_many_chunks(case, chunk):
    text, rule = CRITERIA[case]
    op = effc.loads(text)
    q, k, v = _tied_inputs(seed=1)
    chosen = op.select_blocks(q, k, v).permute(0, 2, 1, 3)
    expect = naive_choice(q, k, BLOCK, **rule)
    assert torch.equal(chosen, expect)
    n = expect[0, 0, -1].sum()  # the last query: the criterion chooses some blocks, not all 19
    assert 1 < int(n) < 19, n


def test_attention_over_many_chunks():
    """The walks read the streamed lists: the output equals the naive dense masked softmax."""
    op = effc.loads(MOBA_K3, "moba_k3")
    q, k, v = _tied_inputs(seed=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(select_op, "select_chunk", lambda bm, n_kb, interpreting: 4)
        o, _ = op(q, k, v, chunk=32)
    expect = moba(q, k, v, block=BLOCK, topk=3)
    assert judge_fp32(o, expect).ok, judge_fp32(o, expect)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["topp_cap", "threshold_cap"])
def test_attention_of_other_criteria_over_many_chunks(case):
    text, rule = CRITERIA[case]
    op = effc.loads(text)
    q, k, v = _tied_inputs(seed=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(select_op, "select_chunk", lambda bm, n_kb, interpreting: 4)
        o = op(q, k, v)[0]
    expect = naive(q.double(), k.double(), v.double(), BLOCK, **rule)
    assert judge_fp32(o, expect).ok, judge_fp32(o, expect)
