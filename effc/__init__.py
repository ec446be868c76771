"""effc: compile declarative attention specs (.attn) into fused Triton kernels.

    import effc
    gla = effc.load("gla")                 # a library spec, or a path to your .attn file
    o, final_state = gla(q, k, v, g, output_final_state=True)
"""
from .version import __version__

__all__ = ["__version__", "load", "loads", "attention_spec", "library_names", "route_to_memories", "SpecError",
           "ArgumentError"]


def __getattr__(name):  # lazy, so `import effc` stays cheap (no torch until an op is built)
    if name in ("load", "loads", "attention_spec", "library_names", "route_to_memories"):
        from . import api
        return getattr(api, name)
    if name in ("SpecError", "ArgumentError"):
        from . import errors
        return getattr(errors, name)
    raise AttributeError(name)
