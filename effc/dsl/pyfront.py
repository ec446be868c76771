"""@attention_spec: a spec written as a decorated Python function, read from its source (never run)
into the same `dsl.ast` that the `.attn` text gives. The two forms map line for line:

    spec gla {                                   @attention_spec(chunk=64)
      input q: [B, T, H, K]                      def gla(q: Input("B", "T", "H", "K"),
      input k: [B, T, H, K]                              k: Input("B", "T", "H", "K"),
      input v: [B, T, H, V]                              v: Input("B", "T", "H", "V"),
      input g: [B, T, H, K] logdecay                     g: Input("B", "T", "H", "K", "logdecay"),
      output o: [B, T, H, V]                             ) -> Output("o", "B", "T", "H", "V"):
      state S: [K, V]                                S = State("K", "V")
      param scale = K ** -0.5                        scale = Param(K ** -0.5)
      chunk 64                                       (the decorator's chunk=; default 64)
      intra { b = cumsum(g) ... }                    with intra:
                                                         b = cumsum(g) ...
      merge { ... }                                  with merge: ...
      inter { ... }                                  with inter: ...
    }

- The spec's name is the function's name. Parameters are the inputs, in order; each is annotated
  `Input(*dims, *annotations)`: trailing strings that name an annotation (logdecay, positive,
  unit, unitnorm) are annotations, the strings before them dims. A dim that looks like a misspelt annotation
  and appears in no other declaration is reported, as .attn would report the unknown annotation.
- The return annotation `Output(name, *dims)` (or a tuple of them) declares the output(s).
- The body holds, in any order, `NAME = State(*dims)`, `NAME = Param(expr)` and the
  `with intra:` / `with merge:` / `with inter:` stages, whose statements are `name = expr`
  (`pass` for an empty stage). Declarations keep .attn's order: inputs, outputs, states.
- Params live in the body, not as signature defaults: Python evaluates defaults when `def` runs,
  so `scale=K ** -0.5` would fail with a NameError before the decorator ever saw it.
- The softmax family: `with score:` / `with prefix:` / `with select:` stages (`mask(pred)`, `force(pred)`,
  `block(64)`, `shared("sum")`, `topk(g, 16)` lines), `keypos(S, (S + 1) * 32 - 1)` for a key sequence of its
  own, and `with branch("cmp", Output("oc", "B", "T", "H", "V")):` holding a branch's keypos and stages
  (.attn's `branch cmp { output oc: [B, T, H, V] ... }`).
- Expressions: + - * / @ **, unary -, x.T, x[:, None], f(a, b), names, int/float literals.
  Names such as `exp`, `cumsum`, `K` or `inf` need not exist in Python: the body is never run.
"""
from __future__ import annotations

import ast as py
import difflib
import inspect
import textwrap

from ..errors import Loc, SpecError
from . import ast
from .ast import ANNOTATIONS

__all__ = ["parse_function", "Input", "Output", "State", "Param", "intra", "merge", "inter",
           "score", "prefix", "mask", "select", "force", "block", "shared", "keypos", "branch"]


# ---- markers: imported so names resolve; only the source text that uses them is read -------------
def Input(*dims_and_annotations: str) -> None:  # noqa: N802
    """Annotates a spec input: `q: Input("B", "T", "H", "K")`. Never executed by the front end
    (Python may evaluate annotations at `def` time, which is harmless)."""


def Output(name: str, *dims: str) -> None:  # noqa: N802
    """Return annotation declaring the spec output: `-> Output("o", "B", "T", "H", "V")`. Never executed."""


def State(*dims: str, levels: int | None = None) -> None:  # noqa: N802
    """`S = State("K", "V")` in the spec body declares a state (`levels=N`: N level states). Never executed."""


def Param(default) -> None:  # noqa: N802
    """`scale = Param(K ** -0.5)` in the spec body declares a runtime scalar. Never executed."""


