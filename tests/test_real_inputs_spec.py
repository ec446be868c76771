"""Specs that real users write and the compiler got wrong: powers of negative numbers, specs without a state,
hybrids and score stages off the library's beaten path, masks that are no predicate, param defaults and
nesting that hung or overflowed the compiler, files that are not UTF-8, imports that shadow local names, and
generated source that must parse before it is written."""
import pytest
import torch

import effc
from effc.runtime.verify import judge_fp32

# ---- x ** n for negative x: integer exponents of any sign, folded ones, a runtime (param) exponent ----------
POWERS_LINEAR = """
spec powers {
  input q: [B, T, H, K]
  input k: [B, T, H, K]
  input v: [B, T, H, V]
  input a: [B, T, H]
  output o: [B, T, H, V]
  state S: [K, V]
  param e = 3
  chunk 16
  intra {
    f = q ** 3 + 0.01 * q ** 5 - q ** (1 + 1) + q ** 0 + 0.1 * q ** e
    r = a ** -1
    o_intra = causal(f @ k.T) @ v
  }
  merge { o = (o_intra + f @ S) * r[:, None] }
  inter { S = S + k.T @ v }
}
"""

POWERS_SOFTMAX = """
spec spowers {
  input q: [B, T, H, K]
  input k: [B, T, H, K] key
  input v: [B, T, H, V] key
  input a: [B, T, H] key
  output o: [B, T, H, V]
  param e = 3
  score {
    t = (q @ k.T) * 0.25
    s = 0.1 * t ** 3 + 0.01 * t ** 5 - 0.1 * t ** (1 + 1) + t ** 0 + 0.1 * t ** e + a ** -1
    mask kpos <= qpos
  }
  merge { o = softmax(s) @ v }
}
"""


def _powers(x, e):
    return x ** 3 + 0.01 * x ** 5 - x ** 2 + 1 + 0.1 * x ** e


def _naive_linear(q, k, v, a, e):
    q, k, v, a = (x.double() for x in (q, k, v, a))
    f = _powers(q, e)
    scores = torch.einsum("bthk,bshk->bhts", f, k).tril()  # every earlier token reaches the state
    return torch.einsum("bhts,bshv->bthv", scores, v) / a[..., None]


def _naive_softmax(q, k, v, a, e):
    q, k, v, a = (x.double() for x in (q, k, v, a))
    t = torch.einsum("bthk,bshk->bhts", q, k) * 0.25
    s = 0.1 * t ** 3 + 0.01 * t ** 5 - 0.1 * t ** 2 + 1 + 0.1 * t ** e + (1 / a).transpose(1, 2)[:, :, None, :]
    T = q.shape[1]
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -torch.inf)
    return torch.einsum("bhts,bshv->bthv", s.softmax(-1), v)


# T a multiple of the linear spec's chunk: on padded tokens a = 0 and 1 / a = inf, and autograd through the oracle
# (op.reference) turns 0 * inf into NaN gradients (the kernels zero such ops on padded rows)
def _negative_inputs(T=48, B=1, H=2, K=16, V=16):
    g = torch.Generator().manual_seed(0)
    sign = torch.where(torch.rand(B, T, H, K, generator=g) < 0.75, -1.0, 1.0)
    q = sign * (0.5 + torch.rand(B, T, H, K, generator=g))  # mostly negative, away from 0 (for q ** -1)
    k, v = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, V, generator=g)
    a = -0.5 - torch.rand(B, T, H, generator=g)  # negative, away from 0
    return q, k, v, a


# the score's t = q k^T / 4 comes near 0, where t ** -1 is ill-conditioned: its runtime exponents stay positive
@pytest.mark.parametrize("text, naive, exponents", [(POWERS_LINEAR, _naive_linear, (3.0, 2.0, -1.0)),
                                                    (POWERS_SOFTMAX, _naive_softmax, (3.0, 2.0))],
                         ids=["linear", "softmax"])
def test_powers_of_negative_numbers(text, naive, exponents):
    op = effc.loads(text)
    xs = _negative_inputs()
    leaves = [x.clone().requires_grad_() for x in xs]
    for e in exponents:  # a runtime exponent: odd, even, negative
        want = naive(*xs, e)
        o, _ = op(*leaves, e=e)
        assert judge_fp32(o, want).ok, (e, judge_fp32(o, want))
        d_o = torch.randn(o.shape, generator=torch.Generator().manual_seed(1))
        got = torch.autograd.grad(o, leaves, d_o)
        ref = torch.autograd.grad(op.reference(*leaves, e=e)[0], leaves, d_o.double())
        for name, x, y in zip("q k v a".split(), got, ref):
            assert judge_fp32(x, y).ok, f"d{name} (e={e}): {judge_fp32(x, y)}"


def test_integer_powers_lower_to_products():
    """No log of a negative base anywhere: integer exponents are products and a reciprocal, in the IR."""
    ir = effc.loads(POWERS_LINEAR).comp.ir
    pows = [op for op in ir.intra.ops if op.kind == "pow"]
    assert [op.args[1] for op in pows] == ["e"], pows  # only the runtime exponent stays a power
    assert any(op.kind == "div" and op.args[0] == 1.0 for op in ir.intra.ops)  # a ** -1
