"""library/infllm_v2.attn (InfLLM-V2): a group-shared top-k of key blocks with the sink and local blocks
forced. With 16-token blocks and k = 4 so the choice bites at test lengths: the kernels (interpreter, fp32)
against the oracle and the naive reference written from the paper (tests/naive_softmax.infllm_v2), forward
and every gradient; T not a multiple of the block, grouped heads, packed sequences with an empty one."""
from __future__ import annotations

import pytest
import torch
from naive_softmax import infllm_v2

import effc
from effc.runtime.verify import judge_fp32, max_err

SMALL = '''
import "infllm_v2.attn"
spec infllm_small extends infllm_v2 {
  select {
    block 16
    g = q @ blockmean(k).T
    mask kblock < qblock
    force kblock == 0
    force kblock == qblock
    force kblock == qblock - 1
    shared sum
    topk(g, 4)
  }
}
'''
CFG = dict(block=16, topk=4)


def _op():
    return effc.loads(SMALL, "infllm_small")


def _inputs(T, H, hk, seed, B=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, h, 16, generator=g).requires_grad_() for h in (H, hk, hk)]


def _check(o, xs, naive):
    assert judge_fp32(o, naive(*[x.detach() for x in xs])).ok
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, xs, g)
    nv = [x.detach().double().requires_grad_() for x in xs]
    for name, a, b in zip("qkv", grads, torch.autograd.grad(naive(*nv), nv, g.double())):
        assert judge_fp32(a, b).ok, (name, judge_fp32(a, b))


@pytest.mark.parametrize("T, H, hk", [(93, 2, 2), (93, 4, 2), (70, 4, 1)])  # T: not a multiple of 16
def test_forward_and_gradients_against_the_paper(T, H, hk):
    op = _op()
    xs = _inputs(T, H, hk, seed=T + H + hk)
    o, _ = op(*xs, chunk=16)
    ref, _ = op.reference(*[x.detach() for x in xs])
    assert max_err(ref, infllm_v2(*[x.detach() for x in xs], **CFG)) < 1e-10  # the oracle chooses the same
    assert judge_fp32(o, ref).ok, judge_fp32(o, ref)
    _check(o, xs, lambda *a: infllm_v2(*a, **CFG))


def test_a_group_walks_one_choice_with_the_sink_and_local_blocks():
    op = _op()
    q, k, v = (x.detach() for x in _inputs(93, 4, 2, seed=5))
    chosen = op.select_blocks(q, k, v)  # (B, T, H, nb)
    assert torch.equal(chosen[:, :, 0], chosen[:, :, 1]) and torch.equal(chosen[:, :, 2], chosen[:, :, 3])
    assert not torch.equal(chosen[:, :, 0], chosen[:, :, 2])  # two groups, two choices
    assert chosen[:, :, :, 0].all()  # the sink block, for every query
    t = torch.arange(93)
    assert chosen[0, t, :, t // 16].all() and chosen[0, t[16:], :, t[16:] // 16 - 1].all()
    assert (chosen.sum(-1) <= 4).all() and (chosen.sum(-1)[:, 64:] == 4).all()


def test_packed_sequences_with_an_empty_one():
    op = _op()
    cu = torch.tensor([0, 50, 50, 110], dtype=torch.int32)
    xs = _inputs(110, 4, 2, seed=9)
    o, _ = op(*xs, cu_seqlens=cu)
    cuts = ((0, 50), (50, 110))
    _check(o, xs, lambda *a: torch.cat([infllm_v2(*[x[:, s:e] for x in a], **CFG) for s, e in cuts], 1))


def test_python_front_end_gives_the_library_spec():
    """The same spec through @attention_spec: several force lines and `shared("sum")` map line for line."""
    from effc.dsl import parse
    from effc.dsl.pyfront import parse_function
    from effc.library import LIBRARY_DIR

    def infllm_v2(q: Input("B", "T", "H", "K"), k: Input("B", "T", "H", "K", "key"),  # noqa: F821
                  v: Input("B", "T", "H", "V", "key")) -> Output("o", "B", "T", "H", "V"):  # noqa: F821
        scale = Param(K ** -0.5)  # noqa: F821
        with select:  # noqa: F821
            block(64)  # noqa: F821
            g = q @ blockmean(k).T  # noqa: F821
            mask(kblock < qblock)  # noqa: F821
            force(kblock == 0)  # noqa: F821
            force(kblock == qblock)  # noqa: F821
            force(kblock == qblock - 1)  # noqa: F821
            shared("sum")  # noqa: F821
            topk(g, 16)  # noqa: F821
        with score:  # noqa: F821
            s = (q @ k.T) * scale
            mask(kpos <= qpos)  # noqa: F821
        with merge:  # noqa: F821
            o = softmax(s) @ v  # noqa: F821

    text = (LIBRARY_DIR / "infllm_v2.attn").read_text()
    assert parse_function(infllm_v2).specs[0].stages == parse(text).specs[0].stages


def test_a_shared_choice_is_stored_once_per_head_group(monkeypatch):
    """The group's choice (its lists and each query's chosen blocks) is one row per head group, not one per
    head: 4 query heads on 1 key head store a quarter of what a choice per head would; the walks read the
    group's row, so the output still matches the reference."""
    from effc.runtime import softmax_op
    made = []
    real = softmax_op.selection_buffers
    monkeypatch.setattr(softmax_op, "selection_buffers", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    op = _op()
    xs = [x.detach() for x in _inputs(70, 4, 1, seed=3, B=2)]
    o, _ = op(*xs, chunk=16)
    assert made, "the select stage ran"
    lists = made[-1]
    assert lists["GROUP"] == 4
    assert lists["sel_ptr"].shape[:3] == (2, 70, 1), lists["sel_ptr"].shape
    for name in ("qmap_ptr", "qlist_ptr", "qcnt_ptr"):
        assert lists[name].shape[0] == 2 * 1, (name, lists[name].shape)
    ref, _ = op.reference(*xs)
    assert judge_fp32(o, ref).ok, judge_fp32(o, ref)
