"""Head rows (SoftmaxTiles.head_rows): the forward and dQ walks of a choice of key blocks with rows (query token,
query head of a key head's group), each token's chosen blocks walked once for the group (NSA's kernel order).
The generated kernels (interpreter, fp32) against the spec-derived oracle and the naive references, forward
and every gradient, for group sizes that fill the 16 rows, leave rows over (3 heads a group) or need several
tokens a program (per-head choices: 16 tokens); T not a multiple of the block; packed sequences with an empty
one; the choice between the two walks and its errors."""
from __future__ import annotations

import re

import pytest
import torch
from naive_softmax import infllm_v2 as naive_infllm
from test_infllm_v2 import SMALL as INFLLM_SMALL
from test_select_tokens import WINDOW_THRESHOLD

import effc
from effc.errors import ArgumentError, SpecError
from effc.runtime.verify import judge_fp32

# no library spec: InfLLM-V2's group-shared choice over 16-token blocks (tests/test_infllm_v2.py), the score
# averaged (not summed) over the group, five blocks
SMALL_SHARED = INFLLM_SMALL.replace("spec infllm_small", "spec shared_small").replace("shared sum", "shared mean") \
    .replace("topk(g, 4)", "topk(g, 5)")
assert "shared mean" in SMALL_SHARED and "topk(g, 5)" in SMALL_SHARED


def _load(text: str):
    return effc.loads(text, re.search(r"^spec (\w+)", text, re.M).group(1))


def _inputs(T, H, hk, seed=0, B=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, h, 16, generator=g) for h in (H, hk, hk)]


def _naive(q, k, v, block=16):
    """InfLLM-V2's rule with `block`-token blocks and 5 blocks (a mean over the group ranks as its sum does)."""
    from naive_softmax import attend, infllm_choice, positions
    T = q.shape[1]
    chosen = infllm_choice(q, k, block, 5)
    i, j = positions(T)
    return attend(q, k, v, chosen[..., j.reshape(-1) // block].reshape(chosen.shape[:3] + (T,)) & (j <= i))[0]


def _run(op, xs, rows, cu=None):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    o = op(*xs, partition=rows, cu_seqlens=cu)[0]
    assert op.last_config.head_rows == (rows == "heads"), op.last_config
    g = torch.randn(o.shape, generator=torch.Generator().manual_seed(9))
    return o, torch.autograd.grad(o, xs, g), g


def _check(op, xs, naive, cu=None):
    """Head rows against token rows, the oracle and the naive reference: output and every gradient."""
    o, grads, g = _run(op, xs, "heads", cu)
    o_tok, grads_tok, _ = _run(op, xs, "tokens", cu)
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    ref = op.reference(*ref_in, cu_seqlens=cu)[0]
    nv_in = [x.detach().double().requires_grad_() for x in xs]
    spans = [(0, xs[0].shape[1])] if cu is None else list(zip(cu.tolist(), cu[1:].tolist()))
    nv = torch.cat([naive(*[x[:, a:b] for x in nv_in]) for a, b in spans if b > a], 1)
    for got in (o, o_tok):
        assert judge_fp32(got, ref).ok, judge_fp32(got, ref)
        assert judge_fp32(got, nv).ok, judge_fp32(got, nv)
    refs = torch.autograd.grad(ref, ref_in, g.double())
    nvs = torch.autograd.grad(nv, nv_in, g.double())
    for name, a, a_tok, b, c in zip("qkv", grads, grads_tok, refs, nvs):
        assert judge_fp32(a, b).ok, (name, judge_fp32(a, b))
        assert judge_fp32(a, c).ok, (name, judge_fp32(a, c))
        assert judge_fp32(a_tok, b).ok, (name, judge_fp32(a_tok, b))


@pytest.mark.parametrize("H, hk, block", [(16, 1, 16), pytest.param(6, 2, 16, marks=pytest.mark.slow),
                                           pytest.param(8, 2, 32, marks=pytest.mark.slow)])
def test_shared_choice_head_rows(H, hk, block):
    """16 rows of one token; 3 heads a group (5 tokens a program, a row over); key blocks wider than the rows.
    T = 45 or 70: not a multiple of the block (70: two 32-token blocks and a partial one of 6)."""
    op = _load(SMALL_SHARED.replace("block 16", f"block {block}"))
    _check(op, _inputs(45 if block == 16 else 70, H, hk, seed=H), lambda q, k, v: _naive(q, k, v, block))


@pytest.mark.slow
def test_packed_sequences_with_an_empty_one():
    cu = torch.tensor([0, 29, 29, 70], dtype=torch.int32)
    # two key heads of 2 query heads (the group sizes are test_shared_choice_head_rows's)
    _check(_load(SMALL_SHARED), _inputs(70, 4, 2, seed=4), _naive, cu=cu)


@pytest.mark.slow
def test_library_infllm_v2_with_head_rows():
    """64-token blocks at 200 tokens, 4 heads a group (one group: several key heads are the small spec's tests):
    forward and every gradient against the naive reference."""
    op = effc.load("infllm_v2")
    xs = [x.requires_grad_() for x in _inputs(200, 4, 1, seed=2)]
    o = op(*xs, partition="heads")[0]
    assert op.last_config.head_rows
    nv_in = [x.detach().double().requires_grad_() for x in xs]
    nv = naive_infllm(*nv_in)
    assert judge_fp32(o, nv).ok
    g = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad(o, xs, g), torch.autograd.grad(nv, nv_in, g.double())):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)


