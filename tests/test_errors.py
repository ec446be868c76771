"""Bad specs: each error names file:line:column, the offending text and what was expected."""
from __future__ import annotations

import pytest

from effc.dsl import parse
from effc.errors import SpecError
from effc.passes.lower import lower
from effc.passes.shapes import infer_shapes

# A minimal valid spec; most cases below are one edit of it. Line numbers:
#  1 spec    2-4 inputs    5 output    6 state    7-9 intra    10-12 merge    13-15 inter    16 }
BASE = """\
spec s {
  input q: [B, T, H, K]
  input k: [B, T, H, K]
  input v: [B, T, H, V]
  output o: [B, T, H, V]
  state S: [K, V]
  intra {
    qs = q * 2
  }
  merge {
    o = qs @ S
  }
  inter {
    S = S + k.T @ v
  }
}
"""


def edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def check(text: str, file: str = "bad.attn"):
    """Parse, lower and shape-check, as the compiler does."""
    return infer_shapes(lower(parse(text, file)))


def error_of(text: str, file: str = "bad.attn") -> SpecError:
    with pytest.raises(SpecError) as info:
        check(text, file)
    return info.value


def assert_error(err: SpecError, line: int, col: int, message: str, expected: str | None, file: str = "bad.attn"):
    assert (err.loc.line, err.loc.column) == (line, col), str(err)
    assert message in err.message, str(err)
    if expected is not None:
        assert err.expected and expected in err.expected, str(err)
    assert str(err).startswith(f"{file}:{line}:{col}: error: "), str(err)
    # the caret sits under the reported column of the quoted source line
    text_line, caret_line = str(err).split("\n")[-2:] if not err.loc.via else str(err).split("\n")[-5:-3]
    assert text_line == "  " + err.loc.text and caret_line.index("^") == col + 1, str(err)


def test_base_spec_is_valid():
    assert check(BASE).name == "s"  # also: a stage right after a state decl, no param or chunk between


def test_stage_after_annotated_input_is_a_stage():
    # `intra` right after an input's annotations starts the stage; it is not a second annotation
    text = edit("  state S: [K, V]\n", "  state S: [K, V]\n  input g: [B, T, H] logdecay\n")
    assert [(d.name, d.annotations) for d in check(text).inputs][-1] == ("g", ("logdecay",))


