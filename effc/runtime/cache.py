"""On-disk cache of generated modules, keyed by a hash of the source (which covers the spec,
the plan and the codegen version). Writes are atomic so concurrent processes never see halves.

The cache dir is $EFFC_CACHE_DIR (default ~/.cache/effc). Where a write there fails (a read-only
folder, a path through a regular file), the process goes on with a temporary dir of its own, deleted
at exit, and warns once; reads never need that, so a read-only cache holding what a process needs
serves it as it is."""
from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from .checks import interpreting

_stand_ins: dict[Path, Path] = {}  # a cache dir that could not be written -> this process's temporary one


def cache_dir() -> Path:
    root = Path(os.environ.get("EFFC_CACHE_DIR", Path.home() / ".cache" / "effc"))
    return _stand_ins.get(root, root)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> Path:
    """Write `path` (a file under cache_dir()) in one step; returns where it went: the same place under
    the process's temporary cache dir when the cache dir cannot be written."""
    try:
        _write(path, text)
        return path
    except OSError as e:
        root = cache_dir()
        if root in _stand_ins.values() or not path.is_relative_to(root):
            raise
        stand_in = _stand_ins[root] = Path(tempfile.mkdtemp(prefix="effc-cache-"))
        atexit.register(shutil.rmtree, stand_in, ignore_errors=True)
        warnings.warn(f"cannot write to effc's cache dir {root} ({type(e).__name__}: {e}); this process uses "
                      f"{stand_in} instead, deleted at exit (the kernels it compiles and the tunings it "
                      "measures are not kept). Set EFFC_CACHE_DIR to a writable folder to keep them.", stacklevel=3)
        return write_atomic(stand_in / path.relative_to(root), text)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def op_module(modules: dict, name: str, source) -> tuple:
    """(module, path) of an op's generated `source()` for the process's current Triton mode, kept in the op's
    `modules` (one per mode: see load_module)."""
    mode = interpreting()
    if mode not in modules:
        modules[mode] = load_module(name, source())
    return modules[mode]


def load_module(name: str, source: str):
    """Import the generated `source` as a module, through a file in the cache: Triton's JIT reads a
    kernel's source from its file. A file that is not `source` byte for byte (garbage, a truncated
    write) is rewritten, and the module is compiled from `source` itself, never from the file's
    bytecode, so no damaged file can stand in for it. A module that fails to import is not kept: the
    next call imports it again. Triton's JIT fixes a kernel's mode (compiled, or its interpreter) when its module
    is imported, so the process keeps one module per mode: a module imported with TRITON_INTERPRET unset
    (`effc memory`'s dry run) does not answer a later import under the interpreter, nor the reverse."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    mod_name = f"effc_gen_{name}_{digest}" + ("_interpreted" if interpreting() else "")
    if mod_name in sys.modules:
        return sys.modules[mod_name], Path(sys.modules[mod_name].__file__)
    path = cache_dir() / "kernels" / f"{mod_name}.py"
    if _read(path) != source.encode():
        path = write_atomic(path, source)
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        exec(compile(source, str(path), "exec", dont_inherit=True), module.__dict__)
    except BaseException:
        sys.modules.pop(mod_name, None)  # a half-initialised module would answer every retry in this process
        raise
    return module, path
