"""The on-disk cache under faults a real machine produces: garbage or truncated files in place of a
generated module or a tuning entry, a cache dir that cannot be written, a generated module that fails to
import. Each is detected and repaired (or worked around) by effc, never left to fail every call until the
cache is cleared by hand."""
from __future__ import annotations

import importlib.util
import json
import marshal
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import effc
import effc.library
from effc.tools.cli import app
from effc.policy.tiling import Problem
from effc.runtime.cache import load_module
from effc.policy.tuning import TuningKey, known_faults, read_entry, record_fault, store
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


# ---- corrupt tuning entries and fault records --------------------------------------------------------

TUNED = {"chunk": 16, "block": 16, "segments": 2, "num_warps": 8, "num_stages": 2, "defer_merge": 0}
DIMS16 = {"K": 16, "V": 16}
SMALL = Problem(2, 40, 2, tuple(DIMS16.items()))


def _entry_json(of: TuningKey, **changes) -> str:
    raw = {"format": 1, "key": {**of.__dict__}, "config": TUNED, "ms": 0.5, "default": TUNED, "default_ms": 1.0,
           "shape": {"B": 2, "T": 40, "H": 2}, "tried": 3, "tuned_at": 0.0}
    for k, v in changes.items():
        raw[k] = v(raw[k]) if callable(v) else v
    return json.dumps(raw)


CORRUPT_ENTRIES = {
    "binary": lambda key: b"\x00\xff\xfe garbage \x81",
    "truncated": lambda key: _entry_json(key)[:40].encode(),
    "deeply nested": lambda key: b"[" * 100_000 + b"]" * 100_000,
    "config a list": lambda key: _entry_json(key, config=list(TUNED)).encode(),
    "config values": lambda key: _entry_json(key, config={**TUNED, "chunk": "16"}).encode(),
    "key a list": lambda key: _entry_json(key, key=list(key.__dict__.values())).encode(),
    "key field types": lambda key: _entry_json(key, key=lambda k: {**k, "spec": ["retention"], "codegen": "1"}).encode(),
    "shape a string": lambda key: _entry_json(key, shape="2x40x2").encode(),
    "ms a string": lambda key: _entry_json(key, ms="fast").encode(),
    "ms zero": lambda key: _entry_json(key, ms=0).encode(),
    "ms NaN": lambda key: _entry_json(key, default_ms=float("nan")).encode(),
}


@pytest.fixture(scope="module")
def retention():
    return effc.load("retention")


@pytest.mark.parametrize("corrupt", CORRUPT_ENTRIES.values(), ids=CORRUPT_ENTRIES.keys())
def test_corrupt_tuning_entry_is_ignored_then_rewritten(retention, cache, corrupt):
    key = TuningKey.of(retention, SMALL, "cpu", torch.float32)
    key.path.parent.mkdir(parents=True)
    key.path.write_bytes(corrupt(key))
    with pytest.warns(UserWarning, match=f"ignoring unreadable entry {key.path}"):
        assert read_entry(key.path) is None
    op = effc.load("retention")
    with pytest.warns(UserWarning, match=key.path.name):  # the op falls back to the model's choice
        cfg = op.config(2, 40, 2, DIMS16, "cpu", dtype=torch.float32)
    assert not cfg.reasons[0].startswith("tuned")
    result = CliRunner().invoke(app, ["cache", "ls"])
    assert result.exit_code == 0 and f"corrupt: {key.path.name}" in result.output, result.output
    store(key, TUNED, 0.5, TUNED, 1.0, {"B": 2, "T": 40, "H": 2})  # the next `effc tune` rewrites it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_entry(key.path).config == TUNED
        assert effc.load("retention").config(2, 40, 2, DIMS16, "cpu", dtype=torch.float32).num_warps == 8


@pytest.mark.parametrize("garbage", [b"\x00\xff garbage", b'{"variant": [16, 16', b"[" * 100_000 + b"]" * 100_000,
                                     b'{"variant": {"a": 1}, "reason": "x"}', b'[1, 2]'],
                         ids=["binary", "truncated", "deeply nested", "variant a dict", "a list"])
def test_corrupt_fault_record_is_ignored(retention, cache, garbage):
    good = record_fault(retention, "FakeGPU", (16, 16, 4, 2, 0), "illegal memory access")
    (good.parent / "32-16-4-2-0.json").write_bytes(garbage)
    assert known_faults(retention, "FakeGPU") == {(16, 16, 4, 2, 0): "illegal memory access"}


