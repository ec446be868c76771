"""`.attn` text -> AST. Syntax errors become SpecError with file:line:column."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import lark

from ..errors import Loc, SpecError
from . import ast

_GRAMMAR = Path(__file__).with_name("grammar.lark")

# Human names for the grammar's terminals, used in "expected ..." messages.
_TOKEN_NAMES = {
    "NAME": "a name", "NUMBER": "a number", "INT": "an integer", "STRING": 'a "string"',
    "LBRACE": "'{'", "RBRACE": "'}'", "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'",
    "COLON": "':'", "COMMA": "','", "EQUAL": "'='", "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'",
    "SLASH": "'/'", "AT": "'@'", "DOT": "'.'", "STAGE": "a stage (intra, inter, merge), or score, prefix (the softmax family)",
    "SELECT": "'select'", "FORCE": "'force'", "BLOCK": "'block'", "SHARED": "'shared'",
    "COMPARE": "a comparison (< <= > >= == !=)", "MASK": "'mask'", "AND": "'and'", "OR": "'or'", "NOT": "'not'",
    "TRANSPOSE": "'T'", "NONE": "'None'", "$END": "end of file",
    "SPEC": "'spec'", "IMPORT": "'import'", "DEF": "'def'", "INPUT": "'input'", "OUTPUT": "'output'",
    "STATE": "'state'", "PARAM": "'param'", "CHUNK": "'chunk'", "KEYPOS": "'keypos'", "EXTENDS": "'extends'",
}


@lru_cache(maxsize=1)
def _lark() -> lark.Lark:
    return lark.Lark(_GRAMMAR.read_text(), parser="lalr", propagate_positions=True, maybe_placeholders=True)


# Terminals spelled like names: using one where a name is expected gets a hint.
_KEYWORDS = {"SPEC", "IMPORT", "DEF", "EXTENDS", "INPUT", "OUTPUT", "STATE", "PARAM", "CHUNK", "NONE", "STAGE",
             "MASK", "AND", "OR", "NOT", "SELECT", "BLOCK", "FORCE", "SHARED", "KEYPOS"}


def _token_name(t: str) -> str:
    if t in _TOKEN_NAMES:
        return _TOKEN_NAMES[t]
    term = next((x for x in _lark().terminals if x.name == t), None)
    if term is not None and isinstance(term.pattern, lark.lexer.PatternStr):  # anonymous, e.g. __ANON_0 for '**'
        return f"'{term.pattern.value}'"
    return f"'{t.lower()}'" if t.isupper() else t


def _expected(tokens) -> str:
    return ", ".join(sorted({_token_name(t) for t in tokens}))


def _accepts(e: lark.exceptions.UnexpectedInput, fallback) -> set[str]:
    """The terminals the parser could take where it stopped (the lexer's `allowed` over-approximates)."""
    try:
        return e.interactive_parser.accepts() or set(fallback)
    except Exception:  # noqa: BLE001 - only a nicer "expected" list is lost
        return set(fallback)


def _decl(kind: str, name: str, shape, annotations, loc: Loc) -> ast.Decl:
    """A declaration whose annotations may carry a count: only `levels N` does (passes.lower checks the rest)."""
    names, levels = [], None
    for a in annotations:
        if isinstance(a, tuple):
            if a[0] != "levels":
                raise SpecError(f"annotation '{a[0]}' on '{name}' takes no count ({a[1]})", loc,
                                "a count only after 'levels', e.g. 'state A: [K, V] levels 16'")
            names.append(a[0])
            levels = a[1]
        else:
            if a == "levels":
                raise SpecError(f"'levels' on '{name}' needs a count", loc, "e.g. 'state A: [K, V] levels 16'")
            names.append(a)
    return ast.Decl(kind, name, shape, tuple(names), loc, levels)


class _Builder(lark.Transformer):
    def __init__(self, file: str, lines: list[str]):
        super().__init__()
        self.file, self.lines = file, lines

    def _loc(self, meta_or_tok) -> Loc:
        line = getattr(meta_or_tok, "line", 0) or 0
        col = getattr(meta_or_tok, "column", 0) or 0
        text = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        return Loc(self.file, line, col, text)

    # expressions
    @lark.v_args(meta=True)
    def number(self, meta, c):
        return ast.Number(float(c[0]), self._loc(meta))

    @lark.v_args(meta=True)
    def name(self, meta, c):
        return ast.Name(str(c[0]), self._loc(meta))

    def _bin(op):  # noqa: N805 - a rule factory
        @lark.v_args(meta=True)
        def rule(self, meta, c):
            return ast.BinOp(op, c[0], c[1], self._loc(meta))
        return rule

    add, sub, mul, div, matmul, pow = _bin("add"), _bin("sub"), _bin("mul"), _bin("div"), _bin("matmul"), _bin("pow")

    @lark.v_args(meta=True)
    def and_(self, meta, c):
        return ast.BinOp("and", c[0], c[1], self._loc(meta))

    @lark.v_args(meta=True)
    def or_(self, meta, c):
        return ast.BinOp("or", c[0], c[1], self._loc(meta))

    @lark.v_args(meta=True)
    def not_(self, meta, c):
        return ast.Call("not", (c[0],), self._loc(meta))

    @lark.v_args(meta=True)
    def compare(self, meta, c):
        """a < b <= c is (a < b) and (b <= c), as in Python."""
        names = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne"}
        operands, ops = c[0::2], [str(t) for t in c[1::2]]
        out = None
        for i, op in enumerate(ops):
            loc = self._loc(c[2 * i + 1])  # at the comparison operator
            term = ast.BinOp(names[op], operands[i], operands[i + 1], loc)
            out = term if out is None else ast.BinOp("and", out, term, loc)
        return out

    @lark.v_args(meta=True)
    def mask_stmt(self, meta, c):
        return ast.Mask(c[0], self._loc(meta))

    @lark.v_args(meta=True)
    def force_stmt(self, meta, c):
        return ast.Force(c[0], self._loc(meta))

    @lark.v_args(meta=True)
    def block_stmt(self, meta, c):
        return ast.BlockSize(int(c[0]), self._loc(meta))

    @lark.v_args(meta=True)
    def shared_stmt(self, meta, c):
        return ast.Shared(str(c[0]), self._loc(meta))

    @lark.v_args(meta=True)
    def criterion_stmt(self, meta, c):
        return ast.Criterion(str(c[0]), c[1], c[2], self._loc(meta), c[3])

    @lark.v_args(meta=True)
    def select_stage(self, meta, c):
        return ast.Stage("select", tuple(c), self._loc(meta))

    @lark.v_args(meta=True)
    def neg(self, meta, c):
        return ast.Neg(c[0], self._loc(meta))

    @lark.v_args(meta=True)
    def transpose(self, meta, c):
        return ast.Transpose(c[0], self._loc(meta))

    @lark.v_args(meta=True)
    def subscript(self, meta, c):
        return ast.Subscript(c[0], tuple(str(i.children[0]) for i in c[1:]), self._loc(meta))

    @lark.v_args(meta=True)
    def call(self, meta, c):
        args = tuple(a for a in c[1:] if a is not None)
        return ast.Call(str(c[0]), args, self._loc(meta))

    # declarations
    def shape(self, c):
        return tuple(str(t) for t in c if t is not None)

    def annotation(self, c):
        return str(c[0]) if len(c) == 1 or c[1] is None else (str(c[0]), int(c[1]))

    @lark.v_args(meta=True)
    def input_decl(self, meta, c):
        return _decl("input", str(c[0]), c[1], c[2:], self._loc(meta))

    @lark.v_args(meta=True)
    def output_decl(self, meta, c):
        return ast.Decl("output", str(c[0]), c[1], (), self._loc(meta))

    @lark.v_args(meta=True)
    def state_decl(self, meta, c):
        return _decl("state", str(c[0]), c[1], c[2:], self._loc(meta))

    @lark.v_args(meta=True)
    def param_decl(self, meta, c):
        return ast.Param(str(c[0]), c[1], self._loc(meta))

    @lark.v_args(meta=True)
    def chunk_decl(self, meta, c):
        return ("chunk", int(c[0]), self._loc(meta))

    @lark.v_args(meta=True)
    def keypos_decl(self, meta, c):
        return ast.KeyPos(str(c[0]), c[1], self._loc(meta))

    @lark.v_args(meta=True)
    def assign(self, meta, c):
        return ast.Assign(str(c[0]), c[1], self._loc(meta))

    @lark.v_args(meta=True)
    def stage(self, meta, c):
        return ast.Stage(str(c[0]), tuple(c[1:]), self._loc(meta))

    @lark.v_args(meta=True)
    def spec(self, meta, c):
        name, extends, members = str(c[0]), (str(c[1]) if c[1] is not None else None), c[2:]
        extends_loc = self._loc(c[1]) if c[1] is not None else self._loc(meta)
        decls = tuple(m for m in members if isinstance(m, ast.Decl))
        params = tuple(m for m in members if isinstance(m, ast.Param))
        stages = tuple(m for m in members if isinstance(m, ast.Stage))
        chunks = [m for m in members if isinstance(m, tuple)]
        if len(chunks) > 1:
            raise SpecError("chunk size declared twice", chunks[1][2], "one 'chunk N' line per spec")
        chunk, chunk_loc = (chunks[0][1], chunks[0][2]) if chunks else (None, self._loc(meta))
        keypos = tuple(m for m in members if isinstance(m, ast.KeyPos))
        branches = tuple(m for m in members if isinstance(m, ast.Branch))
        return ast.SpecDef(name, decls, params, chunk, stages, extends, self._loc(meta), chunk_loc, extends_loc,
                           keypos, branches)

    @lark.v_args(meta=True)
    def branch(self, meta, c):
        members = c[1:]
        return ast.Branch(str(c[0]), tuple(m for m in members if isinstance(m, ast.Decl)),
                          tuple(m for m in members if isinstance(m, ast.KeyPos)),
                          tuple(m for m in members if isinstance(m, ast.Stage)), self._loc(meta))

    @lark.v_args(meta=True)
    def def_stmt(self, meta, c):
        params = tuple(str(p) for p in c[1:-1] if p is not None)
        return ast.FuncDef(str(c[0]), params, c[-1], self._loc(meta))

    @lark.v_args(meta=True)
    def import_stmt(self, meta, c):
        return ("import", str(c[0])[1:-1], self._loc(c[0]))  # point at the file name

    def start(self, c):
        return list(c)


def _syntax_error(e: lark.exceptions.LarkError, file: str, lines: list[str]) -> SpecError:
    line, col = getattr(e, "line", 0), getattr(e, "column", 0)
    if isinstance(e, lark.UnexpectedToken) and e.token.type == "$END":  # just after the last token
        line, col = getattr(e.token, "end_line", None) or line, getattr(e.token, "end_column", None) or col
    if not isinstance(line, int) or not isinstance(col, int):  # lark uses '?' when it has no position
        line, col = 0, 0
    loc = Loc(file, line, col, lines[line - 1] if 0 < line <= len(lines) else "")
    if isinstance(e, lark.UnexpectedToken):
        expected = _accepts(e, e.expected)
        if e.token.type == "$END":
            return SpecError("unexpected end of file", loc, _expected(expected))
        hint = " (a keyword, not usable as a name)" if e.token.type in _KEYWORDS and "NAME" in expected else ""
        return SpecError(f"unexpected '{e.token}'{hint}", loc, _expected(expected))
    if isinstance(e, lark.UnexpectedCharacters):
        if e.char == '"' and "STRING" in e.allowed:
            return SpecError("unterminated string", loc, 'a closing " on the same line')
        return SpecError(f"unexpected character {e.char!r}", loc, _expected(_accepts(e, e.allowed)))
    if isinstance(e, lark.UnexpectedEOF):
        return SpecError("unexpected end of file", loc, _expected(e.expected))
    if isinstance(e, lark.exceptions.VisitError) and isinstance(e.orig_exc, SpecError):
        return e.orig_exc
    return SpecError(str(e), loc)


# Nesting of the parse tree (operators, calls, parentheses around operators): building the AST and lowering it
# recurse a few Python frames per level, and Python's stack holds ~1000. Hand-written specs nest ~10 deep.
MAX_DEPTH = 100


def _check_depth(tree: lark.Tree, file: str, lines: list[str]) -> None:
    """Fail at the first node nested deeper than MAX_DEPTH, walking the tree without recursion."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            line, col = getattr(node.meta, "line", 0), getattr(node.meta, "column", 0)
            raise SpecError(f"the spec nests more than {MAX_DEPTH} levels deep here", Loc(
                file, line, col, lines[line - 1] if 0 < line <= len(lines) else ""),
                "shallower expressions (fewer nested operators and calls): name parts in earlier assignments")
        stack += [(c, depth + 1) for c in node.children if isinstance(c, lark.Tree)]


def parse(text: str, file: str = "<string>", _seen: frozenset[str] = frozenset()) -> ast.Module:
    """Parse `.attn` source; `import "x.attn"` is resolved relative to `file`, then the library."""
    lines = text.splitlines()
    try:
        tree = _lark().parse(text)
        _check_depth(tree, file, lines)
        items = _Builder(file, lines).transform(tree)
    except lark.exceptions.VisitError as e:
        if isinstance(e.orig_exc, SpecError):
            raise e.orig_exc from None
        raise
    except lark.exceptions.LarkError as e:
        raise _syntax_error(e, file, lines) from None
    funcs: dict[str, ast.FuncDef] = {}
    specs: dict[str, ast.SpecDef] = {}
    for item in items:
        if isinstance(item, tuple):  # import
            imported = _import(item[1], item[2], file, _seen)
            for what, defined, names in (("def", imported.funcs, funcs), ("spec", imported.specs, specs)):
                for d in defined:
                    _define(names, d, what, item)
        else:
            _define(funcs if isinstance(item, ast.FuncDef) else specs, item,
                    "def" if isinstance(item, ast.FuncDef) else "spec")
    local = tuple(i.name for i in items if isinstance(i, ast.SpecDef))
    return ast.Module(tuple(funcs.values()), tuple(specs.values()), file, local)


def _define(names: dict, item, what: str, import_=None) -> None:
    """Add a def or spec, defined here or by `import_` (its ("import", file, loc) item). A name is defined
    once: an import must not replace a local definition, nor a local one an import's (one definition reached
    through two imports is the same one)."""
    first = names.get(item.name)
    if first is not None and _where(first.loc) != _where(item.loc):
        if import_ is None:
            raise SpecError(f"{what} '{item.name}' is defined twice (first at {first.loc})", item.loc,
                            f"one {what} per name, in a file and the files it imports")
        raise SpecError(f'import "{import_[1]}" defines {what} \'{item.name}\' again (at {item.loc}; first at '
                        f"{first.loc})", import_[2], f"one {what} per name, in a file and the files it imports")
    names[item.name] = item


def _where(loc: Loc) -> tuple:
    return (str(Path(loc.file).resolve()), loc.line, loc.column)


def _import(target: str, loc: Loc, file: str, seen: frozenset[str]) -> ast.Module:
    from ..library import LIBRARY_DIR

    candidates = [Path(file).parent / target, LIBRARY_DIR / target]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise SpecError(f'cannot import "{target}": no such file', loc,
                        f"a path relative to {Path(file).parent} or a library file")
    key = str(path.resolve())
    if key in seen:
        raise SpecError(f'import cycle through "{target}"', loc, "imports that form no cycle")
    return parse(_read(path), str(path), seen | {key, str(Path(file).resolve())})


def _read(path: Path) -> str:
    """A spec file's text. A byte that is not UTF-8 is an error at its line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        start = data.rfind(b"\n", 0, e.start) + 1
        end = data.find(b"\n", e.start)
        text = data[start:end if end >= 0 else len(data)].decode("utf-8", errors="replace")
        col = len(data[start:e.start].decode("utf-8", errors="replace")) + 1
        loc = Loc(str(path), data.count(b"\n", 0, e.start) + 1, col, text)
        raise SpecError(f"the file is not UTF-8 text: byte {e.start} is 0x{data[e.start]:02x}", loc,
                        "a spec file saved as UTF-8") from None


def parse_file(path: str | Path) -> ast.Module:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"no such spec file: {path}")
    return parse(_read(path), str(path), frozenset({str(path.resolve())}))