class _StageMarker:
    """`with intra:` / `with merge:` / `with inter:` opens a stage. Never executed."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<effc stage marker {self.name}>"


intra, merge, inter = _StageMarker("intra"), _StageMarker("merge"), _StageMarker("inter")
# the softmax family: `with score:` (with `mask(pred)` lines, as .attn's `mask pred`) and `with prefix:`
score, prefix = _StageMarker("score"), _StageMarker("prefix")


def mask(predicate) -> None:
    """`mask(kpos <= qpos)` inside `with score:`: the (query, key) pairs that exist. Never executed."""


# the select stage (passes.select): `with select:` holding `block(64)`, `force(pred)`, `mask(pred)` and a
# criterion `topk(g, 3)` (as .attn's `block 64`, `force pred`, `mask pred`, `topk(g, 3)`)
select = _StageMarker("select")


def force(predicate) -> None:
    """`force(kblock == qblock)` inside `with select:`: blocks always chosen. Never executed."""


def block(size: int) -> None:
    """`block(64)` inside `with select:`: the key block of pooling and selection. Never executed."""


def shared(how: str) -> None:
    """`shared("sum")` inside `with select:`: one choice per key/value head group (.attn's `shared sum`).
    Never executed."""


def keypos(dim, position) -> None:
    """`keypos(S, (S + 1) * 32 - 1)` in the spec body (or a branch): where key S of a key sequence of its own
    sits on the query's token axis (.attn's `keypos S = (S + 1) * 32 - 1`). Never executed."""


def branch(name: str, *outputs) -> None:
    """`with branch("cmp", Output("oc", "B", "T", "H", "V")):` opens a branch (passes.branches): its outputs, then
    in its body keypos(...) and the `with select:` / `with score:` / `with merge:` stages. Never executed."""

# ---- the translation ------------------------------------------------------------------------------
_BINOPS = {py.Add: "add", py.Sub: "sub", py.Mult: "mul", py.Div: "div", py.MatMult: "matmul", py.Pow: "pow"}
_COMPARE = {py.Lt: "lt", py.LtE: "le", py.Gt: "gt", py.GtE: "ge", py.Eq: "eq", py.NotEq: "ne"}
_OP_SYMBOLS = {py.FloorDiv: "//", py.Mod: "%", py.LShift: "<<", py.RShift: ">>", py.BitOr: "|",
               py.BitXor: "^", py.BitAnd: "&", py.UAdd: "unary +", py.Not: "not", py.Invert: "~"}
_CONSTRUCTS = {
    py.If: "an if statement", py.For: "a for loop", py.While: "a while loop", py.With: "a nested with",
    py.AugAssign: "an augmented assignment", py.AnnAssign: "an annotated assignment", py.Return: "a return",
    py.FunctionDef: "a nested def", py.Expr: "an expression statement", py.Try: "a try statement",
    py.Import: "an import", py.ImportFrom: "an import", py.Delete: "a del", py.Assert: "an assert",
    py.Compare: "a comparison", py.BoolOp: "and/or", py.IfExp: "a conditional expression",
    py.Lambda: "a lambda", py.Tuple: "a tuple", py.List: "a list", py.Dict: "a dict", py.Set: "a set",
    py.ListComp: "a comprehension", py.GeneratorExp: "a generator expression", py.Starred: "a starred argument",
    py.JoinedStr: "an f-string", py.NamedExpr: "an assignment expression", py.Slice: "a slice",
}
_EXPR_EXPECTED = "+ - * / @ **, unary -, x.T, x[:, None], f(a, b), names and numbers"
_BODY_EXPECTED = ("NAME = State(dims...), NAME = Param(expr) or a stage block "
                  "(with intra: / with merge: / with inter:)")
_STAGE_EXPECTED = "assignments 'name = expression'"


def _describe(node: py.AST) -> str:
    what = _CONSTRUCTS.get(type(node), type(node).__name__)
    text = py.unparse(node).splitlines()[0]
    return f"{what} ({text[:60]})"


class _Reader:
    def __init__(self, file: str, lines: list[str], first_line: int, margin: int):
        self.file, self.lines, self.first_line, self.margin = file, lines, first_line, margin
        self.input_calls: dict[str, py.Call] = {}

    def loc(self, node: py.AST) -> Loc:
        text = self.lines[node.lineno - 1].rstrip("\n")
        # col_offset counts UTF-8 bytes of the dedented line; Loc columns count characters, from 1
        col = len(text.encode()[:self.margin + node.col_offset].decode(errors="replace")) + 1
        return Loc(self.file, self.first_line + node.lineno - 1, col, text)

    def fail(self, node: py.AST, message: str, expected: str) -> SpecError:
        return SpecError(message, self.loc(node), expected)

    def unsupported(self, node: py.AST, where: str, expected: str) -> SpecError:
        return self.fail(node, f"{_describe(node)} is not supported {where}", expected)

    # expressions
    def expr(self, n: py.expr) -> ast.Expr:
        loc = self.loc(n)
        if isinstance(n, py.Constant) and type(n.value) in (int, float):
            return ast.Number(float(n.value), loc)
        if isinstance(n, py.Name):
            return ast.Name(n.id, loc)
        if isinstance(n, py.BinOp) and type(n.op) in _BINOPS:
            return ast.BinOp(_BINOPS[type(n.op)], self.expr(n.left), self.expr(n.right), loc)
        if isinstance(n, py.UnaryOp) and isinstance(n.op, py.USub):
            return ast.Neg(self.expr(n.operand), loc)  # -5 too: .attn also reads it as neg(5)
        if isinstance(n, py.UnaryOp) and isinstance(n.op, py.Not):
            return ast.Call("not", (self.expr(n.operand),), loc)
        if isinstance(n, py.BoolOp):  # a and b and c: left to right, as the .attn grammar reads it
            out = self.expr(n.values[0])
            for v in n.values[1:]:
                out = ast.BinOp("and" if isinstance(n.op, py.And) else "or", out, self.expr(v), loc)
            return out
        if isinstance(n, py.Compare) and all(type(o) in _COMPARE for o in n.ops):
            operands = [n.left] + list(n.comparators)
            out = None
            for i, o in enumerate(n.ops):
                term = ast.BinOp(_COMPARE[type(o)], self.expr(operands[i]), self.expr(operands[i + 1]), loc)
                out = term if out is None else ast.BinOp("and", out, term, loc)
            return out
        if isinstance(n, (py.BinOp, py.UnaryOp)):
            sym = _OP_SYMBOLS.get(type(n.op), type(n.op).__name__)
            raise self.fail(n, f"operator {sym} is not supported in a spec expression ({py.unparse(n)})",
                            _EXPR_EXPECTED)
        if isinstance(n, py.Attribute):
            if n.attr != "T":
                raise self.fail(n, f"attribute .{n.attr} is not supported ({py.unparse(n)})",
                                "x.T (transpose) as the only attribute")
            return ast.Transpose(self.expr(n.value), loc)
        if isinstance(n, py.Subscript):
            items = n.slice.elts if isinstance(n.slice, py.Tuple) else [n.slice]
            return ast.Subscript(self.expr(n.value), tuple(self.index(i) for i in items), loc)
        if isinstance(n, py.Call):
            return self.call(n, loc)
        if isinstance(n, py.Constant):
            raise self.fail(n, f"constant {n.value!r} is not supported in a spec expression",
                            "int or float numbers (write inf for infinity)")
        raise self.unsupported(n, "in a spec expression", _EXPR_EXPECTED)

    def index(self, n: py.expr) -> str:
        if isinstance(n, py.Slice) and n.lower is None and n.upper is None and n.step is None:
            return ":"
        if isinstance(n, py.Constant) and n.value is None:
            return "None"
        raise self.fail(n, f"index '{py.unparse(n)}' is not supported in a subscript",
                        "':' (keep an axis) or None (new axis), e.g. x[:, None]")

    def call(self, n: py.Call, loc: Loc) -> ast.Call:
        if not isinstance(n.func, py.Name):
            if not isinstance(n.func, py.Attribute):
                self.expr(n.func)  # a lambda or the like gets its own, more precise error
            raise self.fail(n, f"call of '{py.unparse(n.func)}' is not supported",
                            "a tile operation or def called by its bare name, e.g. exp(x)")
        if n.keywords:
            kw = n.keywords[0]
            raise self.fail(kw, f"keyword argument '{py.unparse(kw)}' in a call of '{n.func.id}' is not supported",
                            f"positional arguments only, e.g. {n.func.id}(a, b)")
        return ast.Call(n.func.id, tuple(self.expr(a) for a in n.args), loc)

    # declarations
    def marker(self, n: py.expr | None, name: str) -> py.Call | None:
        ok = isinstance(n, py.Call) and isinstance(n.func, py.Name) and n.func.id == name
        if ok and n.keywords and not (name == "State" and [k.arg for k in n.keywords] == ["levels"]):
            raise self.fail(n.keywords[0], f"keyword argument in {name}(...) is not supported",
                            "positional arguments only")
        return n if ok else None

    def strings(self, call: py.Call, what: str) -> list[str]:
        for a in call.args:
            if not (isinstance(a, py.Constant) and isinstance(a.value, str)):
                raise self.fail(a, f"{what} takes dim names as strings, got '{py.unparse(a)}'",
                                f'strings, e.g. {what}("B", "T", "H", "K")')
        return [a.value for a in call.args]

    def levels(self, call: py.Call) -> int | None:
        """The `levels=N` keyword of State(...) (the only keyword a declaration takes)."""
        for kw in call.keywords:
            if kw.arg != "levels" or not (isinstance(kw.value, py.Constant) and type(kw.value.value) is int):
                raise self.fail(kw.value, f"State takes one keyword, levels=N (an integer), got "
                                f"'{kw.arg}={py.unparse(kw.value)}'", 'e.g. A = State("K", "V", levels=16)')
            return kw.value.value
        return None

    def input_decl(self, arg: py.arg) -> ast.Decl:
        call = self.marker(arg.annotation, "Input")
        if call is None:
            raise self.fail(arg, f"parameter '{arg.arg}' has no Input(...) annotation",
                            f'{arg.arg}: Input("B", "T", "H", "K"); params go in the body as '
                            f"{arg.arg} = Param(expr)")
        words = self.strings(call, "Input")
        self.input_calls[arg.arg] = call
        n_dims = len(words)
        while n_dims and words[n_dims - 1] in ANNOTATIONS:
            n_dims -= 1
        for w, a in zip(words[:n_dims], call.args):
            if w in ANNOTATIONS:
                raise self.fail(a, f"annotation '{w}' before a dim in Input(...)", "the dims first, then annotations")
        return ast.Decl("input", arg.arg, tuple(words[:n_dims]), tuple(words[n_dims:]), self.loc(arg))

    def output_decls(self, node: py.FunctionDef) -> list[ast.Decl]:
        ret = node.returns
        if ret is None:
            raise self.fail(node, f"spec '{node.name}' declares no output",
                            'a return annotation -> Output("o", "B", "T", "H", "V")')
        decls = []
        for r in ret.elts if isinstance(ret, py.Tuple) else [ret]:
            call = self.marker(r, "Output")
            words = self.strings(call, "Output") if call is not None else []
            if not words:
                raise self.fail(r, f"return annotation '{py.unparse(r)}' is not an output declaration",
                                'Output("o", "B", "T", "H", "V"): the name, then the dims')
            decls.append(ast.Decl("output", words[0], tuple(words[1:]), (), self.loc(r)))
        return decls

    def stage(self, w: py.With) -> ast.Stage:
        item = w.items[0]
        name = item.context_expr.id if isinstance(item.context_expr, py.Name) else None
        if len(w.items) != 1 or item.optional_vars is not None or name not in ("intra", "merge", "inter", "score",
                                                                                "prefix", "select"):
            raise self.fail(w, f"'with {', '.join(py.unparse(i) for i in w.items)}' is not a stage",
                            "with intra:, with merge: or with inter: (softmax family: with score:, with prefix:, "
                            "with select:)")
        body = []
        for s in w.body:
            if isinstance(s, py.Pass):
                continue
            if (isinstance(s, py.Expr) and (call := self.marker(s.value, "mask")) is not None
                    and len(call.args) == 1):  # mask(pred): .attn's `mask pred`
                body.append(ast.Mask(self.expr(call.args[0]), self.loc(s)))
                continue
            if name == "select" and isinstance(s, py.Expr) and (item := self.select_statement(s)) is not None:
                body.append(item)
                continue
            if not (isinstance(s, py.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], py.Name)):
                raise self.unsupported(s, f"in the {name} stage", _STAGE_EXPECTED)
            body.append(ast.Assign(s.targets[0].id, self.expr(s.value), self.loc(s)))
        return ast.Stage(name, tuple(body), self.loc(w))

    def select_statement(self, s: py.Expr):
        """force(pred), block(N) and the criteria (topk(g, N), ...) of a select stage; None for another line."""
        if (call := self.marker(s.value, "force")) is not None and len(call.args) == 1:
            return ast.Force(self.expr(call.args[0]), self.loc(s))
        if (call := self.marker(s.value, "block")) is not None and len(call.args) == 1:
            size = call.args[0]
            if not (isinstance(size, py.Constant) and isinstance(size.value, int)):
                raise self.fail(size, f"block takes an integer, got '{py.unparse(size)}'", "e.g. block(64)")
            return ast.BlockSize(size.value, self.loc(s))
        if (call := self.marker(s.value, "shared")) is not None and len(call.args) == 1:
            how = call.args[0]
            if not (isinstance(how, py.Constant) and isinstance(how.value, str)):
                raise self.fail(how, f"shared takes \"sum\" or \"mean\", got '{py.unparse(how)}'", 'e.g. shared("sum")')
            return ast.Shared(how.value, self.loc(s))
        call = s.value
        if isinstance(call, py.Call) and isinstance(call.func, py.Name) and len(call.args) in (2, 3) \
                and not call.keywords:
            limit = self.expr(call.args[2]) if len(call.args) == 3 else None
            return ast.Criterion(call.func.id, self.expr(call.args[0]), self.expr(call.args[1]), self.loc(s), limit)
        return None

    def check_annotation_typos(self, decls: list[ast.Decl]) -> None:
        """A misspelt annotation would silently read as an extra dim; .attn would reject it."""
        uses = [n for d in decls for n in set(d.shape)]
        for d in decls:
            for name, a in zip(d.shape, self.input_calls.get(d.name).args if d.kind == "input" else ()):
                close = difflib.get_close_matches(name, list(ANNOTATIONS), n=1, cutoff=0.75)
                if close and uses.count(name) == 1:
                    raise self.fail(a, f"unknown annotation '{name}' on '{d.name}' (did you mean {close[0]}?)",
                                    "one of: " + ", ".join(ANNOTATIONS) + "; or, if it is a dim, "
                                    "a name that also appears in another declaration")

    def spec(self, node: py.FunctionDef, chunk: int | None) -> ast.SpecDef:
        a = node.args
        for stars, extra in (("*", a.vararg), ("**", a.kwarg)):
            if extra is not None:
                raise self.fail(extra, f"{stars}{extra.arg} is not supported in a spec signature",
                                "one parameter per input")
        defaults = a.defaults + [d for d in a.kw_defaults if d is not None]
        if defaults:
            raise self.fail(defaults[0], f"a default value ({py.unparse(defaults[0])}) in the spec signature "
                            "is not supported (Python evaluates it when def runs)",
                            "params in the body, e.g. scale = Param(K ** -0.5)")
        decls = [self.input_decl(p) for p in a.posonlyargs + a.args + a.kwonlyargs]
        decls += self.output_decls(node)
        params, stages, keypos, branches = [], [], [], []
        for i, s in enumerate(node.body):
            if i == 0 and isinstance(s, py.Expr) and isinstance(getattr(s.value, "value", None), str):
                continue  # docstring
            if isinstance(s, py.With) and self.marker(s.items[0].context_expr, "branch") is not None:
                branches.append(self.branch(s))
                continue
            if isinstance(s, py.With):
                stages.append(self.stage(s))
                continue
            if (kp := self.keypos_statement(s)) is not None:
                keypos.append(kp)
                continue
            if isinstance(s, py.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], py.Name):
                target = s.targets[0].id
                if (call := self.marker(s.value, "State")) is not None:
                    words = self.strings(call, "State")  # dims, then annotations (`State("K", "K", "gram")`)
                    n_dims = next((i for i, w in enumerate(words) if w in ANNOTATIONS), len(words))
                    levels = self.levels(call)  # `State("K", "V", levels=16)`: level states
                    decls.append(ast.Decl("state", target, tuple(words[:n_dims]),
                                          tuple(words[n_dims:]) + ("levels",) * (levels is not None), self.loc(s),
                                          levels))
                    continue
                if (call := self.marker(s.value, "Param")) is not None:
                    if len(call.args) != 1:
                        raise self.fail(call, f"Param takes one default expression, got {len(call.args)}",
                                        f"{target} = Param(K ** -0.5)")
                    params.append(ast.Param(target, self.expr(call.args[0]), self.loc(s)))
                    continue
                raise self.fail(s, f"assignment to '{target}' outside a stage",
                                f"{_BODY_EXPECTED}; computations go inside a stage")
            raise self.unsupported(s, "in a spec body", _BODY_EXPECTED)
        self.check_annotation_typos(decls)
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int)):
            raise self.fail(node, f"chunk={chunk!r} is not an integer", "chunk=16, 32, 64, 128 or 256")
        return ast.SpecDef(node.name, tuple(decls), tuple(params), chunk, tuple(stages), None, self.loc(node),
                           keypos=tuple(keypos), branches=tuple(branches))

    def keypos_statement(self, s: py.stmt) -> ast.KeyPos | None:
        """keypos(S, expr): .attn's `keypos S = expr`; None for another statement."""
        call = self.marker(s.value, "keypos") if isinstance(s, py.Expr) else None
        if call is None:
            return None
        if len(call.args) != 2 or not isinstance(call.args[0], py.Name):
            raise self.fail(call, f"'{py.unparse(call)}' is not a keypos line",
                            "keypos(S, (S + 1) * 32 - 1): the key sequence's dim, then its position")
        return ast.KeyPos(call.args[0].id, self.expr(call.args[1]), self.loc(s))

    def branch(self, w: py.With) -> ast.Branch:
        """with branch("name", Output(...), ...): keypos(...) lines and stages, as .attn's `branch name { ... }`."""
        call = self.marker(w.items[0].context_expr, "branch")
        if len(w.items) != 1 or w.items[0].optional_vars is not None or not call.args \
                or not (isinstance(call.args[0], py.Constant) and isinstance(call.args[0].value, str)):
            raise self.fail(w, f"'with {', '.join(py.unparse(i) for i in w.items)}' is not a branch",
                            'with branch("name", Output("o1", "B", "T", "H", "V")):')
        outputs = []
        for a in call.args[1:]:
            out = self.marker(a, "Output")
            words = self.strings(out, "Output") if out is not None else []
            if not words:
                raise self.fail(a, f"'{py.unparse(a)}' is not an output declaration", 'Output("o1", "B", "T", "H", "V")')
            outputs.append(ast.Decl("output", words[0], tuple(words[1:]), (), self.loc(a)))
        keypos, stages = [], []
        for s in w.body:
            if (kp := self.keypos_statement(s)) is not None:
                keypos.append(kp)
            elif isinstance(s, py.With):
                stages.append(self.stage(s))
            elif not isinstance(s, py.Pass):
                raise self.unsupported(s, f"in branch '{call.args[0].value}'",
                                       "keypos(S, expr) and stage blocks (with select: / with score: / with merge:)")
        return ast.Branch(call.args[0].value, tuple(outputs), tuple(keypos), tuple(stages), self.loc(w))


