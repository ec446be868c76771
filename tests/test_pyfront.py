"""@attention_spec: Python-written specs give the same AST and IR as their .attn text, errors point
at the Python source, and the decorated op runs."""
# Spec bodies name tile ops and dims that exist only in the spec language:
# ruff: noqa: F821
from pathlib import Path

import pytest
import torch

from effc import attention_spec
from effc.dsl import parse, parse_file
from effc.dsl.pyfront import Input, Output, Param, State, inter, intra, merge, parse_function
from effc.errors import SpecError
from effc.ir import print_spec
from effc.library import LIBRARY_DIR
from effc.compiler.driver import Compilation
from effc.runtime.checks import interpreting

HERE = Path(__file__)


@attention_spec(chunk=32)
def gla(q: Input("B", "T", "H", "K"), k: Input("B", "T", "H", "K"), v: Input("B", "T", "H", "V"),
        g: Input("B", "T", "H", "K", "logdecay")) -> Output("o", "B", "T", "H", "V"):
    S = State("K", "V")
    scale = Param(K ** -0.5)
    with intra:
        b = cumsum(g)
        qd = q * exp(b) * scale
        o_intra = causal(qd @ (k * exp(-b)).T) @ v
    with merge:
        o = o_intra + qd @ S
    with inter:
        bl = last(b)
        S = S * exp(bl)[:, None] + (k * exp(bl[None, :] - b)).T @ v


@attention_spec(chunk=64)
def simple_gla(q: Input("B", "T", "H", "K"), k: Input("B", "T", "H", "K"), v: Input("B", "T", "H", "V"),
               g: Input("B", "T", "H", "logdecay")) -> Output("o", "B", "T", "H", "V"):
    S = State("K", "V")
    scale = Param(K ** -0.5)
    with intra:
        b = cumsum(g)
        qs = q * scale
        o_intra = ((qs @ k.T) * exp(causal(b[:, None] - b[None, :], -inf))) @ v  # decay_matrix(b) inlined
    with merge:
        o = o_intra + (qs * exp(b)[:, None]) @ S
    with inter:
        bl = last(b)
        S = S * exp(bl) + (k * exp(bl - b)[:, None]).T @ v


def typed(module):
    """The pipeline's typed stage (shapes, and the linear family's factored decays made decay_dot)."""
    return Compilation(module).typed


def test_gla_same_ast_and_ir_as_attn():
    text = (LIBRARY_DIR / "gla.attn").read_text()
    attn = parse(text, str(LIBRARY_DIR / "gla.attn"))
    assert gla.comp.module == attn
    assert gla.comp.module.specs[0] == attn.specs[0]
    assert gla.comp.typed == typed(attn)
    assert print_spec(gla.comp.typed) == print_spec(typed(attn))
    # locations point into this file
    spec = gla.comp.module.specs[0]
    assert spec.loc.file == str(HERE) and "def gla(" in spec.loc.text
    assert spec.stages[0].body[0].loc.text.strip() == "b = cumsum(g)"


def test_simple_gla_same_ir_as_attn():
    attn = parse_file(LIBRARY_DIR / "simple_gla.attn")  # imports _decay.attn's decay_matrix
    assert simple_gla.comp.typed == typed(attn)
    assert print_spec(simple_gla.comp.typed) == print_spec(typed(attn))


def exprs(q: Input("B", "T", "H", "K")) -> Output("o", "B", "T", "H", "K"):
    """Docstrings are skipped."""
    p = Param(-5)
    r = Param(2 ** 3 ** -1.5)
    with intra:
        pass
    with merge:
        a = -q ** 2 - q - 1e-3 / q * q @ q.T
        c = causal((a)[None, :][:, None, :], -inf)
        o = maximum(rowsum(c), f()) + x.T.T[:]


EXPRS_ATTN = """
spec exprs {
  input q: [B, T, H, K]
  output o: [B, T, H, K]
  param p = -5
  param r = 2 ** 3 ** -1.5
  intra { }
  merge {
    a = -q ** 2 - q - 1e-3 / q * q @ q.T
    c = causal((a)[None, :][:, None, :], -inf)
    o = maximum(rowsum(c), f()) + x.T.T[:]
  }
}
"""


def test_expressions_match_attn_parser():
    assert parse_function(exprs) == parse(EXPRS_ATTN)


# ---- errors: each bad line carries a marker comment; the error must point at that line -------------
def bad_if(q: Input("B", "T", "H", "K")) -> Output("o", "B", "T", "H", "K"):
    with merge:
        if True:  # <- bad_if
            o = q


def bad_keyword(q: Input("B", "T", "H", "K")) -> Output("o", "B", "T", "H", "K"):
    with merge:
        o = causal(q @ q.T, fill=-inf) @ q  # <- bad_keyword


def bad_compare(q: Input("B", "T", "H", "K")) -> Output("o", "B", "T", "H", "K"):
    S = State("K")
    with merge:
        o = q * (q > 0)  # <- bad_compare
    with inter:
        S = S + colsum(q)  # noqa: F821


