"""The driver: text -> AST, then the passes of `PIPELINE` on demand, then source; each stage kept for
`effc show`."""
from __future__ import annotations

import re
from pathlib import Path

from ..dsl import ast, parse, parse_file
from ..errors import CodegenError, SpecError, suggest
from ..ir.nodes import Spec
from ..library import LIBRARY_DIR, library_files
from .pipeline import FAMILIES, PASSES, Family

BACKENDS = ("triton", "tilelang")


def resolve_spec_path(ref: str) -> tuple[Path, str | None]:
    """'gla', 'library/gla.attn', 'my.attn' or 'my.attn:name' -> (path, spec name or None)."""
    name = None
    if ":" in ref and not Path(ref).exists():
        ref, name = ref.rsplit(":", 1)
    p = Path(ref)
    if p.is_file():
        return p, name
    lib = LIBRARY_DIR / (ref if ref.endswith(".attn") else f"{ref}.attn")
    if lib.is_file():
        return lib, name
    return p, name  # parse_file reports the missing file


class Compilation:
    """All stages of compiling one spec, each computed on first use: `comp.ir`, `comp.typed`, ... one
    attribute per pass of `PIPELINE`, then `comp.source(backend)`."""

    def __init__(self, module: ast.Module | None, name: str | None = None, *, ir: Spec | None = None):
        self.module, self.name = module, name
        self._stages: dict[str, object] = {} if ir is None else {"ir": ir}
        self._branches: dict[str, Compilation] = {}

    @classmethod
    def of_ir(cls, spec: Spec) -> "Compilation":
        """A compilation that starts from IR (a hybrid's branch) rather than text."""
        return cls(None, spec.name, ir=spec)

    def __getattr__(self, stage: str):
        if stage.startswith("_") or stage not in PASSES:
            raise AttributeError(stage)
        if stage not in self._stages:
            self._stages[stage] = PASSES[stage].run(self)
        return self._stages[stage]

    @property
    def rules(self) -> Family:
        return FAMILIES[self.ir.family]

    @property
    def schedule_name(self) -> str:
        return self.rules.schedule

    @property
    def branch_split(self):
        """A spec with branches: its branches' specs (passes.branches)."""
        if "_branch_split" not in self._stages:
            from ..passes.branches import split_branches
            name = self.name or (self.module.local or tuple(s.name for s in self.module.specs))[0]
            self._stages["_branch_split"] = split_branches(self.module, name)
        return self._stages["_branch_split"]

    @property
    def parts(self) -> list["Compilation"]:
        """A spec with branches: each branch's spec compiled on its own, in the order they run."""
        split = self.branch_split
        return [self._branches.setdefault(p, Compilation(split.module, p)) for p in split.parts]

    def branch(self, family: str) -> "Compilation":
        """A hybrid's softmax or linear branch, compiled on its own."""
        if family not in self._branches:
            self._branches[family] = Compilation.of_ir(getattr(self.split, family))
        return self._branches[family]

    def source(self, backend: str = "triton") -> str:
        return checked_source(self.emit(backend), self.typed.name, backend)

    def emit(self, backend: str) -> str:
        """The generated module's text, unchecked (`source` checks that it compiles)."""
        if backend not in BACKENDS:
            raise NotImplementedError(f"unknown backend '{backend}'; available: {', '.join(BACKENDS)}")
        return self.rules.emit(self, backend)

def checked_source(source: str, spec: str, backend: str) -> str:
    """Generated source must compile before anything writes or imports it: a code generator bug is then an
    error naming the spec and the kernel, not a SyntaxError from a cached file (or a module `effc compile`
    reports written)."""
    try:
        compile(source, f"<effc {spec} {backend}>", "exec", dont_inherit=True)
    except SyntaxError as e:
        lines = source.splitlines()
        where = next((m.group(1) for line in reversed(lines[:e.lineno or 0])
                      if (m := re.match(r"def (\w+)\(", line))), "module level")
        text = lines[e.lineno - 1].strip() if e.lineno and e.lineno <= len(lines) else ""
        raise CodegenError(f"internal error: the generated {backend} source of spec '{spec}' does not compile "
                           f"({e.msg}, line {e.lineno}, in {where}: {text[:160]}); this is an effc bug, "
                           "please report it with the spec") from None
    return source


def compile_file(ref: str | Path, name: str | None = None) -> Compilation:
    path, n = resolve_spec_path(str(ref))
    if not path.is_file():
        names = [p.stem for p in library_files()]
        raise SpecError(f"no such spec file or library spec: {ref}"
                        + (suggest(path.stem, names) or f"; library specs: {', '.join(names)}"))
    return _with_branch_parts(parse_file(path), name or n)


def _with_branch_parts(module: ast.Module, name: str | None) -> Compilation:
    """A compilation of spec `name`, which may be a branch's own spec (`nsa:nsa__cmp`: passes.branches names
    them `<spec>__<branch>`): what `effc tune` times, one walk at a time."""
    known = {s.name for s in module.specs}
    if name and name not in known and "__" in name:
        base = name.rsplit("__", 1)[0]
        if base in known and module.family(base) == "branched":
            return Compilation(Compilation(module, base).branch_split.module, name)
    return Compilation(module, name)


def compile_text(text: str, name: str | None = None, file: str = "<string>") -> Compilation:
    return Compilation(parse(text, file), name)
