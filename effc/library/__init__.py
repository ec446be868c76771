"""The spec library: one .attn file per documented mechanism."""
from pathlib import Path

LIBRARY_DIR = Path(__file__).parent


def library_files() -> list[Path]:
    return sorted(p for p in LIBRARY_DIR.glob("*.attn") if not p.name.startswith("_"))
