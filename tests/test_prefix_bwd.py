"""passes.prefix_bwd: the prefix stage's backward as a generated kernel (`bwd_prefix`), derived with the VJP
table from the stored values' cotangents to the inputs. Golden on the library's RoPE (linear in q and k: the
kernel loads no input) and on a key feature map nobody wrote (tanh: it recomputes tanh(k)); the kernel against
the oracle and a naive reference with grouped key heads, packed sequences and a padded feature dim."""
from __future__ import annotations

import math

import pytest
import torch

import effc
from effc.compiler import compile_text
from effc.library import LIBRARY_DIR
from effc.runtime.verify import judge_fp32

from test_token_values import TANH_KEYS  # s = (q @ tanh(k).T) * scale, causal


def test_rope_backward_is_the_rotations_transposed():
    plan = compile_text((LIBRARY_DIR / "softmax_rope.attn").read_text()).plan
    text = str(plan.prefix_backward)
    assert "gradients: dq = _r10, dk = _r5" in text
    adjoints = text.split("adjoints:")[1]
    # d(x cos + R(x) sin) = g cos - R(g sin): a rotation and a negation per side, no input read
    assert adjoints.count("rotate_half") == 2 and adjoints.count("neg(") == 2
    assert text.split("adjoints:")[0].count("cos(") == 1  # q's and k's angles are one value
    kernel = plan.kernel("bwd_prefix")
    assert kernel.query_loads == () and kernel.role == "bwd_prefix" and kernel.backward
    assert [a for a in kernel.arg_names if a.endswith("_ptr")] == [
        "qr__tok_grad_ptr", "kr__tok_grad_ptr", "q_grad_ptr", "k_grad_ptr", "cu_ptr"]
    assert "backward: kernel `bwd_prefix`" in str(plan)


def test_a_nonlinear_feature_map_recomputes_its_value():
    plan = compile_text(TANH_KEYS).plan
    pb = plan.prefix_backward
    assert [op.kind for op in pb.recompute] == ["copy", "tanh"]
    assert [op.kind for op in pb.vjp] == ["mul", "sub", "mul"]  # g * (1 - tanh^2)
    assert [x for x, _ in pb.grads] == ["k"] and plan.kernel("bwd_prefix").query_loads == ("k",)


def _naive(q, k, v):
    """Causal softmax attention over tanh(k), heads of k and v shared by groups of q's."""
    rep = q.shape[2] // k.shape[2]
    k, v = torch.tanh(k).repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    T = q.shape[1]
    s = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), v)


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
def test_generated_backward_matches_the_oracle_and_a_naive_reference(packed):
    """K = 24 (a 32-wide padded tile), 4 query heads on 2 key heads (dk summed over each group after the
    kernel), T = 37 or sequences of 20, 0 and 17 tokens."""
    op = effc.loads(TANH_KEYS)
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 37, 4, 24, generator=g), torch.randn(1, 37, 2, 24, generator=g), \
        torch.randn(1, 37, 2, 16, generator=g)
    cu = torch.tensor([0, 20, 20, 37], dtype=torch.int32) if packed else None
    cot = torch.randn(1, 37, 4, 16, generator=g, dtype=torch.float64)

    def grads(fn, dtype):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        o = fn(*leaves)
        return [o.detach()] + list(torch.autograd.grad(o, leaves, cot.to(dtype)))

    def naive(*xs):
        if cu is None:
            return _naive(*xs)
        return torch.cat([_naive(*(x[:, a:b] for x in xs)) for a, b in zip(cu.tolist(), cu.tolist()[1:])], 1)

    got = grads(lambda *xs: op(*xs, cu_seqlens=cu)[0], torch.float32)
    oracle = grads(lambda *xs: op.reference(*xs, cu_seqlens=cu)[0], torch.float64)
    ref = grads(naive, torch.float64)
    for name, a, o, r in zip(("o", "dq", "dk", "dv"), got, oracle, ref):
        assert (o - r).abs().max() < 1e-9, f"{name}: oracle vs naive"
        verdict = judge_fp32(a, o)
        assert verdict.ok, f"{name}: {verdict}"
