"""Branches (passes.branches): several softmax walks in one spec, merged per token. NSA's three branches
(compressed keys over a sequence of their own, selected blocks, a window) against a naive reference
written from the paper (tests/naive_softmax.nsa), forward and every gradient; at test sizes
(tests/specs/nsa_small.attn: 16-token blocks, so the selection bites at T=150) and the library spec at
its own sizes; grouped heads; the split and its located errors."""
from pathlib import Path

import pytest
import torch

import effc
from effc.compiler import compile_text
from effc.errors import SpecError
from effc.runtime.verify import judge_fp32, random_inputs

from naive_softmax import nsa

SMALL = str(Path(__file__).parent / "specs" / "nsa_small.attn")
SMALL_SIZES = dict(block=16, topk=4, window=24, stride=8, length=16)


def _inputs(op, B, T, H, seed=0, key_heads=None):
    xs = random_inputs(op.spec, B, T, H, {"K": 16, "V": 16}, seed=seed)
    if key_heads:  # grouped heads: the key-side inputs have fewer
        xs = [x[:, :, :key_heads].contiguous() if "key" in d.annotations else x for d, x in zip(op.spec.inputs, xs)]
    return [x.requires_grad_() for x in xs]


def _check(op, xs, sizes, **call):
    o, none = op(*xs, chunk=16, **call)
    assert none is None
    ref = nsa(*[x.detach() for x in xs], **sizes)
    assert judge_fp32(o, ref).ok, judge_fp32(o, ref)
    w = torch.randn_like(o)
    ours = torch.autograd.grad(o, xs, w)
    leaves = [x.detach().double().requires_grad_() for x in xs]
    theirs = torch.autograd.grad(nsa(*leaves, **sizes), leaves, w.double())
    for d, a, b in zip(op.spec.inputs, ours, theirs):
        assert judge_fp32(a, b).ok, f"d{d.name}: {judge_fp32(a, b)}"


