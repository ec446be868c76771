"""Decoding against a KV cache (SoftmaxOp.decode, runtime/softmax_decode.py): the generated split-KV kernels
and their combine, against the spec's oracle (op.reference on each request's whole sequence, the new
queries' rows) and a naive reference written here; requests of different lengths (0 and 1 included),
several new tokens, grouped K/V heads, a head dim that is not a power of two, one split and several."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import effc
from effc.errors import ArgumentError
from effc.policy.decode import decode_splits
from effc.runtime import softmax_oracle
from effc.runtime.verify import judge_fp32

# a spec not in the library: a capped score with a per-key bias input, a window, and two outputs
CAPPED_LOCAL = """
spec capped_local {
  input q: [B, T, H, K]
  input k: [B, T, H, K] key
  input v: [B, T, H, V] key
  input b: [B, T, H] key
  output o: [B, T, H, V]
  output lse: [B, T, H]
  param scale = K ** -0.5
  param cap = 3.0
  param window = 6

  score {
    s = cap * tanh((q @ k.T) * scale / cap) + b
    mask qpos - window < kpos <= qpos
  }
  merge {
    o = softmax(s) @ v
    lse = logsumexp(s)
  }
}
"""


def _load(name, tmp_path):
    if name != "capped_local":
        return effc.load(name)
    path = tmp_path / "capped_local.attn"
    path.write_text(CAPPED_LOCAL)
    return effc.load(str(path))


def _sequences(op, B, T, H, Hk, K, V, seed=0):
    """Every input over whole sequences (B, T, ...): K/V-side inputs with Hk heads."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for d in op.spec.inputs:
        heads = Hk if "key" in d.annotations else H
        shape = (B, T, heads) + tuple({"K": K, "V": V}[n] for n in d.dims[3:])
        x = torch.randn(shape, generator=g)
        if "logdecay" in d.annotations:
            x = F.logsigmoid(x + 1.0)
        xs.append(x)
    return xs


