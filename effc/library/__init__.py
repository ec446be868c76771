"""The spec library: one .attn file per documented mechanism."""
from pathlib import Path

LIBRARY_DIR = Path(__file__).parent


def library_files() -> list[Path]:
    return sorted(p for p in LIBRARY_DIR.glob("*.attn") if not p.name.startswith("_"))


def library_family(path: Path) -> str:
    """'linear' (a chunked state) or 'softmax' (a score stage; with a state too, 'hybrid'), read from the AST."""
    from ..dsl import parse_file
    from ..runtime.compiler import _has_score
    module = parse_file(path)
    if not _has_score(module, None):
        return "linear"
    return "hybrid" if any(d.kind == "state" for s in module.specs for d in s.decls) else "softmax"