def test_the_model_picks_by_group_and_length():
    """Block steps a query row for uncorrelated choices, by the key blocks a query block sees (causal: about
    half): head rows for 16 heads a group from 32768 tokens of 64-token blocks on (1 step against 4), not
    at 2048 tokens (the union of 128 tokens' choices is every visible block); a per-head choice past 1024
    visible blocks; the call's choice and the numbers in the config's reasons."""
    from effc.passes.softmax import default_partition, visible_blocks
    infllm, moba = effc.load("infllm_v2"), effc.load("moba").spec
    seen = [visible_blocks(infllm.sched, T, {}) for T in (2048, 32768, 262144)]
    assert seen == [17.0, 257.0, 2049.0]  # (n + 1) / 2 of n blocks, under a causal mask
    assert [default_partition(infllm.spec, 16, n) for n in seen] == ["tokens", "heads", "heads"]
    assert [default_partition(infllm.spec, 1, n) for n in seen] == ["tokens", "tokens", "heads"]
    assert [default_partition(moba, 16, n) for n in seen] == ["tokens", "tokens", "heads"]  # its group is 1
    assert visible_blocks(effc.load("softmax_attn").sched, 2048, {}) is None
    op = _load(SMALL_SHARED)
    op(*_inputs(40, 4, 2))
    assert "the model's for 2 query head(s) a choice and 3 visible key blocks" in str(op.last_config)


@pytest.mark.slow
def test_per_head_choice_with_head_rows():
    """A per-head choice (no group): head rows are 16 tokens of one head, each token's blocks walked once;
    against the oracle and the token rows, forward and every gradient. Two query heads over one key head,
    each choosing its own blocks."""
    text = SMALL_SHARED.replace("    shared mean\n", "").replace("spec shared_small", "spec per_head_small")
    op = _load(text)
    assert not op.comp.legality.select.selection.shared
    xs = _inputs(77, 2, 1, seed=7)
    o, grads, g = _run(op, xs, "heads")
    o_tok, grads_tok, _ = _run(op, xs, "tokens")
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    ref = op.reference(*ref_in)[0]
    assert judge_fp32(o, ref).ok and judge_fp32(o_tok, ref).ok
    for a, a_tok, b in zip(grads, grads_tok, torch.autograd.grad(ref, ref_in, g.double())):
        assert judge_fp32(a, b).ok and judge_fp32(a_tok, b).ok, judge_fp32(a, b)


