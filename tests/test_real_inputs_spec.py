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


# ---- specs that compiled to code that failed at run time ----------------------------------------------------
def _check_op(op, T=40, H=2, dims=None, **call):
    """The op against its oracle: outputs, final states and every input's gradient."""
    from effc.runtime.verify import random_inputs
    xs = [x.requires_grad_() for x in random_inputs(op.spec, 1, T, H, dims or {"K": 16, "V": 16}, seed=0)]
    o, final = op(*xs, output_final_state=bool(op.spec.states), **call)
    ref, ref_final = op.reference(*xs, output_final_state=bool(op.spec.states))
    assert judge_fp32(o, ref).ok, judge_fp32(o, ref)
    if op.spec.states:
        assert judge_fp32(final, ref_final).ok, judge_fp32(final, ref_final)
    d_o = torch.randn(o.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(o, xs, d_o, allow_unused=True)  # an input only the state reads: no gradient
    want = torch.autograd.grad(ref, xs, d_o.double(), allow_unused=True)
    for d, x, a, b in zip(op.spec.inputs, xs, got, want):
        a, b = (torch.zeros_like(x) if g is None else g for g in (a, b))
        assert judge_fp32(a, b).ok, f"d{d.name}: {judge_fp32(a, b)}"
    return xs, o


SOFTMAX_HEAD = """
  input q: [B, T, H, K]
  input k: [B, T, H, K] key
  input v: [B, T, H, V] key
  input f: [B, T, H] logdecay
  output o: [B, T, H, V]
"""


def _causal_softmax(q, k, v, bias=0.0, scale=1.0):
    s = torch.einsum("bthk,bshk->bhts", q.double(), k.double()) * scale + bias
    T = q.shape[1]
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -torch.inf)
    return torch.einsum("bhts,bshv->bthv", s.softmax(-1), v.double())


def test_hybrid_whose_merge_does_not_read_its_state():
    """The output is the softmax branch's reduction itself; the state is still carried (the final state)."""
    op = effc.loads("spec h {" + SOFTMAX_HEAD + """
  state S: [K, V]
  chunk 16
  score { s = q @ k.T
    mask kpos <= qpos }
  intra { b = cumsum(f) }
  merge { o = softmax(s) @ v }
  inter { S = S * exp(last(b)) + (k * exp(last(b) - b)[:, None]).T @ v }
}""")
    (q, k, v, f), o = _check_op(op)
    assert judge_fp32(o, _causal_softmax(q, k, v)).ok


@pytest.mark.parametrize("score", [
    "s = q @ k.T\n    s = q @ k.T * 0.5",  # the second statement recomputes the first's matmul
    "a = key(f)\n    b = key(f)\n    s = q @ k.T * 0.5 + a - b",  # one key-side tile under two names
    "s = q @ k.T\n    t = s\n    s = s * 0.5\n    s = s + t * 0 + f - key(f) - f + key(f)",
], ids=["recomputed", "two-names", "reassigned"])
def test_score_that_assigns_a_name_twice(score):
    op = effc.loads("spec r {" + SOFTMAX_HEAD + "  score {\n    " + score + "\n    mask kpos <= qpos\n  }\n"
                    "  merge { o = softmax(s) @ v }\n}")
    (q, k, v, f), o = _check_op(op)
    assert judge_fp32(o, _causal_softmax(q, k, v, scale=0.5)).ok


def test_local_reassigned_then_copied():
    """`y = x` after `x` was reassigned: the copy must not take over the name of x's latest value."""
    op = effc.loads("""spec c {
  input q: [B, T, H, K]
  input v: [B, T, H, V]
  output o: [B, T, H, V]
  state S: [K, V]
  chunk 16
  intra {
    x = q * 2
    x = x * 3
    y = x
    z = x + y
  }
  merge { o = z @ S }
  inter { S = S + q.T @ v }
}""")
    _check_op(op)


PREFIX_NORMALISED = "spec n {" + SOFTMAX_HEAD + """
  prefix { qn = q * rsqrt(rowsum(q * q))[:, None] }
  score { s = qn @ k.T
    mask kpos <= qpos }
  merge { o = softmax(s) @ v }
}"""


def test_prefix_value_with_a_broadcast(tmp_path):
    """A [C, 1] intermediate of a prefix value is no kernel argument (its kernels had `1: tl.constexpr`)."""
    from typer.testing import CliRunner
    from effc.tools.cli import app
    op = effc.loads(PREFIX_NORMALISED)
    (q, k, v, f), o = _check_op(op)
    assert judge_fp32(o, _causal_softmax(q / q.double().norm(dim=-1, keepdim=True), k, v)).ok
    spec = tmp_path / "n.attn"
    spec.write_text(PREFIX_NORMALISED)
    r = CliRunner().invoke(app, ["compile", str(spec), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    compile((tmp_path / "out" / "n_triton.py").read_text(), "n_triton.py", "exec")


def test_generated_source_that_does_not_compile_is_an_internal_error(tmp_path, monkeypatch):
    """A code generator bug is reported naming the spec and the kernel, before anything is written or imported."""
    from typer.testing import CliRunner
    import effc.codegen.triton.softmax_emit as emit
    from effc.tools.cli import app
    from effc.errors import CodegenError
    from effc.compiler import compile_text
    good = emit.emit_softmax_module
    monkeypatch.setattr(emit, "emit_softmax_module", lambda *a: good(*a).replace("BM: tl.constexpr", "1: tl.constexpr", 1))
    with pytest.raises(CodegenError) as info:
        compile_text(PREFIX_NORMALISED).source()
    assert "spec 'n' does not compile" in str(info.value) and "in n_prefix_kernel" in str(info.value)
    spec = tmp_path / "n.attn"
    spec.write_text(PREFIX_NORMALISED)
    r = CliRunner().invoke(app, ["compile", str(spec), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and "internal error" in r.output and "wrote" not in r.output
    assert not (tmp_path / "out").exists()