@pytest.mark.parametrize("T", [150, 64])
def test_three_branches_match_the_naive_reference(T):
    op = effc.load(SMALL)
    xs = _inputs(op, 2, T, 2)
    assert xs[1].shape[1] == -(-T // 8)  # the compressed keys: one per 8 tokens
    _check(op, xs, SMALL_SIZES)


def test_grouped_heads_share_the_selection():
    op = effc.load(SMALL)
    _check(op, _inputs(op, 1, 150, 4, seed=1, key_heads=2), SMALL_SIZES)


def test_a_call_time_param_reaches_the_branch_that_reads_it():
    op = effc.load(SMALL)
    xs = _inputs(op, 1, 100, 2, seed=2)
    _check(op, xs, {**SMALL_SIZES, "window": 10}, window=10)
    with pytest.raises(ValueError, match="unknown argument 'windw'"):
        op(*xs, windw=10)


def test_the_library_spec():
    op = effc.load("nsa")
    assert [p.name for p in op.parts] == ["nsa__cmp", "nsa__slc", "nsa__win"]
    _check(op, _inputs(op, 1, 100, 2, seed=3), {})


def test_the_oracle_is_the_naive_reference():
    op = effc.load(SMALL)
    xs = [x.detach().double() for x in _inputs(op, 2, 150, 2, seed=4)]
    ref, _ = op.reference(*xs)
    assert (ref - nsa(*xs, **SMALL_SIZES)).abs().max() < 1e-12


def test_what_is_not_there_says_so():
    op = effc.load(SMALL)
    xs = _inputs(op, 1, 64, 2)
    with pytest.raises(NotImplementedError, match=r"decodes with decode\(\.\.\.\) and a cache"):
        op.step(*[x[:, 0] for x in xs])
    with pytest.raises(NotImplementedError, match="cu_seqlens"):  # the compressed branch's key sequence
        op(*xs, cu_seqlens=torch.tensor([0, 30, 64], dtype=torch.int32))


def test_the_split_says_what_runs():
    comp = effc.compiler.compile_file(SMALL)
    assert str(comp.split) == ("branches of 'nsa_small', in order: nsa_small__cmp: writes oc per token; "
                               "nsa_small__slc: writes os per token; nsa_small__win: reads them and runs the "
                               "spec's merge")
    last = comp.parts[-1].typed
    assert [d.name for d in last.inputs] == ["q", "k", "v", "gc", "gs", "gw", "oc", "os"]
    assert [d.name for d in comp.parts[0].typed.params] == ["scale"]  # window: only the branch reading it
    assert "# branch spec nsa_small__slc" in str(comp.plan)


BRANCH = """
  branch a {
    output oa: [B, T, H, V]
    score { s = (q @ k.T) * scale
            mask kpos <= qpos }
    merge { oa = softmax(s) @ v }
  }
"""


def _spec(body: str, top: str = "merge { o = oa }", extra: str = "") -> str:
    return ("spec t {\n  input q: [B, T, H, K]\n  input k: [B, T, H, K] key\n  input v: [B, T, H, V] key\n"
            f"  output o: [B, T, H, V]\n  param scale = K ** -0.5\n{extra}{body}\n  {top}\n}}\n")


ERRORS = [
    ("score at the top", _spec(BRANCH, "score { s = q @ k.T }\n  merge { o = oa }"), "'score' inside a branch"),
    ("a state", _spec(BRANCH, extra="  state S: [K, V]\n"), "no state"),
    ("no merge", _spec(BRANCH, ""), "merge { o = ... }"),
    ("no output", _spec(BRANCH.replace("output oa: [B, T, H, V]", "")), "declares no output"),
    ("output not assigned", _spec(BRANCH.replace("oa = softmax", "ob = softmax")), "never assigns"),
    ("output not read", _spec(BRANCH + BRANCH.replace(" a {", " b {").replace("oa", "ob")),
     "never read by the spec's merge"),
    ("reads another branch", _spec(BRANCH + BRANCH.replace(" a {", " b {").replace(
        "oa = softmax(s) @ v", "ob = (softmax(s) @ v) * oa").replace("output oa", "output ob"),
        "merge { o = oa + ob }"), "another branch's output"),
    ("twice", _spec(BRANCH + BRANCH), "declared twice"),
    ("merge reads a branch's own value", _spec(BRANCH, "merge { o = oa * rowsum(s)[:, None] }"), "a value of branch 'a'"),
    ("intra in a branch", _spec(BRANCH.replace("score {", "intra { x = q }\n    score {")),
     "a branch is a softmax walk"),
]


@pytest.mark.parametrize("text, message", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_misuse_is_a_located_error(text, message):
    with pytest.raises(SpecError, match=message) as e:
        compile_text(text, file="t.attn").ir
    assert e.value.loc is not None and e.value.loc.file == "t.attn"


def test_a_spec_extending_one_with_branches_is_refused():
    text = _spec(BRANCH) + "spec u extends t {\n}\n"
    with pytest.raises(SpecError, match="which has branches"):
        compile_text(text, "u", file="t.attn").ir


def test_the_python_front_end_gives_the_same_tree():
    from effc.dsl import parse_file
    from effc.dsl.pyfront import Input, Output, Param, block, branch, force, keypos, mask, merge, parse_function, score
    from effc.dsl.pyfront import select, shared

    def nsa_small(q: Input("B", "T", "H", "K"), kc: Input("B", "S", "H", "K", "key"),
                  vc: Input("B", "S", "H", "V", "key"), k: Input("B", "T", "H", "K", "key"),
                  v: Input("B", "T", "H", "V", "key"), gc: Input("B", "T", "H"), gs: Input("B", "T", "H"),
                  gw: Input("B", "T", "H")) -> Output("o", "B", "T", "H", "V"):
        scale = Param(K ** -0.5)  # noqa: F821
        window = Param(24)
        with branch("cmp", Output("oc", "B", "T", "H", "V")):
            keypos(S, S * 8 + 15)  # noqa: F821
            with score:
                s = (q @ kc.T) * scale
                mask(kpos <= qpos)  # noqa: F821
            with merge:
                oc = softmax(s) @ vc  # noqa: F821
        with branch("slc", Output("os", "B", "T", "H", "V")):
            with select:
                block(16)
                g = q @ blockmean(k).T  # noqa: F821
                mask(kblock < qblock)  # noqa: F821
                force(kblock == 0)  # noqa: F821
                force(kblock == qblock)  # noqa: F821
                force(kblock == qblock - 1)  # noqa: F821
                shared("sum")
                topk(g, 4)  # noqa: F821
            with score:
                s = (q @ k.T) * scale
                mask(kpos <= qpos)  # noqa: F821
            with merge:
                os = softmax(s) @ v  # noqa: F821
        with branch("win", Output("ow", "B", "T", "H", "V")):
            with score:
                s = (q @ k.T) * scale
                mask(qpos - window < kpos <= qpos)  # noqa: F821
            with merge:
                ow = softmax(s) @ v  # noqa: F821
        with merge:
            o = sigmoid(gc)[:, None] * oc + sigmoid(gs)[:, None] * os + sigmoid(gw)[:, None] * ow  # noqa: F821

    assert parse_function(nsa_small).specs == parse_file(SMALL).specs  # the same tree: the same kernels


def test_the_python_front_end_locates_a_bad_branch():
    from effc.dsl.pyfront import Input, Output, branch, parse_function

    def t(q: Input("B", "T", "H", "K")) -> Output("o", "B", "T", "H", "K"):
        with branch(1):
            pass
    with pytest.raises(SpecError, match="is not a branch"):
        parse_function(t)


def test_the_tools_see_the_branches():
    from typer.testing import CliRunner

    from effc.tools.cli import app
    from effc.tools.peers import PEERS, nsa_kv_heads_match, peer_scale
    op = effc.load("nsa")
    assert [p.label for p in PEERS["nsa"]] == ["torch SDPA causal (flash), dense",
                                             "fla parallel_nsa (16 query heads per kv head, own compression; "
                                             "window: flash-attn, else FlexAttention)"]
    assert peer_scale(op, 128) == pytest.approx(128 ** -0.5)
    nsa_kv_heads_match(16, 1)  # fla's parallel_nsa: a row only where effc reads its heads, one a group of 16
    with pytest.raises(ValueError, match="--kv-heads 1"):
        nsa_kv_heads_match(16, 16)
    dims = {"K": 128, "V": 128}
    assert op.flops(1, 4096, 16, dims) == sum(p.flops(1, 4096, 16, dims) for p in op.parts)
    r = CliRunner().invoke(app, ["tune", "nsa", "--dry-run", "--shapes", "2x8192"])
    assert r.exit_code == 0 and r.output.count("branch spec nsa__") == 3 and "tuned as nsa:nsa__slc" in r.output
    r = CliRunner().invoke(app, ["library"])
    assert "branched:" in r.output and "nsa " in r.output
    r = CliRunner().invoke(app, ["show", "nsa", "--stage", "typed"])
    assert r.exit_code == 0 and r.output.count("# branch spec nsa__") == 3


def test_the_last_config_names_every_branch():
    op = effc.load(SMALL)
    op(*_inputs(op, 1, 40, 2))
    cfg = op.last_config
    assert cfg.chunk == 16 and str(cfg).count("nsa_small__") == 3 and cfg.reasons[0].startswith("nsa_small__cmp: ")


def test_context_parallel_refuses_with_the_reason():
    from effc.distributed import context_parallel
    with pytest.raises(NotImplementedError, match="spec with branches"):
        context_parallel(effc.load(SMALL))


def test_a_branch_is_a_spec_of_its_own_to_load_and_tune(monkeypatch):
    """`effc tune` times each branch's walk as the spec `FILE:<spec>__<branch>` (its tuning entry is what the
    branched op's part reads); the budget is shared out in turn."""
    from effc.tools import tune as tune_mod
    part = effc.load(f"{SMALL}:nsa_small__slc")
    assert part.name == "nsa_small__slc" and part.spec.selection is not None
    calls = []

    class Runner:
        sm_count = 132

        def __init__(self, ref, **_):
            calls.append(ref)

        def close(self):
            pass
    monkeypatch.setattr(tune_mod, "GpuRunner", Runner)
    monkeypatch.setattr(tune_mod, "tune_problem", lambda op, problem, *a, **k: (op.name, dict(problem.dims)))
    got = tune_mod.tune(SMALL, [(1, 256)], dims={"K": 32, "V": 32}, budget=30)
    assert calls == [f"{Path(SMALL)}:nsa_small__{b}" for b in ("cmp", "slc", "win")]
    assert got == [(f"nsa_small__{b}", {"K": 32, "V": 32}) for b in ("cmp", "slc", "win")]


def test_torch_compile_traces_the_branches_in_one_graph():
    op = effc.load(SMALL)
    xs = _inputs(op, 1, 40, 2, seed=6)

    def loss(*xs):
        return op(*xs, chunk=16)[0].sum()
    eager = torch.autograd.grad(loss(*xs), xs)
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*xs), xs)
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
