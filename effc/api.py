"""The user's entry points: compile a spec (a library name, a file, text or a decorated function) into a
callable op; run an op per memory over routed tokens (`route_to_memories`)."""
from __future__ import annotations

from .compiler import Compilation, compile_file, compile_text
from .dsl import parse_file
from .dsl.pyfront import parse_function
from .library import library_files
from .runtime.routing import route_to_memories
from .runtime.softmax_op import make_op


def load(ref, name: str | None = None, backend: str = "triton"):
    """Compile a spec (library name, `path.attn` or `path.attn:spec`) into a callable op."""
    return make_op(compile_file(ref, name), backend)


def loads(text: str, name: str | None = None, backend: str = "triton"):
    """Compile spec source text into a callable op."""
    return make_op(compile_text(text, name), backend)


def attention_spec(fn=None, *, chunk: int | None = None, backend: str = "triton"):
    """Decorator: `@attention_spec` or `@attention_spec(chunk=64)`; returns the compiled op, as effc.load does."""
    if fn is None:
        return lambda f: attention_spec(f, chunk=chunk, backend=backend)
    if not callable(fn):
        raise TypeError(f"@attention_spec takes a function, got {fn!r}; write @attention_spec(chunk=...)")
    return make_op(Compilation(parse_function(fn, chunk), None), backend)


def library_names(family: str | None = None) -> list[str]:
    """Names of the specs in the library (`effc.load(name)` compiles one); `family` keeps only the
    'linear' (chunked state), 'softmax' (score stage) or 'hybrid' ones."""
    return [p.stem for p in library_files() if family is None or parse_file(p).family() == family]


__all__ = ["attention_spec", "library_names", "load", "loads", "route_to_memories"]
