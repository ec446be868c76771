"""Front ends: `.attn` text (parser) and Python functions (@attention_spec), both -> dsl.ast."""
from .parser import parse, parse_file  # noqa: F401