CASES = [
    # ---- syntax ------------------------------------------------------------------------------
    ("missing-close-brace", BASE.rstrip()[:-1].rstrip(),  # the spec's final '}' removed
     15, 4, "unexpected end of file", "'}'"),
    ("missing-colon-in-decl", edit("input k: [", "input k ["),
     3, 11, "unexpected '['", "':'"),
    ("bad-character", edit("qs = q * 2", "qs = q $ 2"),
     8, 12, "unexpected character '$'", "'*', '**', '+', '-'"),
    ("unterminated-expression", edit("o = qs @ S", "o = qs @"),
     12, 3, "unexpected '}'", "'(', '-', a name, a number"),
    ("keyword-as-local-name", edit("qs = q * 2", "qs = q * 2\n    input = q"),
     9, 5, "unexpected 'input' (a keyword, not usable as a name)", "a name"),
    ("stage-name-as-local-name", edit("qs = q * 2", "qs = q * 2\n    merge = q"),
     9, 5, "unexpected 'merge' (a keyword", "'}', a name"),
    ("keyword-as-input-name", edit("input v: [", "input spec: ["),
     4, 9, "unexpected 'spec' (a keyword", "a name"),
    ("missing-equals", edit("qs = q * 2", "qs q * 2"),
     8, 8, "unexpected 'q'", "'='"),
    ("unknown-stage-keyword", edit("inter {", "inner {"),
     13, 3, "unexpected 'inner'", "a stage (intra, inter, merge)"),
    ("number-as-dim", edit("input v: [B, T, H, V]", "input v: [B, T, H, 4]"),
     4, 22, "unexpected '4'", "a name"),
    ("lowercase-transpose", edit("k.T @ v", "k.t @ v"),
     14, 15, "unexpected 't'", "'T'"),
    ("unterminated-string", 'import "_decay.attn\n' + BASE,
     1, 8, "unterminated string", 'a closing "'),
    # ---- names and scopes ----------------------------------------------------------------------
    ("unknown-name", edit("qs = q * 2", "qs = qq * 2"),
     8, 10, "unknown name 'qq'", "did you mean q?"),
    ("unknown-function", edit("qs = q * 2", "qs = expp(q)"),
     8, 10, "unknown function 'expp'", "did you mean exp, exp2?"),
    ("builtin-wrong-arity", edit("qs = q * 2", "qs = exp(q, k)"),
     8, 10, "'exp' takes 1 argument(s), got 2", "1 argument(s)"),
    ("def-wrong-arity", "def f(a, b) = a * b\n" + edit("qs = q * 2", "qs = f(q)"),
     9, 10, "'f' takes 2 argument(s), got 1", "f(a, b)"),
    ("state-read-in-intra", edit("qs = q * 2", "qs = q @ S"),
     8, 14, "'S' is not visible in intra", "names visible in intra"),
    ("output-read-in-merge", edit("o = qs @ S", "o = qs @ S\n    x = o"),
     12, 9, "'o' is not visible in merge", "names visible in merge"),
    ("assign-to-input", edit("qs = q * 2", "qs = q * 2\n    q = qs"),
     9, 5, "cannot assign to input 'q' in intra", "a new local name"),
    ("assign-to-output-in-intra", edit("qs = q * 2", "qs = q * 2\n    o = qs"),
     9, 5, "cannot assign to output 'o' in intra", "outputs are assigned in merge"),
    ("assign-to-state-in-merge", edit("o = qs @ S", "o = qs @ S\n    S = S * 2"),
     12, 5, "cannot assign to state 'S' in merge", "states are updated in inter"),
    ("output-not-assigned-in-merge", edit("o = qs @ S", "x = qs @ S"),
     10, 3, "merge does not assign o", "an assignment 'o = ...' in merge"),
    ("output-assigned-twice", edit("o = qs @ S", "o = qs @ S\n    o = qs @ S"),
     12, 5, "'o' is assigned twice in merge", "first at bad.attn:11:5"),
    ("state-not-assigned-in-inter", edit("S = S + k.T @ v", "U = S + k.T @ v"),
     13, 3, "inter does not assign S", "an assignment 'S = ...' in inter"),
    ("state-but-no-inter", edit("  inter {\n    S = S + k.T @ v\n  }\n", ""),
     6, 3, "declares state 'S' but has no inter stage", "an 'inter { S = ... }' block"),
    ("no-merge-stage", edit("  merge {\n    o = qs @ S\n  }\n", ""),
     1, 1, "spec 's' has no merge stage", "a 'merge { o = ... }' block"),
    ("underscore-local", edit("qs = q * 2", "qs = q * 2\n    _t = q"),
     9, 5, "names starting with '_' are reserved", "a name without '_' prefix"),
    # ---- declarations ----------------------------------------------------------------------------
    ("duplicate-declaration", edit("  output o:", "  input q: [B, T, H]\n  output o:"),
     5, 3, "'q' is declared twice (first at bad.attn:2:3)", "one declaration per name"),
    ("input-axes-out-of-order", edit("input k: [B, T, H, K]", "input k: [T, B, H, K]"),
     3, 3, "input 'k' has shape [T, B, H, K]", "[B, T, H, D]"),
    ("input-two-feature-dims", edit("input k: [B, T, H, K]", "input k: [B, T, H, K, V]"),
     3, 3, "input 'k' has shape [B, T, H, K, V]", "[B, T, H] (one value per token and head)"),
    ("state-dim-not-in-inputs", edit("state S: [K, V]", "state S: [K, W]"),
     6, 3, "state 'S' uses dim 'W' that no input has", "state dims taken from the inputs' feature dims"),
    ("state-with-batch-dim", edit("state S: [K, V]", "state S: [B, K]"),
     6, 3, "state 'S' has shape [B, K]", "feature dims only"),
    ("chunk-not-power-of-two", edit("  state S: [K, V]\n", "  state S: [K, V]\n  chunk 48\n"),
     7, 3, "chunk 48 is not a power of two >= 16", "16, 32, 64, 128 or 256"),
    ("chunk-declared-twice", edit("  state S: [K, V]\n", "  state S: [K, V]\n  chunk 64\n  chunk 32\n"),
     8, 3, "chunk size declared twice", "one 'chunk N' line per spec"),
    ("unknown-annotation", edit("input k: [B, T, H, K]", "input k: [B, T, H, K] positiv"),
     3, 3, "unknown annotation 'positiv' on 'k' (did you mean positive?)", "logdecay"),
    ("unitnorm-without-feature-dim", edit("input v: [B, T, H, V]", "input v: [B, T, H, V]\n  input b: [B, T, H] unitnorm"),
     5, 3, "unitnorm on 'b' [B, T, H]: one value per token and head has no vector", "with a feature dim"),
    ("reserved-builtin-name", edit("  state S: [K, V]\n", "  state S: [K, V]\n  param idx = 1\n"),
     7, 3, "'idx' is a reserved name", "not a builtin (idx, head, inf)"),
    ("reserved-dim-name", edit("input v: [B, T, H, V]", "input T: [B, T, H, V]"),
     4, 3, "'T' is a reserved name", "not B, T or H"),
    ("param-default-unknown-name", edit("  state S: [K, V]\n", "  state S: [K, V]\n  param scale = Kk ** -0.5\n"),
     7, 17, "unknown name 'Kk' in a param default", "did you mean K?"),
    ("param-default-not-arithmetic", edit("  state S: [K, V]\n", "  state S: [K, V]\n  param scale = exp(K)\n"),
     7, 17, "a param default must be arithmetic", "e.g. K ** -0.5"),
    ("param-default-huge-exponent", edit("  state S: [K, V]\n", "  state S: [K, V]\n  param p = 10 ** 10 ** 10\n"),
     7, 19, "the exponent of '**' in a param default is too large", "a smaller exponent"),
    ("param-default-dim-exponent", edit("  state S: [K, V]\n", "  state S: [K, V]\n  param p = 2 ** K\n"),
     7, 18, "the exponent of '**' in a param default must be a number", "K ** -0.5"),
    ("param-default-not-finite", edit("  state S: [K, V]\n", "  state S: [K, V]\n  param p = 1 / 0\n"),
     7, 13, "param 'p' has default zoo, not a finite float", "within the float range"),
    ("no-state", edit("  state S: [K, V]\n", "", edit("o = qs @ S", "o = causal(qs @ k.T) @ v",
                                                           edit("  inter {\n    S = S + k.T @ v\n  }\n", ""))),
     1, 1, "spec 's' declares no state and no score stage", "a 'state S: [K, V]' line"),
    ("nesting-too-deep", edit("qs = q * 2", "qs = " + "-" * 200 + "q"),  # 4 levels of spec, stage, statement
     8, 106, "the spec nests more than 100 levels deep here", "name parts in earlier assignments"),
    ("no-output", edit("  output o: [B, T, H, V]\n", ""),
     1, 1, "spec 's' declares no output", "an 'output o: [B, T, H, V]' line"),
    ("extends-unknown-spec", 'import "retention.attn"\nspec t extends retnetion {\n}\n',
     2, 16, "spec 't' extends unknown spec 'retnetion'", "did you mean retention?"),
    ("extends-itself", "spec t extends t {\n}\n",
     1, 16, "spec 't' extends itself (t -> t)", "a spec that does not extend itself"),
    ("spec-defined-twice", BASE + BASE,
     17, 1, "spec 's' is defined twice (first at bad.attn:1:1)", "one spec per name"),
    ("def-defined-twice", "def f(a) = a\ndef f(a, b) = a * b\n" + BASE,
     2, 1, "def 'f' is defined twice (first at bad.attn:1:1)", "one def per name"),
    # ---- shapes: the caret is on the offending subexpression, not the statement ---------------
    ("broadcast-vector-times-matrix", edit("S = S + k.T @ v", "S = S * last(k) + k.T @ v"),  # needs last(k)[:, None]
     14, 9, "cannot broadcast [K, V] with [K] in '*'", "add [:, None] to make a column"),
    ("broadcast-nested", edit("S = S + k.T @ v", "S = S + last(k) * S"),
     14, 13, "cannot broadcast [K] with [K, V] in '*'", "aligned from the right"),
    ("matmul-inner-dim-mismatch", edit("qs = q * 2", "qs = q @ v"),
     8, 10, "'@' inner dims differ: [C, K] @ [C, V]", "[m, K] @ [K, n]"),
    ("matmul-of-vector", edit("qs = q * 2", "qs = q @ last(k)"),
     8, 10, "'@' needs two 2-D tiles, got [C, K] @ [K]", "make a vector 2-D with [:, None]"),
    ("transpose-of-vector", edit("S = S + k.T @ v", "S = S + last(k).T @ v"),
     14, 13, "'.T' needs a 2-D tile, got [K]", "a 2-D tile"),
    ("cumsum-of-non-per-token", edit("qs = q * 2", "qs = q * cumsum(last(k))"),
     8, 14, "'cumsum' runs along the token axis, but its argument has shape [K]", "first axis is C"),
    ("pow-with-tile-exponent", edit("qs = q * 2", "qs = q ** k"),
     8, 10, "the exponent of '**' must be a scalar", "x ** 2"),
    ("mask-of-non-score-tile", edit("qs = q * 2", "qs = causal(q)"),
     8, 10, "'causal' masks a [C, C] score tile, got [C, K]", "a [C, C] tile"),
    ("three-axes", edit("qs = q * 2", "qs = q[:, :, None] * 2"),
     8, 10, "this expression would have 3 or more axes ([C, K, 1])", "tiles of at most 2 axes"),
    ("subscript-keeps-no-axis", edit("qs = q * 2", "qs = q[None]"),
     8, 10, "a subscript must keep at least one axis", "x[:, None]"),
    ("vector-matmul-in-merge", edit("o = qs @ S", "o = last(qs) @ S"),
     11, 9, "'@' needs two 2-D tiles, got [K] @ [K, V]", None),
    ("output-wrong-tile-shape-declared", edit("o = qs @ S", "o = rowsum(qs)"),
     11, 9, "output 'o' has tile shape [C], declared [C, V]", "a [C, V] value"),
    ("state-wrong-tile-shape", edit("S = S + k.T @ v", "S = k.T @ k"),
     14, 9, "state 'S' is updated with shape [K, K], declared [K, V]", "a [K, V] value"),
]