def test_the_plan_and_config_say_which_partition():
    op = _load(SMALL_SHARED)
    plan = str(op.comp.plan)
    assert "kernel fwd_rows" in plan and "kernel bwd_dq_rows" in plan and "B*H/G" in plan
    assert "partition heads: fwd_rows, bwd_dq_rows, bwd_dkv_rows" in plan
    assert [c.name for c in op.comp.plan.partitions] == ["heads", "tokens"] and op.comp.plan.partition is None
    assert "the model picks per call" in plan
    assert effc.load("softmax_attn").comp.plan.partitions == ()
    uncapped = effc.loads(WINDOW_THRESHOLD.replace("threshold(g, 0.25, 12)", "threshold(g, 0.25)"))
    assert uncapped.comp.plan.partitions == ()  # a choice of key tokens, per head and unbounded: no gathering
    q, k, v = _inputs(40, 4, 2)
    op(q, k, v, partition="heads")
    assert "rows (query token, query head)" in str(op.last_config)
    op(q, k, v, partition="tokens")
    assert not op.last_config.head_rows and "rows (query token" not in str(op.last_config)


def test_partition_misuse_is_an_error():
    q, k, v = _inputs(40, 2, 2)
    with pytest.raises(ArgumentError, match="partition='heads'.*no select stage choosing key blocks"):
        effc.load("softmax_attn")(q, k, v, partition="heads")
    with pytest.raises(ArgumentError, match="partition='columns'.*row partitions 'heads', 'tokens'"):
        _load(SMALL_SHARED)(q, k, v, partition="columns")


def test_a_tuned_partition_is_read_back(tmp_path, monkeypatch):
    """An `effc tune` entry's partition (tools.tune.tune_partition times each) is the call's default."""
    from effc.policy.tiling import Problem
    from effc.policy.tuning import TuningKey, store
    monkeypatch.setenv("EFFC_CACHE_DIR", str(tmp_path))
    op = _load(SMALL_SHARED)
    problem = Problem(1, 40, 4, (("K", 16), ("V", 16)), 1)
    cfg = op.tiles(problem, None)
    knobs = dict(chunk=cfg.chunk, block=cfg.block, num_warps=cfg.num_warps, num_stages=cfg.num_stages, segments=1,
                 defer_merge=0)
    store(TuningKey.of(op, problem, "cpu", torch.float32), knobs, 1.0, knobs, 2.0, {}, partition="tokens")
    tuned = op.config(1, 40, 4, {"K": 16, "V": 16}, "cpu", dtype=torch.float32)
    assert tuned.reasons[0].startswith("tuned") and not tuned.head_rows, tuned
    assert op.config(1, 40, 4, {"K": 16, "V": 16}, "cpu", dtype=torch.float32, partition="heads").head_rows


@pytest.mark.slow
def test_a_branched_spec_gives_the_partition_to_its_selecting_branch():
    """NSA: `partition=` reaches the selected branch only; both partitions give the same output."""
    from effc.runtime.verify import random_inputs
    op = effc.load("nsa")
    xs = random_inputs(op.spec, 1, 70, 2, {d: 16 for d in op.spec.dims}, torch.float32, "cpu", seed=1)
    heads = op(*xs, partition="heads")[0]
    assert [cfg.head_rows for _, cfg in op.last_config.parts] == [False, True, False], op.last_config
    tokens = op(*xs, partition="tokens")[0]
    assert judge_fp32(heads, tokens.double()).ok


