"""On the GPU: every softmax-family library spec (and every spec with branches) in bf16 at B=2, T=4096, H=16, D=128, forward and
gradients, against the float64 oracle; no worse than 2x a PyTorch bf16 reference (the oracle with its
matmul operands rounded to bf16; its gradients through autograd) - the tolerance policy of
effc.runtime.verify. Plus grouped heads with packed sequences, and causal softmax beside SDPA."""
import pytest
import torch

import effc
from effc.compiler import compile_file
from effc.runtime.verify import judge_low_precision, random_inputs, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

B, T, H, D = 2, 4096, 16, 128


def _check(op, xs, params=None, cu=None, grads=True, knobs=None):
    torch.cuda.empty_cache()
    params = params or {}
    xs = [x.requires_grad_(grads) for x in xs]
    o, _ = op(*xs, cu_seqlens=cu, **params, **(knobs or {}))
    g = torch.randn_like(o)
    # allow_unused: inputs read by a select stage alone (dsa's indexer) get no gradient
    ours = torch.autograd.grad(o, xs, g, allow_unused=True) if grads else ()
    exact = [x.detach().double().requires_grad_(grads) for x in xs]
    ref, _ = op.reference(*exact, cu_seqlens=cu, **params)
    ref_g = torch.autograd.grad(ref, exact, g.double(), allow_unused=True) if grads else ()
    low_in = [x.detach().float().requires_grad_(grads) for x in xs]
    low, _ = op.reference(*low_in, cu_seqlens=cu, dtype=torch.float32, matmul_dtype=torch.bfloat16, **params)
    low_g = torch.autograd.grad(low, low_in, g.float(), allow_unused=True) if grads else ()
    assert [a is None for a in ours] == [b is None for b in ref_g]
    verdicts = [("o", judge_low_precision(o, ref, low))]
    verdicts += [(f"d{d.name}", judge_low_precision(a, b, c)) for d, a, b, c in zip(op.spec.inputs, ours, ref_g, low_g)
                 if a is not None]
    print(f"{op.name} {dict(params)}: " + "; ".join(f"{n} {v}" for n, v in verdicts))
    for n, v in verdicts:
        assert v.ok, f"{op.name} {n}: {v}"
    assert torch.isfinite(o).all()
    return o


WALKS = effc.library_names("softmax") + effc.library_names("branched")  # a spec with branches: several walks


@pytest.mark.parametrize("name", WALKS)
def test_bf16_forward(name):
    op = effc.load(name)
    xs = random_inputs(op.spec, B, T, H, {d: D for d in op.spec.dims}, torch.bfloat16, "cuda", seed=3)
    with torch.no_grad():
        _check(op, xs, grads=False)


@pytest.mark.parametrize("name", WALKS)
def test_bf16_gradients(name):
    """Smaller: the float64 oracle keeps every [T, T] intermediate for autograd."""
    op = effc.load(name)
    xs = random_inputs(op.spec, 1, 2048, 8, {d: D for d in op.spec.dims}, torch.bfloat16, "cuda", seed=4)
    _check(op, xs)


def test_sliding_window_short_window_and_gqa_varlen():
    op = effc.load("sliding_window")
    xs = random_inputs(op.spec, 1, 6000, 8, {"K": 128, "V": 128}, torch.bfloat16, "cuda", seed=5)
    xs = [xs[0], xs[1][:, :, :2].contiguous(), xs[2][:, :, :2].contiguous()]  # 8 query heads share 2 key heads
    cu = torch.tensor([0, 1000, 1037, 4100, 6000], dtype=torch.int32, device="cuda")
    _check(op, xs, {"window": 300}, cu)


