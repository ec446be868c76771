from .emit import emit_module, factory_name, kernel_params  # noqa: F401
