"""On-disk cache of generated modules, keyed by a hash of the source (which covers the spec,
the plan and the codegen version). Writes are atomic so concurrent processes never see halves."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    root = Path(os.environ.get("EFFC_CACHE_DIR", Path.home() / ".cache" / "effc"))
    return root


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def load_module(name: str, source: str):
    """Import the generated `source` as a module, through a file in the cache: Triton's JIT reads a
    kernel's source from its file. A file that is not `source` byte for byte (garbage, a truncated
    write) is rewritten, and the module is compiled from `source` itself, never from the file's
    bytecode, so no damaged file can stand in for it."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    mod_name = f"effc_gen_{name}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name], cache_dir() / "kernels" / f"{mod_name}.py"
    path = cache_dir() / "kernels" / f"{mod_name}.py"
    if _read(path) != source.encode():
        write_atomic(path, source)
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    exec(compile(source, str(path), "exec", dont_inherit=True), module.__dict__)
    return module, path