def _naive(name, x: dict, n: int, tq: int, H: int, params: dict) -> list[torch.Tensor]:
    """The outputs of positions n - tq .. n - 1 of one sequence (x: (T, Hx, ...) tensors), written from the
    mechanisms' formulas: a full score matrix, a mask, a softmax."""
    rep = lambda t: t[:n].repeat_interleave(H // t.shape[1], dim=1)  # grouped heads shared
    q, k, v = rep(x["q"]), rep(x["k"]), rep(x["v"])
    K = q.shape[-1]
    i = torch.arange(n - tq, n, dtype=torch.float32)[:, None]
    j = torch.arange(n, dtype=torch.float32)[None, :]
    s = torch.einsum("ihd,jhd->hij", q[n - tq:], k) * K ** -0.5
    keep = j <= i
    if name == "sliding_window":
        keep = keep & (j > i - params["window"])
    if name == "alibi":
        slope = 2.0 ** (-8.0 * (torch.arange(H) + 1) / H)
        s = s - slope[:, None, None] * (i - j)
    if name == "forgetting_transformer":
        cum = rep(x["f"]).cumsum(0).T  # (H, n)
        s = s + cum[:, n - tq:, None] - cum[:, None, :]
    if name == "capped_local":
        s = 3.0 * torch.tanh(s / 3.0) + rep(x["b"]).T[:, None, :]
        keep = keep & (j > i - 6)
    s = s.masked_fill(~keep, -math.inf)
    o = torch.einsum("hij,jhd->ihd", torch.softmax(s, -1), v)
    if name == "gated_attention":
        o = o * torch.sigmoid(rep(x["g"])[n - tq:])
    if name == "capped_local":
        return [o, torch.logsumexp(s, -1).T]
    return [o]


def _filled_cache(op, xs, lens, tq, tmax, H, params):
    """A cache holding each request's first lens[b] tokens: inputs as they are, prefix values from the
    forward's pre-pass over the sequence."""
    B = xs[0].shape[0]
    tokens = [torch.stack([x[b, int(lens[b]):int(lens[b]) + tq] for b in range(B)]) for x in xs]
    cache = op.new_cache(*tokens, max_len=tmax)
    named = {d.name: x for d, x in zip(op.spec.inputs, xs)}
    dims = {n: s for d, x in zip(op.spec.inputs, xs) for n, s in zip(d.dims[3:], x.shape[3:])}
    pre = softmax_oracle.prefix_values(op.spec, named, op.param_values(dims, params), H, torch.float32)
    values = {**named, **pre}
    for name, c in cache.items():
        for b in range(B):
            c[b, :int(lens[b])] = values[name][b, :int(lens[b])]
    return tokens, cache


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _check(name, tmp_path, lens, tq, H, Hk, K, V, params, splits):
    op = _load(name, tmp_path)
    B = len(lens)
    lens = torch.tensor(lens, dtype=torch.int32)
    T = int(lens.max()) + tq
    xs = _sequences(op, B, T, H, Hk, K, V)
    tokens, cache = _filled_cache(op, xs, lens, tq, T + 2, H, params)
    outs = []
    for n_split in splits:
        c = {k: t.clone() for k, t in cache.items()}
        outs.append(_tuple(op.decode(*tokens, cache=c, cache_seqlens=lens, splits=n_split, **params)))
        assert op.last_decode["splits"] == n_split
        # a program serves the query heads sharing their key-side heads (FoX's cached gate is per query head)
        assert op.last_decode["group"] == H // max(t.shape[2] for t in cache.values())
        for b in range(B):  # the new tokens' key-side values were written after the context
            n = int(lens[b])
            assert torch.equal(c["k"][b, n:n + tq], tokens[1][b]) and not c["k"][b, n + tq:].any()
    for b in range(B):
        n = int(lens[b]) + tq
        ref = _tuple(op.reference(*(x[b:b + 1, :n] for x in xs), dtype=torch.float32, queries=(n - tq, n),
                                  **params)[0])
        naive = _naive(name, {d.name: x[b] for d, x in zip(op.spec.inputs, xs)}, n, tq, H, params)
        for o in outs:
            for got, want, mine in zip(o, ref, naive):
                assert judge_fp32(got[b], want[0, n - tq:]).ok, (name, b, judge_fp32(got[b], want[0, n - tq:]))
                assert judge_fp32(got[b], mine).ok, (name, b, judge_fp32(got[b], mine))
    for o in outs[1:]:  # one split and several: the same answer up to the rescale's rounding
        for a, c in zip(outs[0], o):
            assert torch.allclose(a, c, atol=1e-5, rtol=1e-5)
    return op


def test_decode_fox_grouped_heads_odd_dim_lengths_zero_and_one(tmp_path):
    """FoX (a prefix cumsum continued from the cache, a gate in the score): requests with 0, 1 and 21 cached
    tokens, 3 new tokens each, 4 query heads over 2 K/V heads, K = 60; 1 and 3 splits agree."""
    _check("forgetting_transformer", tmp_path, [0, 1, 21], 3, 4, 2, 60, 24, {}, (1, 3))


def test_decode_spec_not_in_library(tmp_path):
    """A capped score, a per-key bias input, a window of 6 and a logsumexp output, across splits."""
    _check("capped_local", tmp_path, [0, 13, 30], 2, 2, 1, 16, 16, {}, (1, 4))


@pytest.mark.slow
@pytest.mark.parametrize("name,params", [("softmax_attn", {}), ("sliding_window", {"window": 5}), ("alibi", {}),
                                         ("gated_attention", {}), ("forgetting_transformer", {})])
def test_decode_library_specs(name, params, tmp_path):
    _check(name, tmp_path, [0, 1, 17, 40], 5, 4, 2, 60, 16, params, (1, 2, 8))


def test_decode_step_by_step_from_an_empty_cache(tmp_path):
    """FoX decoded from nothing in calls of 2, 1 and 3 tokens: each call continues the cache the previous one
    wrote (the cumsum carried through the cached F), each output the oracle's on the whole prefix."""
    op = effc.load("forgetting_transformer")
    xs = _sequences(op, 2, 6, 2, 2, 16, 16)
    cache = op.new_cache(*(x[:, :1] for x in xs), max_len=8)
    lens = torch.zeros(2, dtype=torch.int32)
    for lo, hi in ((0, 2), (2, 3), (3, 6)):
        o = op.decode(*(x[:, lo:hi] for x in xs), cache=cache, cache_seqlens=lens)
        ref, _ = op.reference(*(x[:, :hi] for x in xs), dtype=torch.float32, queries=(lo, hi))
        assert judge_fp32(o, ref[:, lo:hi]).ok, (lo, judge_fp32(o, ref[:, lo:hi]))
        lens += hi - lo
    assert torch.allclose(cache["F"][:, :6], xs[3].cumsum(1), atol=1e-5)


def test_decode_bad_arguments_name_the_argument():
    op = effc.load("softmax_attn")
    tokens = [torch.randn(2, 1, 2, 16) for _ in range(3)]
    cache = op.new_cache(*tokens, max_len=8)
    lens = torch.tensor([3, 7], dtype=torch.int32)
    with pytest.raises(ArgumentError, match="cache 'v' holds Tmax=7 tokens, but 'k' holds 8"):
        op.decode(*tokens, cache={**cache, "v": torch.zeros(2, 7, 2, 16)}, cache_seqlens=lens)
    with pytest.raises(ArgumentError, match="cache_seqlens must lie in"):  # 8 + 1 new token > Tmax
        op.decode(*tokens, cache=cache, cache_seqlens=lens + 1)
    with pytest.raises(ArgumentError, match="cache_seqlens must lie in"):
        op.decode(*tokens, cache=cache, cache_seqlens=lens - 4)
    with pytest.raises(ArgumentError, match="cache 'v' must have shape"):
        op.decode(*tokens, cache={**cache, "v": torch.zeros(2, 8, 2, 8)}, cache_seqlens=lens)
    with pytest.raises(ArgumentError, match="cache 'k' has dtype torch.float16"):
        op.decode(*tokens, cache={**cache, "k": cache["k"].half()}, cache_seqlens=lens)
    with pytest.raises(ArgumentError, match="cache_seqlens must be an int32 tensor"):
        op.decode(*tokens, cache=cache, cache_seqlens=lens.long())
    with pytest.raises(ArgumentError, match="cache must hold k, v"):
        op.decode(*tokens, cache={"k": cache["k"]}, cache_seqlens=lens)
    with pytest.raises(ArgumentError, match="1 to 64 new tokens"):
        op.decode(*(torch.randn(2, 65, 2, 16) for _ in range(3)), cache=cache, cache_seqlens=lens)


PREFIX_SPECS = {
    "revcumsum": "prefix { G = revcumsum(f) }\n  score { s = (q @ k.T) * scale + key(G)\n mask kpos <= qpos }",
    "cumsum(...) runs over the whole sequence": "prefix { G = cumsum(f) * 0.5 }\n  score { s = (q @ k.T) * scale + "
                                                "key(G)\n mask kpos <= qpos }",
}


@pytest.mark.parametrize("what", sorted(PREFIX_SPECS))
def test_decode_refuses_a_prefix_it_cannot_continue(what, tmp_path):
    text = ("spec p {\n  input q: [B, T, H, K]\n  input k: [B, T, H, K] key\n  input v: [B, T, H, V] key\n"
            "  input f: [B, T, H]\n  output o: [B, T, H, V]\n  param scale = K ** -0.5\n  " + PREFIX_SPECS[what]
            + "\n  merge { o = softmax(s) @ v }\n}\n")
    path = tmp_path / "p.attn"
    path.write_text(text)
    op = effc.load(str(path))
    tokens = [torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2)]
    cache = op.new_cache(*tokens, max_len=4)
    with pytest.raises(NotImplementedError, match=what.replace("(", r"\(").replace(")", r"\)")):
        op.decode(*tokens, cache=cache, cache_seqlens=torch.zeros(1, dtype=torch.int32))