def parse_function(fn, chunk: int | None = None) -> ast.Module:
    """The AST of a spec written as a Python function (the source is read, the body never run)."""
    try:
        lines, first_line = inspect.getsourcelines(fn)
        file = inspect.getsourcefile(fn) or fn.__code__.co_filename
    except (OSError, TypeError) as e:
        raise SpecError(f"cannot read the source of {getattr(fn, '__name__', fn)!r}: {e}", None,
                        "a function defined in a .py file (@attention_spec reads its source)") from None
    source = "".join(lines)
    dedented = textwrap.dedent(source)
    first = next(i for i, l in enumerate(source.splitlines()) if l.strip())
    margin = len(source.splitlines()[first]) - len(dedented.splitlines()[first])
    try:
        tree = py.parse(dedented)
    except SyntaxError as e:  # e.g. a nested def whose string literals break out of its indentation
        raise SpecError(f"cannot parse the source of {fn.__name__!r}: {e.msg}", None,
                        "a def at module level or consistently indented") from None
    node = tree.body[0]
    reader = _Reader(file, lines, first_line, margin)
    if not isinstance(node, py.FunctionDef):
        raise reader.fail(node, f"@attention_spec needs a plain def, got {_describe(node)}", "def NAME(inputs...):")
    spec = reader.spec(node, chunk)
    return ast.Module(funcs=(), specs=(spec,), file=file, local=(spec.name,))
