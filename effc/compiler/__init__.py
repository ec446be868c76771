"""The compiler: text -> AST -> IR -> the passes of `PIPELINE` -> plan -> source."""
from .driver import (
           BACKENDS,
           Compilation,
           checked_source,
           compile_file,
           compile_text,
           resolve_spec_path,
)
from .pipeline import FAMILIES, PIPELINE

__all__ = ["BACKENDS", "FAMILIES", "PIPELINE", "Compilation", "checked_source", "compile_file", "compile_text",
           "resolve_spec_path"]
