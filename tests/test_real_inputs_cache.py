"""The on-disk cache under faults a real machine produces: garbage or truncated files in place of a
generated module or a tuning entry, a cache dir that cannot be written, a generated module that fails to
import. Each is detected and repaired (or worked around) by effc, never left to fail every call until the
cache is cleared by hand."""
from __future__ import annotations

import importlib.util
import json
import marshal
import sys
import warnings

import pytest
import torch

import effc
import effc.library
from effc.runtime.cache import load_module
from effc.runtime.verify import judge_fp32, random_inputs


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _source(tag: str, body: str = "VALUE = 42\n\ndef f(x: int):\n    return x\n") -> str:
    """A module source of its own (the module name hashes the source: tests never share a module)."""
    return f"# effc cache test: {tag}\n{body}"


# ---- garbage in a generated module's file ------------------------------------------------------------

@pytest.mark.parametrize("garbage", [
    b"\xff\xfe\x00\x81 not python, not UTF-8 \xc3",  # binary
    "# effc cache test: truncated ü".encode()[:-1],  # a truncated write, cut inside a UTF-8 character
    b"VALUE = 41\n",  # valid Python, but not what was generated
], ids=["binary", "truncated", "foreign"])
def test_garbage_module_file_is_rewritten(cache, garbage, request):
    source = _source(request.node.name)
    _, path = load_module("garbage", source)
    sys.modules.pop(path.stem)  # as in a fresh process
    path.write_bytes(garbage)
    module, path2 = load_module("garbage", source)
    assert module.VALUE == 42 and path2 == path and path.read_text() == source


def test_damaged_bytecode_beside_the_module_is_not_used(cache, request):
    """A .pyc whose header matches the source (as Python's own cache would write it) but whose body is
    garbage, e.g. cut short by a full disk: the module still imports, from its source."""
    source = _source(request.node.name)
    _, path = load_module("pyc", source)
    sys.modules.pop(path.stem)
    pyc = importlib.util.cache_from_source(str(path))
    st = path.stat()
    header = importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little") + \
        (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    (path.parent / "__pycache__").mkdir(exist_ok=True)
    with open(pyc, "wb") as f:
        f.write(header + marshal.dumps(compile(source, str(path), "exec"))[:7])
    module, _ = load_module("pyc", source)
    assert module.VALUE == 42
    assert module.f.__annotations__ == {"x": int}  # compiled as the file would be: no __future__ flags of effc's


def test_an_op_recovers_from_a_garbage_kernel_module(cache):
    """The whole path: gla's generated module overwritten with garbage between two processes (a copy of gla
    named for this test, so no earlier test has imported its module)."""
    text = (effc.library.LIBRARY_DIR / "gla.attn").read_text().replace("spec gla", "spec gla_garbage")
    op = effc.loads(text)
    xs = random_inputs(op.spec, 1, 20, 2, {"K": 16, "V": 16})
    op.module  # noqa: B018 - compiles and caches
    path = op.source_path
    sys.modules.pop(path.stem)
    path.write_bytes(b"\x00\x9c garbage \xff" * 100)
    fresh = effc.loads(text)
    fresh.module  # noqa: B018 - what a fresh process's first call does
    assert fresh.source_path == path and path.read_text() == fresh.comp.source("triton")
    out, _ = fresh(*xs, chunk=16)
    assert judge_fp32(out, fresh.reference(*xs)[0]).ok
