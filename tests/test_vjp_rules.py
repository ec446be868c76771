"""passes.vjp_rules: the one table of VJP rules. It covers every op kind of the IR (or says which it does not),
each rule agrees with torch autograd on the oracle's evaluation of its op, and both derived backwards (the
linear family's chunk step, the softmax family's score stage) read it."""
from __future__ import annotations

import pytest
import torch

from effc.compiler import compile_file
from effc.errors import Loc
from effc.ir import ops as O
from effc.ir.nodes import C, Op, TileType, dim
from effc.passes import vjp_rules
from effc.passes.shapes import SCALAR, op_type
from effc.passes.vjp_rules import NO_RULE, RULES, Adjoints, backprop
from effc.runtime.oracle_ops import eval_op

K, V = dim("K"), dim("V")
SIZES = {C: 5, K: 3, V: 4}


def test_every_op_kind_has_a_rule_or_is_named_as_having_none():
    assert set(RULES) | NO_RULE == set(O.ALL)
    assert not set(RULES) & NO_RULE
    assert {"softmax", "logsumexp"} <= NO_RULE  # the softmax schedule differentiates them itself


@pytest.mark.parametrize("kind", sorted(NO_RULE))
def test_an_op_without_a_rule_names_its_kind_and_location(kind):
    loc = Loc("spec.attn", 7, 3)
    e = Adjoints({"x": TileType((C, K)), "y": TileType((C, K)), "_gy": TileType((C, K))})
    e.grad["y"] = "_gy"
    with pytest.raises(NotImplementedError, match=rf"'{kind}' \(spec.attn:7:3\)"):
        backprop(e, [Op("y", kind, ("x",), loc=loc)], lambda v: True)


def test_predicates_carry_no_gradient():
    e = Adjoints({})
    for kind in O.COMPARE + O.LOGIC:
        op = Op("y", kind, ("a",) if kind == "not" else ("a", "b"))
        assert all(c is None for c in RULES[kind](e, op, "_gy"))
    assert e.ops == []


def test_an_exponent_that_needs_a_gradient_is_refused():
    types = {"x": TileType((C, K)), "c": SCALAR, "_gy": TileType((C, K))}
    op = Op("y", "pow", ("x", "c"), loc=Loc("spec.attn", 2, 9))
    e = Adjoints({**types, "y": types["x"]})
    e.grad["y"] = "_gy"
    backprop(e, [op], lambda v: v == "x")  # a constant exponent (a param): only x is differentiated
    assert "x" in e.grad
    e.grad = {"y": "_gy"}
    with pytest.raises(NotImplementedError, match=r"exponent of '\*\*' \(spec.attn:2:9\)"):
        backprop(e, [op], lambda v: True)


# (kind, argument shapes or float constants, extra constant args) for each rule the chunk oracle evaluates
CASES = [(k, [(C, K)]) for k in O.UNARY] + [
    ("copy", [(C, K)]), ("transpose", [(C, K)]), ("expand", [(C,), 0.0, 1.0]), ("expand", [(K,), 1.0, 0.0]),
    ("last", [(C, K)]), ("cumsum", [(C, K)]), ("revcumsum", [(C,)]),
    ("causal", [(C, C)]), ("strict", [(C, C), -1e4]), ("unit_lower_inv", [(C, C)]),
    ("rowsum", [(C, K)]), ("colsum", [(C, K)]), ("rowmax", [(C, K)]), ("colmax", [(C, K)]), ("maxall", [(C, K)]),
    ("matmul", [(C, K), (K, V)]), ("pow", [(C, K), 3.0]), ("pow", [(C,), 0.5]),
    # a broadcast operand: its adjoint is summed over the axes it was broadcast along
    *[(k, [(C, K), (C, 1)]) for k in ("add", "sub", "mul", "div", "maximum", "minimum")],
    *[(k, [(1, K), (C, K)]) for k in ("add", "sub", "mul", "div")],
    ("mul", [(C, K), ()]), ("add", [(K,), (C, K)]), ("sub", [(C, K), 2.0]),
]


def _value(shape, positive: bool):
    x = torch.randn(1, 1, *[SIZES.get(d, 1) for d in shape], dtype=torch.float64)
    # away from the kinks of abs / relu / max and in the domain of log / sqrt / pow
    return x.abs() + 0.5 if positive else x + 0.3 * torch.sign(x)


@pytest.mark.parametrize("kind, args", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_each_rule_agrees_with_autograd(kind, args):
    """The rule's IR, evaluated by the oracle, against torch autograd through the oracle's forward op."""
    torch.manual_seed(0)
    names = [f"x{i}" if isinstance(a, tuple) else a for i, a in enumerate(args)]
    types = {n: TileType(tuple(a)) for n, a in zip(names, args) if isinstance(a, tuple)}
    positive = kind in ("log", "log2", "sqrt", "rsqrt", "pow", "div")
    env = {n: _value(t.shape, positive).requires_grad_() for n, t in types.items()}
    if kind == "unit_lower_inv":
        env = {n: (0.3 * x).detach().requires_grad_() for n, x in env.items()}
    n_args = 1 if kind == "expand" else len(args)
    op = Op("y", kind, tuple(names))
    op = op.typed(op_type(op, [types.get(n, SCALAR) for n in names[:n_args]]))
    c = SIZES[C]
    y = eval_op(op, [env.get(n, n) for n in names], c, c)
    gy = torch.randn_like(y)
    want = torch.autograd.grad(y, [env[n] for n in types], gy)

    e = Adjoints({**types, "y": op.type, "_gy": op.type})
    e.grad["y"] = "_gy"
    backprop(e, [op], lambda v: v in types)
    vals = {**{n: x.detach() for n, x in env.items()}, "y": y.detach(), "_gy": gy}
    for a in e.ops:
        vals[a.out] = eval_op(a, [vals[x] if isinstance(x, str) else x for x in a.args], c, c)
    for n, w in zip(types, want):
        got = vals[e.grad[n]]
        assert e.types[e.grad[n]] == types[n]  # brought back to the argument's own shape
        assert torch.allclose(got.reshape(w.shape), w, atol=1e-9, rtol=1e-7), (kind, n)


# ---- both backwards read this one table -----------------------------------------------------------------

FAMILIES = {"linear": "gla", "softmax": "softcap"}  # a library spec whose backward differentiates a `mul`


@pytest.mark.parametrize("family", FAMILIES)
def test_a_rule_in_the_table_is_seen_by_both_backwards(monkeypatch, family):
    seen = []
    rule = RULES["mul"]

    def spy(e, op, g):  # the table's rule, noting the op it differentiated
        seen.append(op.out)
        return rule(e, op, g)

    monkeypatch.setitem(vjp_rules.RULES, "mul", spy)
    backward = compile_file(FAMILIES[family]).backward
    assert seen, f"the {family} backward did not read passes.vjp_rules.RULES"
    assert str(backward)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_rule_missing_from_the_table_is_missing_for_both_backwards(monkeypatch, family):
    monkeypatch.delitem(vjp_rules.RULES, "mul")
    with pytest.raises(NotImplementedError, match=r"no derivative rule for tile op 'mul' \(.*\.attn:\d+:\d+\)"):
        _ = compile_file(FAMILIES[family]).backward
