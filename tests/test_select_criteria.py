"""The select stage's other criteria (passes.select): top-p and threshold, capped or not, and the
group-shared choice for grouped heads. The generated kernels (interpreter, fp32) against the spec-derived
oracle and a naive reference written here (the choice by plain loops over blocks, then dense masked
softmax), forward and every gradient; the choice itself; T not a multiple of the block, packed sequences
with an empty one, ties, a call-time p; and the located errors of misuse."""
from __future__ import annotations

import math

import pytest
import torch

import effc
from effc.compiler import compile_text
from effc.errors import ArgumentError, SpecError
from effc.runtime.verify import judge_fp32, max_err


def _spec(select: str, name: str = "crit", params: str = "") -> str:
    return f'''spec {name} {{
  input q: [B, T, H, K]
  input k: [B, T, H, K] key
  input v: [B, T, H, V] key
  output o: [B, T, H, V]
  param scale = K ** -0.5{params}
  select {{
    block 16
{select}
  }}
  score {{
    s = (q @ k.T) * scale
    mask kpos <= qpos
  }}
  merge {{
    o = softmax(s) @ v
  }}
}}
'''


MOBA_LIKE = "    g = q @ blockmean(k).T\n    mask kblock < qblock\n    force kblock == qblock\n"
# name -> (spec text, the naive reference's rule)
CASES = {
    # top-p with p a param (Twilight's adaptive budget over MoBA's blocks)
    "topp": (_spec(MOBA_LIKE + "    topp(g, p)", params="\n  param p = 0.6"),
             dict(kind="topp", value=0.6)),
    "threshold": (_spec(MOBA_LIKE + "    threshold(g, 0.25)"), dict(kind="threshold", value=0.25)),
    "threshold_cap": (_spec(MOBA_LIKE + "    threshold(g, -0.5, 2)"), dict(kind="threshold", value=-0.5, limit=2)),
    # no library spec: top-p over max-pooled keys with a local window of two blocks, capped at 3 blocks
    "topp_max_window": (_spec("    g = q @ blockmax(k).T\n    mask kblock < qblock\n"
                              "    force qblock - 2 < kblock <= qblock\n    topp(g, 0.5, 3)"),
                        dict(kind="topp", value=0.5, limit=3, pool="max", window=2)),
}
SHARED = _spec(MOBA_LIKE + "    shared sum\n    topp(g, 0.5)")


