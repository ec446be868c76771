"""effc: compile declarative attention specs (.attn) into fused Triton kernels.

    import effc
    gla = effc.load("gla")                 # a library spec, or a path to your .attn file
    o, final_state = gla(q, k, v, g, output_final_state=True)
"""
__version__ = "0.1.0"


def load(ref, name: str | None = None, backend: str = "triton"):
    """Compile a spec (library name, `path.attn` or `path.attn:spec`) into a callable op."""
    from .runtime.compiler import compile_file
    from .runtime.softmax_op import make_op  # AttentionOp, or SoftmaxOp for specs with a score stage
    return make_op(compile_file(ref, name), backend)


def loads(text: str, name: str | None = None, backend: str = "triton"):
    """Compile spec source text into a callable op."""
    from .runtime.compiler import compile_text
    from .runtime.softmax_op import make_op
    return make_op(compile_text(text, name), backend)


def library_names(family: str | None = None) -> list[str]:
    """Names of the specs in the library (`effc.load(name)` compiles one); `family` keeps only the
    'linear' (chunked state), 'softmax' (score stage) or 'hybrid' ones."""
    from .library import library_family, library_files
    return [p.stem for p in library_files() if family is None or library_family(p) == family]


def __getattr__(name):  # lazy, so `import effc` stays cheap
    if name == "attention_spec":
        from .dsl.pyfront import attention_spec
        return attention_spec
    if name in ("SpecError", "ArgumentError"):
        from . import errors
        return getattr(errors, name)
    raise AttributeError(name)