@pytest.mark.slow
def test_two_specs_of_one_name_run_their_own_choice():
    """Two specs named alike whose generated source is the same (the select block is a call-time size) keep
    their own custom ops: the second ran the first's choice of 16-token blocks before ops were keyed by spec."""
    first = _load(SMALL_SHARED)
    first(*_inputs(40, 8, 2))
    second = _load(SMALL_SHARED.replace("block 16", "block 32"))
    xs = _inputs(97, 8, 2, seed=8)
    assert judge_fp32(second(*xs)[0], second.reference(*[x.double() for x in xs])[0]).ok


@pytest.mark.slow
def test_head_rows_compute_a_range_of_query_rows():
    """`queries=(lo, hi)` (context parallel's shards, decoding's new rows): head rows start at the first
    computed row in every walk; the other rows are zero with no gradient, as the oracle's."""
    op = _load(SMALL_SHARED)
    xs = [x.requires_grad_() for x in _inputs(90, 8, 2, seed=3)]
    o = op(*xs, partition="heads", queries=(37, 75))[0]
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    ref = op.reference(*ref_in, queries=(37, 75))[0]
    assert judge_fp32(o, ref).ok and not o[:, :37].any() and not o[:, 75:].any()
    g = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad(o, xs, g), torch.autograd.grad(ref, ref_in, g.double())):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)


@pytest.mark.slow  # the fast tier gathers in tests/test_select_tokens.py's decoding
def test_a_choice_of_key_tokens_gathers_with_head_rows():
    """DSA (a shared choice of 20 key tokens, 16 query heads over one key head): head rows gather each token's
    chosen keys for its group's heads (one token a program); forward and the attention's gradients against
    the oracle and the naive reference; fewer than 9 heads a group cannot gather one token."""
    from naive_softmax import dsa
    from test_select_tokens import SMALL_DSA, _dsa_inputs
    op = effc.loads(SMALL_DSA, "dsa_small")
    assert [c.kernels for c in op.comp.plan.partitions][0] == ("fwd_rows", "bwd_dq_rows", "bwd_dkv")
    xs = [x.requires_grad_() for x in _dsa_inputs(45, H=16, hk=1, seed=2)]
    g = torch.randn(1, 45, 16, 16, generator=torch.Generator().manual_seed(5))
    o = op(*xs, partition="heads")[0]
    assert op.last_config.head_rows
    grads = torch.autograd.grad(o, xs[:3], g)
    ref_in = [x.detach().double().requires_grad_(i < 3) for i, x in enumerate(xs)]
    ref = op.reference(*ref_in)[0]
    nv_in = [x.detach().double().requires_grad_(i < 3) for i, x in enumerate(xs)]
    nv = dsa(*nv_in, topk=20)
    assert judge_fp32(o, ref).ok and judge_fp32(o, nv).ok, judge_fp32(o, ref)
    for a, b, c in zip(grads, torch.autograd.grad(ref, ref_in[:3], g.double()),
                       torch.autograd.grad(nv, nv_in[:3], g.double())):
        assert judge_fp32(a, b).ok and judge_fp32(a, c).ok, judge_fp32(a, b)
    few = [x.detach() for x in _dsa_inputs(40, H=4, hk=1, seed=3)]
    with pytest.raises(ArgumentError, match="4 query heads a key head need 4 tokens a program"):
        op(*few, partition="heads")


@pytest.mark.slow
def test_head_rows_with_head_dims_that_are_no_power_of_two():
    """K = 24 and V = 20 (tiles padded to 32, rows stored 16-byte aligned) at 16 heads a group: forward and
    every gradient against the oracle."""
    op = _load(SMALL_SHARED)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, 50, h, d, generator=g).requires_grad_() for h, d in ((16, 24), (1, 24), (1, 20))]
    o = op(*xs, partition="heads")[0]
    assert op.last_config.head_rows
    do = torch.randn_like(o)
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    ref = op.reference(*ref_in)[0]
    assert judge_fp32(o, ref).ok, judge_fp32(o, ref)
    for a, b in zip(torch.autograd.grad(o, xs, do), torch.autograd.grad(ref, ref_in, do.double())):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)
