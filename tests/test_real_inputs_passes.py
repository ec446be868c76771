"""Passes on inputs a user writes, not the library's: planning time that must not grow exponentially with
the depth of a DAG of shared values (a merge running conjugate-gradient steps), and legality that must not
depend on how a sum is bracketed."""
from __future__ import annotations

import signal
import time
from contextlib import contextmanager

import pytest
import torch

import effc
from effc.passes.autodiff import Adjoints
from effc.passes.fusion import depends
from effc.passes import grad_terms
from effc.compiler import compile_text
from effc.runtime.verify import judge_fp32, random_inputs, random_state

DIMS = {"K": 16, "V": 32}


def cg_spec(steps: int, where: str = "merge") -> str:
    """Conjugate-gradient steps solving `A x = b` row by row, `A x = x * (n c + 1) + (x S) S^T c` (S: [K, V] and
    n: [K] states). Each step reads the previous step's r, p, rr and A p several times, so the backward's
    adjoints form a DAG of shared values whose paths double with every step. `where="merge"`: b = q and the
    output reads the solution; `where="inter"`: b = k and the state update writes it, so the carried state
    adjoint flows back through every step (the reverse scan's split)."""
    ax = lambda x: f"{x} * (n * c + 1.0)[None, :] + ({x} @ S) @ S.T * c"
    rhs = "q" if where == "merge" else "k"
    lines = [f"x0 = {rhs}", f"r0 = {rhs} - {ax('x0')}", "p0 = r0", "rr0 = rowsum(r0 * r0)"]
    for i in range(steps):
        j = i + 1
        lines += [f"Ap{i} = {ax(f'p{i}')}",
                  f"al{i} = rr{i} / (rowsum(p{i} * Ap{i}) + 1.0)",
                  f"x{j} = x{i} + al{i}[:, None] * p{i}",
                  f"r{j} = r{i} - al{i}[:, None] * Ap{i}",
                  f"rr{j} = rowsum(r{j} * r{j})",
                  f"p{j} = r{j} + (rr{j} / (rr{i} + 1.0))[:, None] * p{i}"]
    cg = "\n    ".join(lines)
    if where == "merge":
        merge, write = f"{cg}\n    o = o_intra + x{steps} @ S", "k"
    else:
        merge, write = "o = o_intra + (q * exp(b)[:, None]) @ S", f"x{steps}"
    inter = f"{cg}\n    " if where == "inter" else ""
    return f"""
spec cg{steps}_{where} {{
  input q: [B, T, H, K]
  input k: [B, T, H, K]
  input v: [B, T, H, V]
  input g: [B, T, H] logdecay
  output o: [B, T, H, V]
  state S: [K, V]
  state n: [K]
  param c = 0.01
  chunk 16
  intra {{
    b = cumsum(g)
    o_intra = causal((q * exp(b)[:, None]) @ (k * exp(-b)[:, None]).T) @ v
  }}
  merge {{
    {merge}
  }}
  inter {{
    bl = last(b)
    {inter}S = S * exp(bl) + ({write} * exp(bl - b)[:, None]).T @ v
    n = n * exp(bl) + colsum(k * k * exp(bl - b)[:, None])
  }}
}}
"""


@contextmanager
def deadline(seconds: float):
    """Fail (rather than hang) when the block runs past `seconds`."""
    def expired(*_):
        raise TimeoutError
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except TimeoutError:  # raised deep in a recursion: report it without that traceback
        pytest.fail(f"still running after {seconds} s", pytrace=False)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# Before memoising the splits, planning took 0.1, 0.1, 1.3, 37 s for 1-4 merge steps (2 shared cores), and
# 0.1, 0.1, 0.6, 7.5 s for 1-4 inter steps (then x13 a step); now well under a second each, up to 12 steps.
@pytest.mark.parametrize("where,steps", [("merge", 1), ("merge", 2), ("merge", 3), ("merge", 4), ("inter", 6)])
def test_conjugate_gradient_steps_plan_in_polynomial_time(where, steps):
    t = time.perf_counter()
    with deadline(20.0):
        plan = compile_text(cg_spec(steps, where)).plan
    assert plan.kernels and time.perf_counter() - t < 20.0