def bad_attribute(q: Input("B", "T", "H", "K")) -> Output("o", "B", "T", "H", "K"):
    with merge:
        o = q.sum  # <- bad_attribute


def bad_slice(q: Input("B", "T", "H", "K")) -> Output("o", "B", "T", "H", "K"):
    with merge:
        o = q[1:, None]  # <- bad_slice


def bad_lambda(q: Input("B", "T", "H", "K")) -> Output("o", "B", "T", "H", "K"):
    with merge:
        o = (lambda x: x)(q)  # <- bad_lambda


def bad_for(q: Input("B", "T", "H", "K")) -> Output("o", "B", "T", "H", "K"):
    with merge:
        o = q
    for i in range(2):  # <- bad_for
        pass


def bad_default(q: Input("B", "T", "H", "K"),
                scale=0.5) -> Output("o", "B", "T", "H", "K"):  # <- bad_default
    with merge:
        o = q * scale


def bad_annotation(q: Input("B", "T", "H", "K"),
                   g: Input("B", "T", "H", "logdecy")) -> Output("o", "B", "T", "H", "K"):  # <- bad_annotation
    with merge:
        o = q


def bad_unknown_function(q: Input("B", "T", "H", "K")) -> Output("o", "B", "T", "H", "K"):
    with merge:
        o = exq(q)  # <- bad_unknown_function


def bad_state_in_intra(q: Input("B", "T", "H", "K")) -> Output("o", "B", "T", "H", "K"):
    S = State("K")
    with intra:
        a = q * S  # <- bad_state_in_intra
    with merge:
        o = a
    with inter:
        S = S + last(q)


def _marked(name: str) -> tuple[int, str]:
    lines = HERE.read_text().splitlines()
    line = next(i for i, l in enumerate(lines, 1) if l.endswith(f"# <- {name}"))
    return line, lines[line - 1]


@pytest.mark.parametrize("fn, message, at", [
    (bad_if, "an if statement (if True:) is not supported in the merge stage", "if True"),
    (bad_keyword, "keyword argument 'fill=-inf' in a call of 'causal' is not supported", "fill="),
    (bad_compare, "'gt' belongs to the softmax family: it needs a 'score { ... }' stage", "q > 0"),
    (bad_attribute, "attribute .sum is not supported (q.sum)", "q.sum"),
    (bad_slice, "index '1:' is not supported in a subscript", "1:"),
    (bad_lambda, "a lambda (lambda x: x) is not supported in a spec expression", "lambda"),
    (bad_for, "a for loop (for i in range(2):) is not supported in a spec body", "for i"),
    (bad_default, "a default value (0.5) in the spec signature is not supported", "0.5"),
    (bad_annotation, "unknown annotation 'logdecy' on 'g' (did you mean logdecay?)", '"logdecy"'),
    # lowering's errors point at the Python source too
    (bad_unknown_function, "unknown function 'exq'", "exq(q)"),
    (bad_state_in_intra, "'S' is not visible in intra", "S  #"),
])
def test_errors_point_at_python_source(fn, message, at):
    with pytest.raises(SpecError) as info:
        attention_spec(fn)
    err = info.value
    line, text = _marked(fn.__name__)
    assert message in err.message
    assert err.expected
    assert (err.loc.file, err.loc.line, err.loc.text) == (str(HERE), line, text)
    assert text[err.loc.column - 1:].startswith(at), (err.loc.column, text)


def test_decorator_forms():
    def spec(q: Input("B", "T", "H", "K")) -> Output("o", "B", "T", "H", "K"):
        S = State("K")
        with merge:
            o = q * S
        with inter:
            S = S + colsum(q)  # noqa: F821
    assert attention_spec(spec).spec.chunk == 64
    assert attention_spec(chunk=32)(spec).spec.chunk == 32
    with pytest.raises(SpecError, match="chunk 48 is not a power of two"):
        attention_spec(chunk=48)(spec)


# ---- the decorated op runs -------------------------------------------------------------------------
@pytest.mark.parametrize("op", [gla, simple_gla], ids=lambda op: op.name)
def test_op_matches_oracle(op):
    device = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    if device == "cpu" and not interpreting():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    B, T, H, K, V = 1, 40, 2, 16, 16
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn((B, T, H, K)[:len(op.spec.inputs[3].dims)], generator=gen))
    xs = [x.to(device) for x in (q, k, v, g)]
    o, s = op(*xs, chunk=16, output_final_state=True)
    assert op.last_config.chunk == 16  # three chunks, so the state crosses chunk boundaries
    ref, ref_s = op.reference(*xs, output_final_state=True)
    for got, want in ((o, ref), (s, ref_s)):
        err = (got.double() - want.double()).abs().max().item()
        assert err <= 1e-4 * max(1.0, want.abs().max().item()), err