@pytest.mark.parametrize("name", ["softmax_attn", "infllm_v2"])
@pytest.mark.parametrize("heads_a_program", ["one", "whole group"])
def test_bf16_gradients_with_key_heads_walked_by_one_program(name, heads_a_program, monkeypatch):
    """8 query heads on 2 key heads: each dK/dV program walking its key head's 4 query heads in turn, or one
    query head a program with the per-query-head copies of dK/dV stored in bf16 and summed after (both
    forced: passes.softmax.key_group picks by programs and the copies' memory)."""
    from effc.runtime import softmax_op
    monkeypatch.setattr(softmax_op, "key_group", lambda group, *a: group if heads_a_program == "whole group" else 1)
    op = effc.load(name)
    xs = random_inputs(op.spec, 1, 2048, 8, {d: D for d in op.spec.dims}, torch.bfloat16, "cuda", seed=6,
                       kv_heads=2)
    _check(op, xs)


def test_causal_matches_sdpa():
    op = effc.load("softmax_attn")
    q, k, v = random_inputs(op.spec, B, T, H, {"K": D, "V": D}, torch.bfloat16, "cuda", seed=7)
    o, _ = op(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=True).transpose(1, 2)
    print(f"softmax_attn vs SDPA: rel diff {rel_err(o.float(), ref.float()):.2e}")
    assert rel_err(o.float(), ref.float()) < 1e-2


def test_hybrid_swax_bf16_forward():
    """The hybrid: the softmax branch's kernels, then the state branch's scan (linear family)."""
    from effc.runtime.verify import random_state
    op = effc.load("swax")
    dims = {"K": D, "V": D}
    xs = random_inputs(op.spec, B, T, H, dims, torch.bfloat16, "cuda", seed=8)
    s0 = random_state(op.spec, B, H, dims, "cuda")
    with torch.no_grad():
        o, s = op(*xs, initial_state=s0, output_final_state=True)
        ref, ref_s = op.reference(*xs, initial_state=s0, output_final_state=True)
        low, low_s = op.reference(*xs, initial_state=s0, output_final_state=True, dtype=torch.float32,
                                  matmul_dtype=torch.bfloat16)
    v, vs = judge_low_precision(o, ref, low), judge_low_precision(s, ref_s, low_s)
    print(f"swax: output {v}; final state {vs}")
    assert v.ok and vs.ok


@pytest.mark.parametrize("name", [n for n in effc.library_names("softmax") if (c := compile_file(n)).typed.selection
                                  and not c.legality.select.per_token])
def test_bf16_selection_agrees(name):
    """The select kernel's choice against the exact one (float64 gates from the same bf16 inputs): blocks
    whose gates sit within bf16 rounding of the cut change sides (q and the pooled keys are rounded to bf16
    for the dot, as the 16-bit reference's are). Reports the fraction of (query, block) choices that differ
    from the exact choice, for the kernel and for a naive choice from bf16-rounded gates (tests/naive_softmax):
    the kernel's may not be more than 2x that (plus 0.1%), i.e. no differences beyond bf16's own."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from naive_softmax import NAIVE_CHOICE

    op = effc.load(name)
    q, k, v = random_inputs(op.spec, 1, 2048, 8, {d: D for d in op.spec.dims}, torch.bfloat16, "cuda", seed=4)
    ours = op.select_blocks(q, k, v).permute(0, 2, 1, 3).cpu()          # (B, H, T, nb)
    exact = NAIVE_CHOICE[name](q.cpu(), k.cpu())
    rounded = NAIVE_CHOICE[name](q.cpu(), k.cpu(), round_to=torch.bfloat16)
    ours_off, ref_off = (ours != exact).float().mean().item(), (rounded != exact).float().mean().item()
    print(f"{name}: choices differing from the exact choice: kernel {ours_off:.4%}, bf16 naive {ref_off:.4%} "
          f"(of {exact.numel()} query-block pairs; chosen {exact.float().mean().item():.1%})")
    assert ours_off <= 2 * ref_off + 1e-3


def test_bf16_token_selection_agrees():
    """DSA's choice of 2048 key tokens against the exact one (float64 index scores from the same bf16
    inputs): keys whose scores sit within fp32 rounding of the cut change sides. The kernel's fraction of
    differing (query, key) pairs may not exceed 2x a naive choice from float32 scores (plus 0.01%)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from naive_softmax import dsa_choice

    op = effc.load("dsa")
    xs = random_inputs(op.spec, 1, 3000, 4, {d: D for d in op.spec.dims}, torch.bfloat16, "cuda", seed=4)
    for i in (1, 2, 4):  # one key head (k, v and the indexer key): the four query heads choose together
        xs[i] = xs[i][:, :, :1].contiguous()
    ours = op.select_blocks(*xs)[..., :3000].permute(0, 2, 1, 3).cpu()  # (B, H, T, T)
    exact = dsa_choice(*(x.cpu() for x in xs[3:]))
    rounded = dsa_choice(*(x.cpu() for x in xs[3:]), dtype=torch.float32)
    ours_off, ref_off = (ours != exact).float().mean().item(), (rounded != exact).float().mean().item()
    print(f"dsa: (query, key) choices differing from the exact choice: kernel {ours_off:.5%}, fp32 naive "
          f"{ref_off:.5%} (chosen {exact.float().mean().item():.1%}; every query of >= 2048 keys keeps 2048: "
          f"{bool((ours.sum(-1)[..., 2047:] == 2048).all())})")
    assert ours_off <= 2 * ref_off + 1e-4
    assert (ours.sum(-1)[..., 2047:] == 2048).all()


