"""Seeded mutations of every library spec and example: each mutant is compiled to Triton source and, when
effc accepts it, run on a tiny batch. What a mutant may do: compile and run, or be refused with effc's own
error (SpecError with a location, ArgumentError, NotImplementedError naming the construct). What it may not:
raise any other exception from inside a pass, produce source that does not parse, or hang.
EFFC_FUZZ_MUTANTS sets the mutants per spec (default 3); the seed is fixed, so a failure reproduces."""
import ast
import os
import random
import re
import signal
from pathlib import Path

import pytest
import torch

import effc
from effc.errors import ArgumentError, SpecError
from effc.library import library_files
from effc.compiler import compile_text
from effc.runtime.softmax_op import make_op
from effc.runtime.verify import random_inputs

MUTANTS = int(os.environ.get("EFFC_FUZZ_MUTANTS", 3))
SOURCES = library_files() + sorted((Path(__file__).parent.parent / "examples").glob("*.attn"))
_TOKEN = re.compile(r"[A-Za-z_]\w*|\d+\.?\d*(?:e-?\d+)?|\*\*|[-+*/@(){}\[\]:,.=<>]")
_NUMBERS = ["0", "1", "-1", "2", "0.5", "1e30", "3"]
_OPERATORS = ["+", "-", "*", "/", "@", "**"]


def mutate(text: str, rng: random.Random) -> str:
    """One token-level edit outside comments: drop, duplicate or swap a token, or replace a name, number
    or operator by another of its kind."""
    body = [(m.start(), m.end(), m.group()) for m in _TOKEN.finditer(text)
            if "#" not in text[text.rfind("\n", 0, m.start()) + 1:m.start()]]
    names = sorted({t for _, _, t in body if t[0].isalpha() or t[0] == "_"})
    a, b, tok = body[rng.randrange(len(body))]
    kind = rng.choice(["drop", "dup", "swap", "replace"])
    if kind == "drop":
        new = ""
    elif kind == "dup":
        new = tok + " " + tok
    elif kind == "swap":
        i = next(i for i, t in enumerate(body) if t[0] == a)
        if i + 1 >= len(body):
            return text[:a] + text[b:]
        c, d, other = body[i + 1]
        return text[:a] + other + text[b:c] + tok + text[d:]
    elif tok[0].isdigit():
        new = rng.choice(_NUMBERS)
    elif tok in _OPERATORS:
        new = rng.choice(_OPERATORS)
    else:
        new = rng.choice(names)
    return text[:a] + new + text[b:]


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def _try(text: str, where: Path):
    """None when the mutant is fine (accepted and ran, or refused by effc); else what went wrong."""
    try:
        comp = compile_text(text, file=str(where))
        op = make_op(comp)
        source = op.comp.source("triton") if hasattr(op, "comp") else None
        if source is not None:
            ast.parse(source)
        dims = {d: 16 for d in op.spec.dims}
        xs = random_inputs(op.spec, 1, 20, 2, dims, torch.float32, "cpu", seed=0)
        with torch.no_grad():
            op(*xs)
    except (SpecError, ArgumentError, NotImplementedError) as e:
        if isinstance(e, SpecError) and e.loc is None and "no such" not in str(e):
            return f"SpecError without a location: {e}"
        return None
    except SyntaxError as e:
        return f"generated source does not parse: {e}"
    except _Hang:
        return "no answer within 60 s"
    except Exception as e:  # noqa: BLE001 - the point of the test
        return f"{type(e).__name__} from inside effc: {e}"
    return None


@pytest.mark.parametrize("path", SOURCES, ids=[p.stem for p in SOURCES])
def test_mutants_compile_or_are_refused_with_effc_errors(path, tmp_path):
    rng = random.Random(f"{path.stem}-fuzz")
    text = path.read_text()
    where = tmp_path / path.name  # imports of a library mutant resolve next to it, then in the library
    previous = signal.signal(signal.SIGALRM, _alarm)
    problems = []
    try:
        for i in range(MUTANTS):
            mutant = mutate(text, rng)
            signal.alarm(60)
            try:
                problem = _try(mutant, where)
            finally:
                signal.alarm(0)
            if problem:
                diff = [line for line in mutant.splitlines() if line not in text.splitlines()]
                problems.append(f"mutant {i} (changed line: {diff[:1]}): {problem}"[:500])
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)
