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
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_module(name: str, source: str):
    """Write `source` to the cache (once) and import it; Triton's JIT needs a real file."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    mod_name = f"effc_gen_{name}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name], cache_dir() / "kernels" / f"{mod_name}.py"
    path = cache_dir() / "kernels" / f"{mod_name}.py"
    if not path.is_file() or path.read_text() != source:
        write_atomic(path, source)
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module, path