@pytest.mark.parametrize("name, kv_heads", [("moba", None), ("infllm_v2", None), ("topp", None), ("infllm_v2", 1),
                                            ("dsa", 1), ("dsa", 4)])
def test_bf16_sparse_decode(name, kv_heads):
    """Sparse decoding in one launch for every request (the select stage's kernels and the forward walk in
    their DECODE variant; head rows, DSA's gathering its chosen keys where 16 heads share a key head):
    requests of different lengths, two new tokens each, against the float64 oracle on each request's whole
    sequence, no worse than 2x the bf16 reference."""
    op = effc.load(name)
    lens, tq, Hq = torch.tensor([0, 700, 4000, 2500], dtype=torch.int32, device="cuda"), 2, 16 if kv_heads == 1 else 8
    xs = random_inputs(op.spec, 4, 4002, Hq, {d: D for d in op.spec.dims}, torch.bfloat16, "cuda", seed=6,
                       kv_heads=kv_heads)
    named = dict(zip((d.name for d in op.spec.inputs), xs))
    tokens = [torch.stack([named[d.name][b, int(lens[b]):int(lens[b]) + tq] for b in range(4)])
              for d in op.spec.inputs]
    cache = op.new_cache(*tokens, max_len=4096)
    for n, c in cache.items():
        for b in range(4):
            c[b, :int(lens[b])] = named[n][b, :int(lens[b])]
    o = op.decode(*tokens, cache=cache, cache_seqlens=lens)
    assert op.last_decode["kernels"].startswith("the select stage's")
    for b in range(4):
        n = int(lens[b]) + tq
        whole = [x[b:b + 1, :n] for x in xs]
        ref, _ = op.reference(*(x.double() for x in whole), queries=(n - tq, n))
        low, _ = op.reference(*(x.float() for x in whole), dtype=torch.float32, matmul_dtype=torch.bfloat16,
                              queries=(n - tq, n))
        v = judge_low_precision(o[b:b + 1], ref[:, n - tq:], low[:, n - tq:])
        print(f"{name} request {b} (context {n - tq}): {v}")
        assert v.ok, (b, v)


@pytest.mark.parametrize("name", ["infllm_v2", "moba", "nsa"])
@pytest.mark.parametrize("partition", ["heads", "tokens"])
def test_bf16_row_partitions(name, partition):
    """Both row partitions of a choice of key blocks (head rows: NSA's kernel order) with 8 query heads over one
    key/value head (NSA's, InfLLM-V2's grouped heads), forward and every gradient, T not a multiple of the block."""
    op = effc.load(name)
    xs = random_inputs(op.spec, 1, 2000, 8, {d: D for d in op.spec.dims}, torch.bfloat16, "cuda", seed=6, kv_heads=1)
    _check(op, xs, knobs={"partition": partition})
