from .emit import emit_module  # noqa: F401
