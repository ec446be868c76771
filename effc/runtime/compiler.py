"""The pipeline driver: text -> AST -> IR -> passes -> plan -> source, each stage kept for `effc show`."""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..dsl import ast, parse, parse_file
from ..errors import CodegenError, SpecError, suggest
from ..ir.nodes import Spec
from ..library import LIBRARY_DIR
from ..passes.autodiff import Backward, differentiate
from ..passes.fusion import Fused, fuse
from ..passes.grad_terms import place_gradient_terms
from ..passes.hoist import hoist
from ..passes.reverse_scan import split_reverse_scan
from ..passes.legality import Legality, analyze
from ..passes.lower import lower
from ..passes.plan import Plan, plan
from ..passes.shapes import infer_shapes

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


@dataclass
class Compilation:
    """All stages of compiling one spec; each computed on first use."""

    module: ast.Module
    name: str | None = None

    @cached_property
    def ir(self) -> Spec:
        return lower(self.module, self.name)

    @cached_property
    def typed(self) -> Spec:
        return infer_shapes(self.ir)

    @cached_property
    def legality(self) -> Legality:
        return analyze(self.typed)

    @cached_property
    def backward(self) -> Backward:
        return differentiate(self.typed)

    @cached_property
    def fused(self) -> Fused:
        fused = fuse(self.typed, self.legality, self.backward)
        split = self.legality.split_dims[0] if self.legality.split_dims else None
        fused = place_gradient_terms(self.typed, fused, self.backward, split)
        return split_reverse_scan(self.typed, hoist(self.typed, fused))

    @cached_property
    def plan(self) -> Plan:
        return plan(self.typed, self.legality, self.fused, self.backward)

    def source(self, backend: str = "triton") -> str:
        return checked_source(self._source(backend), self.typed.name, backend)

    def _source(self, backend: str) -> str:
        if backend not in BACKENDS:
            raise NotImplementedError(f"unknown backend '{backend}'; available: {', '.join(BACKENDS)}")
        if backend == "tilelang":
            from ..codegen.tilelang import emit_module as emit_tilelang
            return emit_tilelang(self.plan)
        from ..codegen.triton import emit_module
        return emit_module(self.plan)


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


def _has_score(module: ast.Module, name: str | None) -> bool:
    """Does the spec (or a spec it extends) have a score stage? Then it is of the softmax family."""
    specs = {s.name: s for s in module.specs}
    local = module.local or tuple(specs)
    s = specs.get(name) if name else (specs.get(local[0]) if len(local) == 1 else None)
    seen = set()
    while s is not None and s.name not in seen:
        seen.add(s.name)
        if any(st.name in ("score", "prefix") for st in s.stages):
            return True
        s = specs.get(s.extends) if s.extends else None
    return False


def _compilation(module: ast.Module, name: str | None) -> Compilation:
    if _has_score(module, name):  # the softmax family: runtime.softmax_compiler
        from .softmax_compiler import SoftmaxCompilation
        return SoftmaxCompilation(module, name)
    return Compilation(module, name)


def compile_file(ref: str | Path, name: str | None = None) -> Compilation:
    path, n = resolve_spec_path(str(ref))
    if not path.is_file():
        from ..library import library_files
        names = [p.stem for p in library_files()]
        raise SpecError(f"no such spec file or library spec: {ref}"
                        + (suggest(path.stem, names) or f"; library specs: {', '.join(names)}"))
    return _compilation(parse_file(path), name or n)


def compile_text(text: str, name: str | None = None, file: str = "<string>") -> Compilation:
    return _compilation(parse(text, file), name)