def naive_choice(q, k, block, kind, value, limit=None, pool="mean", window=1, shared=None):
    """(B, H, T, nb) bool, by plain loops: per query i (block qb = i // block) and key block b, the gate
    q_i . pool(k over b's tokens) (summed or averaged over the query heads of a key head when shared); the
    `window` blocks up to qb are forced, the blocks before qb the candidates, sorted by gate descending
    (ties: the lower index); topp takes candidates while the softmax mass ahead of one is < value,
    threshold those with gate >= value; forced blocks first, the first `limit` of all."""
    B, T, H, _ = q.shape
    hk = k.shape[2]
    nb = -(-T // block)
    q, k = q.double(), k.double()
    gate = torch.zeros(B, H, T, nb, dtype=torch.float64)
    for b in range(nb):
        part = k[:, b * block:(b + 1) * block]
        pooled = part.mean(1) if pool == "mean" else part.amax(1)            # (B, hk, D)
        for h in range(H):
            gate[:, h, :, b] = torch.einsum("btd,bd->bt", q[:, :, h], pooled[:, h // (H // hk)])
    if shared:
        grp = gate.reshape(B, hk, H // hk, T, nb)
        grp = grp.sum(2, keepdim=True) if shared == "sum" else grp.mean(2, keepdim=True)
        gate = grp.expand(B, hk, H // hk, T, nb).reshape(B, H, T, nb)
    chosen = torch.zeros(B, H, T, nb, dtype=torch.bool)
    for bi in range(B):
        for h in range(H):
            for i in range(T):
                qb = i // block
                forced = list(range(max(0, qb - window + 1), qb + 1))
                cands = sorted((x for x in range(qb) if x not in forced), key=lambda x: (-gate[bi, h, i, x].item(), x))
                scores = [gate[bi, h, i, x].item() for x in cands]
                taken = []
                if kind == "topp" and cands:
                    top = max(scores)
                    w = [math.exp(s - top) for s in scores]
                    ahead = 0.0
                    for x, wx in zip(cands, w):
                        if ahead < value or value >= 1:
                            taken.append(x)
                        ahead += wx / sum(w)
                elif kind == "threshold":
                    taken = [x for x, s in zip(cands, scores) if s >= value]
                keep = forced + taken
                for x in keep[:limit] if limit else keep:
                    chosen[bi, h, i, x] = True
    return chosen


def naive_attention(q, k, v, chosen, block):
    """Dense causal softmax attention over the chosen blocks' keys only (grouped heads repeated)."""
    _, T, H, D = q.shape
    rep = H // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * D ** -0.5
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    keep = chosen[..., torch.arange(T) // block] & (j <= i)  # (B, H, T, T)
    s = torch.where(keep, s, torch.tensor(-math.inf, dtype=s.dtype))
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), v)


def naive(q, k, v, block=16, **rule):
    return naive_attention(q, k, v, naive_choice(q.detach(), k.detach(), block, **rule), block)


def _inputs(T, H=2, hk=None, B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, h, 16, generator=g) for h in (H, hk or H, hk or H)]


def _check(op, xs, rule, cu=None, **params):
    """Output and every gradient against the oracle (float64 autograd) and the naive reference."""
    xs = [x.requires_grad_() for x in xs]
    o = op(*xs, cu_seqlens=cu, **params)[0]
    nv_in = [x.detach().double().requires_grad_() for x in xs]
    spans = [(0, xs[0].shape[1])] if cu is None else list(zip(cu.tolist(), cu[1:].tolist()))
    nv = torch.cat([naive(*[x[:, a:b] for x in nv_in], **rule) for a, b in spans if b > a], 1)
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    ref = op.reference(*ref_in, cu_seqlens=cu, **params)[0]
    assert max_err(ref, nv) < 1e-10  # the oracle's choice and the naive one agree
    assert judge_fp32(o, ref).ok, judge_fp32(o, ref)
    assert judge_fp32(o, nv).ok, judge_fp32(o, nv)
    g = torch.randn_like(o)
    for name, a, b, c in zip("qkv", torch.autograd.grad(o, xs, g), torch.autograd.grad(ref, ref_in, g.double()),
                             torch.autograd.grad(nv, nv_in, g.double())):
        assert judge_fp32(a, b).ok, (name, judge_fp32(a, b))
        assert judge_fp32(a, c).ok, (name, judge_fp32(a, c))


# the fast tier runs one case of each criterion; the others (and the longer tests) run in the slow tier
FAST = {"topp", "threshold_cap"}


def _tiered(cases):
    return [c if c in cases else pytest.param(c, marks=pytest.mark.slow) for c in sorted(CASES)]


@pytest.mark.parametrize("case", _tiered(FAST))
def test_forward_and_gradients(case):
    text, rule = CASES[case]
    _check(effc.loads(text), _inputs(61), rule)  # 61: not a multiple of the 16-token block


@pytest.mark.parametrize("case", _tiered({"topp_max_window", "threshold"}))
def test_the_choice_itself_matches_the_naive_one(case):
    text, rule = CASES[case]
    op = effc.loads(text)
    q, k, v = _inputs(100, H=3, seed=1)
    chosen = op.select_blocks(q, k, v).permute(0, 2, 1, 3)  # (B, H, T, nb)
    assert torch.equal(chosen, naive_choice(q, k, 16, **rule))
    counts = chosen[0, :, -1].sum(-1)  # the last query block: the criterion bites (neither 1 nor every block)
    assert 1 < int(counts.max()) < 7 or rule["kind"] == "threshold", counts


def test_topp_is_adaptive_and_p_is_a_param():
    """A larger p keeps more blocks; p = 1 keeps every candidate; p outside (0, 1] is refused at call time."""
    op = effc.loads(CASES["topp"][0])
    q, k, v = _inputs(80, H=1, seed=2)
    sizes = [int(op.select_blocks(q, k, v, p=p)[0, -1, 0].sum()) for p in (0.05, 0.9, 1.0)]
    assert sizes[0] == 2 and sizes[0] < sizes[1] <= sizes[2] == 5, sizes  # own block + >= 1 candidate; all
    with pytest.raises(ArgumentError, match="topp's mass"):
        op.select_blocks(q, k, v, p=1.5)


def test_ties_go_to_the_lower_block_index():
    """Keys all equal: every candidate's mass is the same, so top-p takes the lowest indices first."""
    op = effc.loads(CASES["topp"][0])
    q, _, v = _inputs(80)
    k = torch.ones_like(q)
    chosen = op.select_blocks(q, k, v)[0, :, 0]  # (T, nb)
    for i in range(16, 80):
        qb = i // 16
        n = 0  # candidates 0..qb-1 of mass 1/qb each: taken while the mass ahead is < 0.6
        while n < qb and n / qb < 0.6:
            n += 1
        assert set(torch.nonzero(chosen[i]).flatten().tolist()) == set(range(n)) | {qb}, i


@pytest.mark.slow
def test_packed_sequences_with_an_empty_one():
    text, rule = CASES["topp_max_window"]
    _check(effc.loads(text), _inputs(90, seed=4), rule, cu=torch.tensor([0, 37, 37, 90], dtype=torch.int32))


@pytest.mark.slow
def test_shared_choice_for_grouped_heads():
    """Four query heads over two key heads, `shared sum`: the two heads of a group walk the same blocks,
    chosen on their summed scores; forward, gradients and the choice against the naive reference."""
    op = effc.loads(SHARED)
    rule = dict(kind="topp", value=0.5, shared="sum")
    xs = _inputs(53, H=4, hk=2, seed=5)
    chosen = op.select_blocks(*xs).permute(0, 2, 1, 3)
    assert torch.equal(chosen, naive_choice(xs[0], xs[1], 16, **rule))
    assert torch.equal(chosen[:, 0], chosen[:, 1]) and not torch.equal(chosen[:, 1], chosen[:, 2])
    alone = effc.loads(SHARED.replace("    shared sum\n", "")).select_blocks(*xs).permute(0, 2, 1, 3)
    assert not torch.equal(chosen, alone)  # sharing changes the choice
    _check(op, xs, rule)


def test_shared_mean_without_grouped_heads_is_per_head():
    """Without grouped heads each head is its own group: `shared mean` chooses as an unshared select."""
    q, k, v = _inputs(40, H=2, seed=6)
    a = effc.loads(SHARED.replace("shared sum", "shared mean")).select_blocks(q, k, v)
    b = effc.loads(SHARED.replace("    shared sum\n", "")).select_blocks(q, k, v)
    assert torch.equal(a, b)


def test_the_schedule_and_plan_say_what_runs():
    comp = compile_text(SHARED)
    assert "per query head group (the sum of g over its heads)" in str(comp.legality)
    assert "mass 0.5 of softmax(g)" in str(comp.legality)
    src = comp.source()
    assert "tl.sort(key, 1, descending=True)" in src and "tl.atomic" not in src
    assert "for hh in tl.static_range(GROUP)" in src


# ---- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("select, params, message, where", [
    ("    topp(g, 0)", "", "topp keeps a mass of 0", "0"),
    ("    topp(g, 1.5)", "", "topp keeps a mass of 1.5", "1.5"),
    ("    topp(g, p)", "\n  param p = 2", "topp keeps a mass of 2 (param p's default)", "p"),
    ("    topp(g, q)", "", "the second argument of topp must be a number or a param", "q"),
    ("    topk(g, p)", "\n  param p = 2", "the second argument of topk must be a number", "p"),
    ("    topk(g, 2, 3)", "", "topk takes two arguments", "3"),
    ("    topp(g, 0.5, 2.5)", "", "the cap of topp must be an integer >= 1", "2.5"),
    ("    threshold(g, 0.1, 0)", "", "the cap of threshold must be an integer >= 1", "0"),
    ("    shared max\n    topp(g, 0.5)", "", "shared max: a group's score is the sum or the mean", "shared max"),
    ("    shared sum\n    shared sum\n    topp(g, 0.5)", "", "'shared' is declared twice", "shared sum"),
    ("    mask g > 0\n    shared sum\n    topp(g, 0.5)", "", "reads a per-head value", "g > 0"),
])
def test_misuse_is_a_located_error(select, params, message, where):
    text = _spec("    g = q @ blockmean(k).T\n" + select, params=params)
    with pytest.raises(SpecError) as e:
        _ = compile_text(text).typed
    assert message in str(e.value), str(e.value)
    assert e.value.loc is not None and where in e.value.loc.text, (e.value.loc, str(e.value))


def test_python_front_end_gives_the_same_tree():
    from effc.dsl import parse
    from effc.dsl.pyfront import parse_function

    def crit(q: Input("B", "T", "H", "K"), k: Input("B", "T", "H", "K", "key"),  # noqa: F821
             v: Input("B", "T", "H", "V", "key")) -> Output("o", "B", "T", "H", "V"):  # noqa: F821
        scale = Param(K ** -0.5)  # noqa: F821
        with select:  # noqa: F821
            block(16)  # noqa: F821
            g = q @ blockmean(k).T  # noqa: F821
            mask(kblock < qblock)  # noqa: F821
            shared("sum")  # noqa: F821
            topp(g, 0.5, 4)  # noqa: F821
        with score:  # noqa: F821
            s = (q @ k.T) * scale
            mask(kpos <= qpos)  # noqa: F821
        with merge:  # noqa: F821
            o = softmax(s) @ v  # noqa: F821

    text = _spec("    g = q @ blockmean(k).T\n    mask kblock < qblock\n    shared sum\n    topp(g, 0.5, 4)")
    assert parse(text).specs[0].stages == parse_function(crit).specs[0].stages
