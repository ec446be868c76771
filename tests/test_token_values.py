"""passes.token_values: score values of one side's token with transcendental or rotation work move into the
prefix stage, which the generated prefix kernel computes once per token (passes.softmax_plan.prefix_lowered).
The rewrite on the library's RoPE and on specs nobody wrote (a tanh feature map on the keys, partial RoPE on a
query-side norm), what stays (cheap values, select stages), and the kernels' results against the oracle and
naive references, forward and gradients, packed sequences too."""
from __future__ import annotations

import math

import pytest
import torch

import effc
from effc.compiler import compile_text
from effc.library import LIBRARY_DIR
from effc.runtime.verify import judge_fp32


def _spec(score: str, name: str = "tv") -> str:
    return f"""spec {name} {{
  input q: [B, T, H, K]
  input k: [B, T, H, K] key
  input v: [B, T, H, V] key
  output o: [B, T, H, V]
  param scale = K ** -0.5
  score {{
{score}
    mask kpos <= qpos
  }}
  merge {{
    o = softmax(s) @ v
  }}
}}
"""


TANH_KEYS = _spec("    s = (q @ tanh(k).T) * scale")
CHEAP = _spec("    s = ((q * 2) @ (k - 1).T) * scale")


def _ops(stage) -> dict:
    return {op.out: op for op in stage.ops}


def test_rope_moves_into_the_prefix_and_the_score_reads_it_back():
    c = compile_text((LIBRARY_DIR / "softmax_rope.attn").read_text())
    score, prefix = _ops(c.typed.score), _ops(c.typed.prefix)
    assert (score["qr"].kind, score["qr"].args) == ("query", ("qr__tok",))
    assert (score["kr"].kind, score["kr"].args) == ("key", ("kr__tok",))
    assert {"cos", "sin", "rotate_half"} <= {op.kind for op in prefix.values()}
    assert not {"cos", "sin", "rotate_half"} & {op.kind for op in score.values()}
    assert c.plan.kernels[0].name == "prefix" and c.legality.operand_prefix == {"qr__tok", "kr__tok"}
    assert "qr, kr: one token's values with transcendental or rotation work" in str(c.legality)


def test_cheap_values_and_select_stages_stay():
    assert not compile_text(CHEAP).typed.prefix.ops
    assert not compile_text((LIBRARY_DIR / "infllm_v2.attn").read_text()).typed.prefix.ops


def _inputs(T, H=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, T, H, D, generator=g) for _ in range(3)]


def _naive_tanh(q, k, v):
    T, D = q.shape[1], q.shape[-1]
    s = torch.einsum("bihd,bjhd->bhij", q, torch.tanh(k)) * D ** -0.5
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), v)


@pytest.mark.parametrize("packed", [False, True])
def test_a_moved_key_feature_map_against_the_oracle_and_a_naive_reference(packed):
    op = effc.loads(TANH_KEYS)
    assert not any(op_.kind == "tanh" for op_ in op.comp.typed.score.ops)
    assert any(op_.kind == "tanh" for op_ in op.comp.typed.prefix.ops)
    xs = [x.requires_grad_() for x in _inputs(45)]
    cu = torch.tensor([0, 20, 20, 45], dtype=torch.int32) if packed else None
    o, _ = op(*xs, cu_seqlens=cu)
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    ref, _ = op.reference(*ref_in, cu_seqlens=cu)
    nv_in = [x.detach().double().requires_grad_() for x in xs]
    spans = [(0, 45)] if cu is None else [(0, 20), (20, 45)]
    nv = torch.cat([_naive_tanh(*(x[:, a:b] for x in nv_in)) for a, b in spans], 1)
    assert judge_fp32(o, ref).ok and judge_fp32(o, nv).ok, (judge_fp32(o, ref), judge_fp32(o, nv))
    d_o = torch.randn_like(o)
    for name, a, b, c in zip("qkv", torch.autograd.grad(o, xs, d_o), torch.autograd.grad(ref, ref_in, d_o.double()),
                             torch.autograd.grad(nv, nv_in, d_o.double())):
        assert judge_fp32(a, b).ok and judge_fp32(a, c).ok, (name, judge_fp32(a, b), judge_fp32(a, c))


def test_the_plan_says_the_prefix_runs_as_a_kernel():
    text = str(compile_text(TANH_KEYS).plan)
    assert "kernel prefix" in text and "prefix (kernel `prefix` per token" in text