@pytest.mark.parametrize("text, line, col, message, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_spec(text, line, col, message, expected):
    assert_error(error_of(text), line, col, message, expected)


def test_cases_are_distinct():
    assert len({c[1] for c in CASES}) == len(CASES) >= 20


# ---- module-level problems still name the file ----------------------------------------------------
def test_no_spec():
    err = error_of("def f(a) = a\n")
    assert str(err).startswith("bad.attn:1:1: error: bad.attn defines no spec")
    assert "at least one 'spec NAME { ... }'" in err.expected


def test_several_specs_need_a_name():
    err = error_of(BASE + edit("spec s {", "spec t {"))
    assert_error(err, 17, 1, "bad.attn defines several specs (s, t); name one", "bad.attn:s")


def test_unknown_spec_name():
    with pytest.raises(SpecError) as info:
        lower(parse(BASE, "bad.attn"), "ss")
    assert str(info.value).startswith("bad.attn:1:1: error: no spec named 'ss' in bad.attn")
    assert "did you mean s?" in info.value.expected


# ---- imports and defs in other files ----------------------------------------------------------------
def test_import_missing_file(tmp_path):
    bad = tmp_path / "bad.attn"
    err = error_of('import "nope.attn"\n' + BASE, str(bad))
    assert_error(err, 1, 8, 'cannot import "nope.attn": no such file', "a library file", file=str(bad))


def test_import_cycle(tmp_path):
    (tmp_path / "a.attn").write_text('import "b.attn"\n')
    (tmp_path / "b.attn").write_text('# b imports a back\nimport "a.attn"\n')
    bad = tmp_path / "a.attn"
    err = error_of(bad.read_text() + BASE, str(bad))
    # reported in b.attn, at the import that closes the cycle
    assert_error(err, 2, 8, 'import cycle through "a.attn"', "imports that form no cycle",
                 file=str(tmp_path / "b.attn"))


def test_error_in_imported_file(tmp_path):
    (tmp_path / "lib.attn").write_text("def twice(x) =\n  x * * 2\n")
    bad = tmp_path / "bad.attn"
    err = error_of('import "lib.attn"\n' + BASE, str(bad))
    assert_error(err, 2, 7, "unexpected '*'", "a name", file=str(tmp_path / "lib.attn"))


def test_import_may_not_replace_a_local_def(tmp_path):
    (tmp_path / "lib.attn").write_text("def twice(x) = x * 2\n")
    bad = tmp_path / "bad.attn"
    err = error_of("def twice(x) = x + x\n" + 'import "lib.attn"\n' + BASE, str(bad))
    assert_error(err, 2, 8, f"import \"lib.attn\" defines def 'twice' again (at {tmp_path / 'lib.attn'}:1:1; "
                 f"first at {bad}:1:1)", "one def per name", file=str(bad))


def test_local_spec_may_not_replace_an_imported_one(tmp_path):
    (tmp_path / "lib.attn").write_text(BASE)
    bad = tmp_path / "bad.attn"
    err = error_of('import "lib.attn"\n' + BASE, str(bad))
    assert_error(err, 2, 1, f"spec 's' is defined twice (first at {tmp_path / 'lib.attn'}:1:1)", "one spec per name",
                 file=str(bad))


def test_one_definition_imported_twice_is_one(tmp_path):
    # retention and simple_gla both import _decay.attn's decay_matrix: the same def, not a second one
    m = parse('import "retention.attn"\nimport "simple_gla.attn"\n' + BASE, str(tmp_path / "ok.attn"))
    assert [f.name for f in m.funcs] == ["decay_matrix"] and [s.name for s in m.specs] == ["retention", "simple_gla", "s"]


@pytest.mark.parametrize("imported", [False, True])
def test_file_that_is_not_utf8(tmp_path, imported):
    from effc.dsl import parse_file
    latin1 = tmp_path / "latin1.attn"
    latin1.write_bytes(BASE.replace("qs = q * 2", "qs = q * 2  # d\xe9j\xe0 vu").encode("latin-1"))
    path = latin1
    if imported:
        path = tmp_path / "main.attn"
        path.write_text('import "latin1.attn"\n')
    with pytest.raises(SpecError) as info:
        parse_file(path)
    offset = latin1.read_bytes().index(b"\xe9")
    assert_error(info.value, 8, 20, f"the file is not UTF-8 text: byte {offset} is 0xe9", "saved as UTF-8",
                 file=str(latin1))


def test_defs_nested_past_the_recursion_limit():
    defs = "def f0(x) = x\n" + "".join(f"def f{i}(x) = " + "(" * 80 + f"f{i - 1}(x)" + " + x)" * 80 + "\n"
                                       for i in range(1, 25))
    err = error_of(defs + edit("qs = q * 2", "qs = f24(q)"))
    assert_error(err, 33, 10, "this expression nests too deeply (with its defs expanded)", "earlier assignments")


def test_shape_error_inside_a_library_def_names_the_call_site():
    text = 'import "_decay.attn"\n' + edit("qs = q * 2", "qs = q * decay_matrix(q)")
    err = error_of(text)
    assert err.loc.file.endswith("_decay.attn") and "subscript keeps 1 axes of a 2-D value" in err.message
    assert err.loc.column == err.loc.text.index("b[:, None]") + 1
    assert (err.loc.via.file, err.loc.via.line, err.loc.via.column) == ("bad.attn", 9, 14)
    assert "note: in the def called at bad.attn:9:14" in str(err)


def test_unknown_name_inside_def_names_the_call_site():
    err = error_of("def f(a) = a * zz\n" + edit("qs = q * 2", "qs = f(q)"))
    assert_error(err, 1, 16, "unknown name 'zz'", "an earlier assignment")
    assert str(err.loc.via) == "bad.attn:9:10"


def test_recursive_def():
    err = error_of("def f(a) = f(a) * 2\n" + edit("qs = q * 2", "qs = f(q)"))
    assert_error(err, 1, 12, "'f' expands recursively", "non-recursive defs")


def test_caret_lines_up_under_tabs():
    err = error_of(edit("    qs = q * 2", "\tqs = q $ 2"))
    assert (err.loc.line, err.loc.column) == (8, 9)
    assert str(err).endswith("\n  \tqs = q $ 2\n  \t       ^")


# ---- robustness: no Python exception other than SpecError escapes ------------------------------------
@pytest.mark.parametrize("cut", range(0, len(BASE), 3))
def test_truncated_spec_gives_spec_error(cut):
    try:
        check(BASE[:cut])
    except SpecError as err:
        assert err.loc is not None and str(err).startswith("bad.attn:"), str(err)


@pytest.mark.parametrize("junk", ["$", "}", "{", "(", ")", "[", "]", ":", ",", "=", "*", ".", "None", "spec", "3",
                                  '"', "intra"])
def test_junk_inserted_gives_spec_error(junk):
    for pos in range(0, len(BASE), 7):
        try:
            check(BASE[:pos] + junk + BASE[pos:])
        except SpecError as err:
            assert err.loc is not None and err.loc.line >= 1 and err.loc.column >= 1, str(err)