def test_a_gradient_splits_into_at_most_max_terms():
    """Terms are paths through the ops linear in the adjoint: 2739 for 3 merge steps unbounded. A value with
    more than MAX_TERMS stays one term, so the split is bounded too."""
    comp = compile_text(cg_spec(4))
    bwd = comp.backward
    adjoint = depends(bwd.ops, {s for s, _ in bwd.seeds})
    b = Adjoints(bwd.types(comp.typed), prefix="_t")
    for x, g in bwd.input_grads:
        if g is not None:
            with deadline(20.0):
                terms = grad_terms.split_terms(bwd.ops, g, adjoint, b)
            assert 1 <= len(terms) <= grad_terms.MAX_TERMS


def _grads(fn, leaves, d_o, d_s):
    o, s = fn()
    torch.autograd.backward([o, *(s if isinstance(s, tuple) else (s,))], [d_o, *d_s])
    g = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    return o.detach(), g


@pytest.mark.parametrize("where", ["merge", "inter"])
def test_two_conjugate_gradient_steps_match_the_oracle(where):
    op = effc.loads(cg_spec(2, where))
    B, T, H = 1, 37, 2
    xs = [x.requires_grad_() for x in random_inputs(op.spec, B, T, H, DIMS, seed=3)]
    s0 = tuple(s.requires_grad_() for s in random_state(op.spec, B, H, DIMS, seed=4))
    gen = torch.Generator().manual_seed(5)
    d_o = torch.randn(B, T, H, DIMS["V"], generator=gen, dtype=torch.float64)
    d_s = tuple(torch.randn(s.shape, generator=gen, dtype=torch.float64) for s in s0)
    leaves = xs + list(s0)
    ref, ref_g = _grads(lambda: op.reference(*xs, initial_state=s0, output_final_state=True), leaves, d_o, d_s)
    out, g = _grads(lambda: op(*xs, initial_state=s0, output_final_state=True),
                    leaves, d_o.float(), tuple(d.float() for d in d_s))
    assert judge_fp32(out, ref).ok, judge_fp32(out, ref)
    names = [d.name for d in op.spec.inputs] + [f"initial {s.name}" for s in op.spec.states]
    for name, a, r in zip(names, g, ref_g):
        assert judge_fp32(a, r).ok, f"d{name}: {judge_fp32(a, r)}"


# ---- legality: the same sum, bracketed and ordered any way, is the same transition ------------------------

BRACKETINGS = [
    "S = S * exp(bl) + x + y",
    "S = x + (S * exp(bl) + y)",
    "S = (x + y) + exp(bl) * S",
    "S = x + exp(bl) * S + y",
    "S = y - (-x - S * exp(bl))",
    "S = S * exp(bl) + (x + y)",
]


def bracketed(update: str) -> str:
    return f"""
spec bracketed {{
  input q: [B, T, H, K]
  input k: [B, T, H, K]
  input v: [B, T, H, V]
  input g: [B, T, H] logdecay
  output o: [B, T, H, V]
  state S: [K, V]
  chunk 16
  intra {{ b = cumsum(g) }}
  merge {{ o = (q * exp(b)[:, None]) @ S }}
  inter {{
    bl = last(b)
    x = (k * exp(bl - b)[:, None]).T @ v
    y = k.T @ (v * 0.5)
    {update}
  }}
}}
"""


@pytest.mark.parametrize("update", BRACKETINGS)
def test_every_bracketing_of_the_update_is_segmentable(update, tmp_path):
    from typer.testing import CliRunner
    from effc.tools.cli import app
    path = tmp_path / "bracketed.attn"
    path.write_text(bracketed(update))
    r = CliRunner().invoke(app, ["show", str(path), "--stage", "legality"])
    assert r.exit_code == 0, r.output
    assert "state S: S' = S * " in r.output and "decay times state plus a state-free write" in r.output, r.output
    assert "schedules: walk + segmented walk" in r.output, r.output


@pytest.mark.parametrize("update", ["S = S * exp(bl) + x + S * S", "S = x + k.T @ (k @ S) + y",
                                    "S = y + (x + exp(S) * exp(bl))"])