SELECT_SPECS = Path(__file__).parent / "specs"


@pytest.mark.parametrize("name", ["moba_max_window", "infllm_v2"])
def test_decode_with_a_select_stage(name):
    """Sparse decoding: each new query chooses its blocks of the cached context (select kernels) and walks
    them (the forward's walk), every request in one launch of each (their DECODE variant: requests of
    different lengths, one with an empty context). moba_max_window (16-token blocks, top 3 with two forced, so
    the choice bites at these lengths) and infllm_v2 (group-shared, grouped heads) against the oracle on each
    request's whole sequence and, for infllm_v2, the naive reference."""
    from naive_softmax import NAIVE_SOFTMAX
    op = effc.load(str(SELECT_SPECS / f"{name}.attn") if name == "moba_max_window" else name)
    lens, tq, H, Hk = torch.tensor([0, 37, 150], dtype=torch.int32), 3, 4, 2
    xs = _sequences(op, 3, 153, H, Hk if name == "infllm_v2" else H, 16, 16)
    tokens, cache = _filled_cache(op, xs, lens, tq, 160, H, {})
    assert tuple(cache) == ("k", "v")
    o = op.decode(*tokens, cache=cache, cache_seqlens=lens)
    assert op.last_decode["kernels"].startswith("the select stage's and the forward walk's (head rows)")
    assert op.last_decode["G"] == (H // Hk if name == "infllm_v2" else 1)  # a shared choice: the group's heads
    for b in range(3):
        n = int(lens[b]) + tq
        whole = [x[b:b + 1, :n] for x in xs]
        ref, _ = op.reference(*whole, dtype=torch.float32, queries=(n - tq, n))
        assert judge_fp32(o[b], ref[0, n - tq:]).ok, (b, judge_fp32(o[b], ref[0, n - tq:]))
        if name == "infllm_v2" and n > 64:
            naive = NAIVE_SOFTMAX[name](*whole)[0, n - tq:]
            assert judge_fp32(o[b], naive).ok, (b, judge_fp32(o[b], naive))
        assert torch.equal(cache["k"][b, n - tq:n], tokens[1][b])


def test_step_with_a_select_stage_from_an_empty_context():
    op = effc.load(str(SELECT_SPECS / "moba_max_window.attn"))
    xs = _sequences(op, 1, 70, 2, 2, 16, 16, seed=3)
    context = None
    for t in range(68, 70):
        context = tuple(x[:, :t] for x in xs) if context is None else context
        o, context = op.step(*(x[:, t] for x in xs), context=context)
        ref, _ = op.reference(*(x[:, :t + 1] for x in xs), dtype=torch.float32, queries=(t, t + 1))
        assert judge_fp32(o, ref[:, t]).ok, (t, judge_fp32(o, ref[:, t]))


def test_decode_with_a_select_stage_and_a_prefix_is_refused():
    text = (SELECT_SPECS / "moba_max_window.attn").read_text().replace(
        "  select {", "  prefix {\n    qn = q * 2\n  }\n  select {").replace("g = q @", "g = qn @")
    op = effc.loads(text)
    with pytest.raises(NotImplementedError, match="select stage and a prefix stage"):
        op.cache_names
    tokens = [torch.randn(1, 2, 16) for _ in range(3)]
    with pytest.raises(NotImplementedError, match="select stage and a prefix stage"):  # no oracle fallback
        op.step(*tokens)


def test_decode_splits_fill_the_gpu_without_thin_splits():
    # few (request, head) programs: split until 2 per multiprocessor, capped by the key blocks (>= 2 a split)
    assert decode_splits(8, 1024, 132) == 32
    assert decode_splits(8, 20, 132) == 8
    # enough programs already: no split
    assert decode_splits(4096, 1024, 132) == 1
    for bh in (1, 3, 64, 300):
        for blocks in (1, 2, 7, 100):
            n = decode_splits(bh, blocks, 132)
            assert n >= 1 and n & (n - 1) == 0 and (n == 1 or blocks // n >= 2)


@pytest.mark.parametrize("name", ["nsa_cmp", "nsa_small"])
def test_decode_with_a_key_sequence_and_with_branches(name):
    """Keys over a key sequence of their own (NSA's compressed keys, passed whole at each call) decode through
    the forward's kernels per request; a spec with branches decodes each branch in order, sharing one cache
    (nsa_small: compressed keys, selected blocks and a window, merged by gates). Against the oracle on each
    request's whole sequence and the naive NSA written from the paper; the cache is written for the new
    tokens."""
    from naive_softmax import nsa
    from effc.runtime.verify import random_inputs
    path = str(Path(__file__).parent / "specs" / "nsa_small.attn")
    op = effc.load(path if name == "nsa_small" else name)
    lens, tq, H = torch.tensor([0, 37, 150], dtype=torch.int32), 3, 2
    xs = [x.detach() for x in random_inputs(op.spec, 3, 153, H, {"K": 16, "V": 16}, seed=5)]
    ks = op.spec.keyseq.dim
    over_t = [d.dims[1] == "T" for d in op.spec.inputs]
    tokens = [torch.stack([x[b, int(lens[b]):int(lens[b]) + tq] for b in range(3)]) if t else x
              for x, t in zip(xs, over_t)]
    cache = op.new_cache(*tokens, max_len=160)
    assert tuple(cache) == (() if name == "nsa_cmp" else ("k", "v")), (ks, tuple(cache))
    for c, x in ((cache[n], xs[[d.name for d in op.spec.inputs].index(n)]) for n in cache):
        for b in range(3):
            c[b, :int(lens[b])] = x[b, :int(lens[b])]
    o = op.decode(*tokens, cache=cache, cache_seqlens=lens)
    for b in range(3):
        n = int(lens[b]) + tq
        whole = [x[b:b + 1, :n] if t else x[b:b + 1] for x, t in zip(xs, over_t)]
        ref, _ = op.reference(*whole, dtype=torch.float32)
        assert judge_fp32(o[b], ref[0, n - tq:]).ok, (b, judge_fp32(o[b], ref[0, n - tq:]))
        if name == "nsa_small":
            naive = nsa(*whole, block=16, topk=4, window=24, stride=8, length=16)[0, n - tq:]
            assert judge_fp32(o[b], naive).ok, (b, judge_fp32(o[b], naive))
        for x, c in cache.items():  # the new tokens' keys and values, written after the context
            assert torch.equal(c[b, n - tq:n], tokens[[d.name for d in op.spec.inputs].index(x)][b])


def test_decode_with_branches_grouped_heads_and_its_errors():
    """nsa_small with 4 query heads over 2 key/value heads (the select branch's choice shared per group), a
    request with a 5-token context and one with 90; then a cache missing an entry and a forward-only knob."""
    from naive_softmax import nsa
    from effc.runtime.verify import random_inputs
    op = effc.load(str(Path(__file__).parent / "specs" / "nsa_small.attn"))
    lens, tq = torch.tensor([5, 90], dtype=torch.int32), 2
    xs = [x.detach() for x in random_inputs(op.spec, 2, 92, 4, {"K": 16, "V": 16}, seed=7)]
    xs = [x[:, :, :2].contiguous() if "key" in d.annotations else x for d, x in zip(op.spec.inputs, xs)]
    over_t = [d.dims[1] == "T" for d in op.spec.inputs]
    tokens = [torch.stack([x[b, int(lens[b]):int(lens[b]) + tq] for b in range(2)]) if t else x
              for x, t in zip(xs, over_t)]
    cache = op.new_cache(*tokens, max_len=100)
    names = [d.name for d in op.spec.inputs]
    for n, c in cache.items():
        for b in range(2):
            c[b, :int(lens[b])] = xs[names.index(n)][b, :int(lens[b])]
    o = op.decode(*tokens, cache=cache, cache_seqlens=lens)
    for b in range(2):
        n = int(lens[b]) + tq
        whole = [x[b:b + 1, :n] if t else x[b:b + 1] for x, t in zip(xs, over_t)]
        naive = nsa(*whole, block=16, topk=4, window=24, stride=8, length=16)[0, n - tq:]
        assert judge_fp32(o[b], naive).ok, (b, judge_fp32(o[b], naive))
    with pytest.raises(ArgumentError, match=r"cache must hold k, v \(op.cache_names\), got k"):
        op.decode(*tokens, cache={"k": cache["k"]}, cache_seqlens=lens)
    with pytest.raises(ArgumentError, match="chunk=: a knob of the whole-sequence call"):
        op.decode(*tokens, cache=cache, cache_seqlens=lens, chunk=16)


SELECT_DECODE_AOT = r"""
import json
import effc
from effc.codegen.triton.aot import compile_softmax_sm90
out = {}
for name in ("infllm_v2", "dsa"):  # a choice of key blocks, of key tokens (its head rows gather)
    op = effc.load(name)
    for kernel in ("fwd", "fwd_rows"):  # the head rows: 16-row tiles, mma.sync
        for d in (False, True):
            ptx = compile_softmax_sm90(op, kernel, decode=d).asm["ptx"]
            out[f"{name} {kernel} {d}"] = "wgmma" in ptx or "mma.sync" in ptx
print("AOT " + json.dumps(out))
"""


def test_select_decode_variant_compiles_for_sm90(tmp_path):
    """The forward walks of a select spec (token rows and head rows) in their DECODE variant (cache rows and new
    tokens) through Triton's AOT path for sm_90, beside the plain ones."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["EFFC_CACHE_DIR"] = str(tmp_path)
    p = subprocess.run([sys.executable, "-c", SELECT_DECODE_AOT], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.split("AOT ", 1)[1]) == {f"{n} {k} {d}": True for n in ("infllm_v2", "dsa")
                                                         for k in ("fwd", "fwd_rows") for d in (False, True)}


def test_decode_groups_query_heads_that_share_key_heads():
    """A program's rows are (new token, query head) pairs of the heads sharing a key head, up to 64 rows; the
    group size divides the heads a key head serves."""
    from effc.policy.decode import decode_group
    assert decode_group(32, [8, 8], 1) == 4 and decode_group(32, [8, 8], 16) == 4
    assert decode_group(32, [8], 17) == 2  # 4 heads x 17 tokens exceed 64 rows
    assert decode_group(16, [16, 16], 1) == 1  # no grouped heads
    assert decode_group(30, [6], 13) == 1 and decode_group(30, [6], 12) == 5  # divisors of 5 only
    assert decode_group(8, [1], 64) == 1


def test_decode_bench_rows(capsys):
    """`effc bench --decode` on the CPU with a stand-in timer (the interpreter times nothing): a dense spec with
    grouped heads beside SDPA, a select spec, and a chunked-scan spec skipped with the reason."""
    from effc.tools.bench_decode import run_decode_bench
    rows = run_decode_bench(["softmax_attn", "moba", "gla"], [(2, 70)], 4, 2, 16, 1,
                            timer=lambda fn: (fn(), 2.0)[1])
    dense, sparse, linear = rows
    assert dense["decode"]["group"] == 2 and dense["peer"].startswith("torch SDPA") and dense["speedup"] == 1.0
    assert sparse["decode"]["kernels"].startswith("the select stage's")
    assert "does not decode against a KV cache" in linear["skipped"]
    assert dense["cache_GBps"] == 2 * 2 * 71 * 2 * 16 * 4 / 2.0 / 1e6  # k and v, fp32 on the CPU
    table = capsys.readouterr().out
    assert "cache GB/s" in table and "skipped" in table


def test_decode_with_a_top_p_selection_and_its_param():
    """The top-p criterion (a param, p) chooses in the decode launch as in the forward: 16-token blocks so the
    choice bites, requests with 5, 60 and 0 cached tokens, against the oracle on each request's sequence."""
    from effc.runtime.verify import random_inputs
    op = effc.loads((Path(effc.__file__).parent / "library" / "topp.attn").read_text().replace("block 64", "block 16"))
    lens, tq = torch.tensor([5, 60, 0], dtype=torch.int32), 2
    xs = [x.detach() for x in random_inputs(op.spec, 3, 62, 2, {"K": 16, "V": 16}, seed=3)]
    tokens = [torch.stack([x[b, int(n):int(n) + tq] for b, n in enumerate(lens)]) for x in xs]
    cache = op.new_cache(*tokens, max_len=70)
    for name, c in cache.items():
        x = xs[[d.name for d in op.spec.inputs].index(name)]
        for b, n in enumerate(lens.tolist()):
            c[b, :n] = x[b, :n]
    o = op.decode(*tokens, cache=cache, cache_seqlens=lens, p=0.6)
    assert op.last_decode["kernels"].startswith("the select stage's")
    for b, n in enumerate((lens + tq).tolist()):
        ref, _ = op.reference(*(x[b:b + 1, :n] for x in xs), dtype=torch.float32, queries=(n - tq, n), p=0.6)
        assert judge_fp32(o[b], ref[0, n - tq:]).ok, (b, judge_fp32(o[b], ref[0, n - tq:]))


def test_decode_grouped_rows_with_the_head_builtin(tmp_path):
    """ALiBi reads `head` per query head: with 4 query heads over 2 K/V heads a program's rows are (token, head)
    pairs of two heads, each row's slope its own; against the oracle and the naive reference, 1 and 2 splits."""
    _check("alibi", tmp_path, [0, 9, 30], 2, 4, 2, 16, 16, {}, (1, 2))