# ---- a cache dir that cannot be written --------------------------------------------------------------
# Tests run as root, where a read-only mode does not stop writes: a path below a regular file, a regular
# file, and a write that raises PermissionError stand in for a read-only dir.

def _below_a_file(tmp):
    (tmp / "a_file").write_text("not a folder")
    return tmp / "a_file" / "cache"


def _a_file(tmp):
    (tmp / "a_file").write_text("not a folder")
    return tmp / "a_file"


def _permission_denied(tmp, monkeypatch):
    root = tmp / "read_only"
    root.mkdir()
    mkstemp = tempfile.mkstemp

    def denied(*args, dir=None, **kw):
        if dir is not None and Path(dir).is_relative_to(root):
            raise PermissionError(13, "Permission denied", str(dir))
        return mkstemp(*args, dir=dir, **kw)
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    return root


UNWRITABLE = {"below_a_file": lambda tmp, mp: _below_a_file(tmp), "a_file": lambda tmp, mp: _a_file(tmp),
              "permission_denied": _permission_denied}


@pytest.mark.parametrize("how", UNWRITABLE)
def test_unwritable_cache_dir_falls_back_to_a_temporary_one(tmp_path, monkeypatch, how):
    root = UNWRITABLE[how](tmp_path, monkeypatch)
    monkeypatch.setenv("EFFC_CACHE_DIR", str(root))
    # a spec of its own per case: its module is not yet imported, so loading it writes
    op = effc.loads((effc.library.LIBRARY_DIR / "retention.attn").read_text().replace("retention", f"retention_{how}"))
    xs = random_inputs(op.spec, 1, 20, 2, DIMS16)
    with pytest.warns(UserWarning, match=f"cannot write to effc's cache dir {root}.*EFFC_CACHE_DIR") as caught:
        op.module  # noqa: B018
    assert len(caught) == 1
    assert not op.source_path.is_relative_to(root) and op.source_path.read_text() == op.comp.source("triton")
    with warnings.catch_warnings():  # warned once: the rest of the process uses the temporary dir quietly
        warnings.simplefilter("error", UserWarning)
        out, _ = op(*xs, chunk=16)
        assert judge_fp32(out, op.reference(*xs)[0]).ok
        key = TuningKey.of(op, SMALL, "cpu", torch.float32)
        path = store(key, TUNED, 0.5, TUNED, 1.0, {"B": 2, "T": 40, "H": 2})
        assert path.parent.parent == op.source_path.parent.parent and read_entry(path).config == TUNED
        assert op.config(2, 40, 2, DIMS16, "cpu", dtype=torch.float32).num_warps == 8
        fault = record_fault(op, "FakeGPU", (16, 16, 4, 2, 0), "illegal memory access")
        assert fault.is_relative_to(path.parent) and known_faults(op, "FakeGPU")


def test_a_cache_dir_below_a_file_reads_as_empty(retention, tmp_path, monkeypatch):
    """Reading finds nothing there, quietly: only a write needs the fallback (a read-only cache that holds
    what the process needs is used as it is)."""
    monkeypatch.setenv("EFFC_CACHE_DIR", str(_below_a_file(tmp_path)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_entry(TuningKey.of(retention, SMALL, "cpu", torch.float32).path) is None
        assert known_faults(retention, "FakeGPU") == {}
        result = CliRunner().invoke(app, ["cache", "ls"])
    assert result.exit_code == 0 and "no tuning entries" in result.output


# ---- a generated module that fails to import ---------------------------------------------------------

def test_failed_import_leaves_nothing_behind(cache, monkeypatch, request):
    """The module raises at import (here: a missing environment variable, in real use e.g. a Triton that
    rejects a kernel at decoration): the retry after the cause is fixed imports it, instead of getting
    the half-initialised module the first attempt left in sys.modules."""
    source = _source(request.node.name, "import os\nVALUE = int(os.environ['EFFC_TEST_IMPORT_VALUE'])\n")
    monkeypatch.delenv("EFFC_TEST_IMPORT_VALUE", raising=False)
    with pytest.raises(KeyError, match="EFFC_TEST_IMPORT_VALUE"):
        load_module("failing", source)
    assert not [m for m in sys.modules if m.startswith("effc_gen_failing_")]
    with pytest.raises(KeyError):  # still failing: raises again, every time
        load_module("failing", source)
    monkeypatch.setenv("EFFC_TEST_IMPORT_VALUE", "42")
    module, _ = load_module("failing", source)
    assert module.VALUE == 42