def test_a_sum_with_a_term_nonlinear_in_the_state_stays_general(update):
    t, = compile_text(bracketed(update)).legality.transitions
    assert not t.diagonal_affine


def test_every_bracketing_gives_the_same_numbers():
    """Forward and gradients in 3 segments (T = 45: 3 chunks of 16), each spec against its oracle and all
    against the first bracketing."""
    first = None
    for update in BRACKETINGS:
        op = effc.loads(bracketed(update))
        assert op.comp.plan.segmentable
        xs = [x.requires_grad_() for x in random_inputs(op.spec, 2, 45, 2, DIMS, seed=6)]
        s0 = random_state(op.spec, 2, 2, DIMS, seed=7).requires_grad_()
        gen = torch.Generator().manual_seed(8)
        d_o = torch.randn(2, 45, 2, DIMS["V"], generator=gen, dtype=torch.float64)
        d_s = torch.randn(s0.shape, generator=gen, dtype=torch.float64)
        leaves = xs + [s0]
        ref, ref_g = _grads(lambda: op.reference(*xs, initial_state=s0, output_final_state=True), leaves, d_o, (d_s,))
        out, g = _grads(lambda: op(*xs, initial_state=s0, output_final_state=True, segments=3),
                        leaves, d_o.float(), (d_s.float(),))
        assert op.last_config.segments == 3
        assert judge_fp32(out, ref).ok, (update, judge_fp32(out, ref))
        for a, r in zip(g, ref_g):
            assert judge_fp32(a, r).ok, (update, judge_fp32(a, r))
        if first is None:
            first = out, g
        else:
            torch.testing.assert_close(out, first[0], rtol=1e-4, atol=1e-4)
            for a, b in zip(g, first[1]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("update", ["n = n + a + 1.0", "n = n + (a + 1.0)", "n = 1.0 + a + n", "n = a - (-n - 1.0)"])
def test_a_normaliser_plus_two_writes_is_segmentable_however_bracketed(update):
    text = edit_update(bracketed("S = S * exp(bl) + x"), update)
    legality = compile_text(text).legality
    assert legality.segmentable, str(legality)
    assert {t.state: t.decay for t in legality.transitions}["n"] is None


def edit_update(text: str, update: str) -> str:
    """`bracketed`'s spec with a second state n: [K] (a normaliser: no decay, two writes)."""
    text = text.replace("  state S: [K, V]\n", "  state S: [K, V]\n  state n: [K]\n")
    text = text.replace("merge { o = (q * exp(b)[:, None]) @ S }",
                        "merge { o = ((q * exp(b)[:, None]) @ S) / (1.0 + abs(rowsum(q * n[None, :])))[:, None] }")
    return text.replace("    y = k.T @ (v * 0.5)\n", f"    y = k.T @ (v * 0.5)\n    a = colsum(k)\n    {update}\n")


def test_a_normaliser_with_two_writes_runs_segmented():
    op = effc.loads(edit_update(bracketed("S = S * exp(bl) + x"), "n = n + a + 1.0"))
    xs = [x.requires_grad_() for x in random_inputs(op.spec, 1, 45, 2, DIMS, seed=9)]
    s0 = tuple(s.requires_grad_() for s in random_state(op.spec, 1, 2, DIMS, seed=10))
    gen = torch.Generator().manual_seed(11)
    d_o = torch.randn(1, 45, 2, DIMS["V"], generator=gen, dtype=torch.float64)
    d_s = tuple(torch.randn(s.shape, generator=gen, dtype=torch.float64) for s in s0)
    leaves = xs + list(s0)
    ref, ref_g = _grads(lambda: op.reference(*xs, initial_state=s0, output_final_state=True), leaves, d_o, d_s)
    out, g = _grads(lambda: op(*xs, initial_state=s0, output_final_state=True, segments=3),
                    leaves, d_o.float(), tuple(d.float() for d in d_s))
    assert op.last_config.segments == 3
    assert judge_fp32(out, ref).ok, judge_fp32(out, ref)
    for a, r in zip(g, ref_g):
        assert judge_fp32(a, r).ok, judge_fp32(a, r)
