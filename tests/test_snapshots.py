"""Golden snapshots of what the compiler makes of every library spec and example: the typed IR, the kernel
plan and the generated Triton and TileLang source (`effc show --stage ...`), under tests/snapshots/.
A change that moves no behaviour changes no snapshot; one that does shows the diff, explained in its commit.
Regenerate after an intended change with

    EFFC_UPDATE_SNAPSHOTS=1 python -m pytest -q tests/test_snapshots.py
"""
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import effc
from effc.tools.cli import app

ROOT = Path(__file__).parent
SNAPSHOTS = ROOT / "snapshots"
EXAMPLES = sorted((ROOT.parent / "examples").glob("*.attn"))
SPECS = [(n, n) for n in effc.library_names()] + [(p.stem, str(p)) for p in EXAMPLES]
VIEWS = {"typed": ["--stage", "typed"], "plan": ["--stage", "plan"], "triton": ["--stage", "source"],
         "tilelang": ["--stage", "source", "--backend", "tilelang"]}
_VOLATILE = re.compile(r"effc \d+\.\d+\.\d+")  # the version line of generated modules


def _show(ref: str, args: list[str]) -> str:
    result = CliRunner().invoke(app, ["show", ref, *args])
    # a stage a family cannot produce is part of the snapshot: its error says so
    return _VOLATILE.sub("effc X", result.output) + ("" if result.exit_code == 0 else f"[exit {result.exit_code}]\n")


@pytest.mark.parametrize("name, ref", SPECS, ids=[n for n, _ in SPECS])
def test_snapshot(name, ref):
    folder = SNAPSHOTS / name
    stale = []
    for view, args in VIEWS.items():
        text, path = _show(ref, args), folder / f"{view}.txt"
        if os.environ.get("EFFC_UPDATE_SNAPSHOTS"):
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        elif not path.is_file() or path.read_text() != text:
            stale.append(view)
    assert not stale, (f"{name}: {', '.join(stale)} differ from tests/snapshots/{name}/ (regenerate with "
                       "EFFC_UPDATE_SNAPSHOTS=1 python -m pytest -q tests/test_snapshots.py and explain the diff)")
