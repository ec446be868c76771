"""Errors that point at the spec text: file, line, column, the offending text, what was expected."""
from __future__ import annotations

import difflib
from dataclasses import dataclass


def suggest(name: str, options) -> str:
    """' (did you mean a, b?)' for the options close to a misspelt `name`; '' when none is."""
    close = difflib.get_close_matches(name, list(options), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


@dataclass(frozen=True)
class Loc:
    """A span in a spec source. Excluded from IR equality (see ir.nodes)."""

    file: str
    line: int
    column: int
    text: str = ""  # the whole source line, for the caret display
    via: "Loc | None" = None  # inside a def's body: where the stage called that def

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"

    def caret(self) -> str:
        """The source line and a caret under the column (tabs kept, so the caret lines up)."""
        pad = "".join(c if c == "\t" else " " for c in self.text[:self.column - 1])
        return f"\n  {self.text}\n  {pad}^"


class SpecError(Exception):
    """A problem in a spec, reported at its source location."""

    def __init__(self, message: str, loc: Loc | None = None, expected: str | None = None):
        self.message, self.loc, self.expected = message, loc, expected
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.loc}: error: {self.message}" if self.loc else f"error: {self.message}"
        if self.expected:
            head += f"\n  expected: {self.expected}"
        if self.loc and self.loc.text:
            head += self.loc.caret()
        if self.loc and self.loc.via:
            head += f"\n  note: in the def called at {self.loc.via}"
            head += self.loc.via.caret() if self.loc.via.text else ""
        return head


class ArgumentError(ValueError):
    """A tensor argument of the wrong shape, dtype or device."""


class BackwardRefused(NotImplementedError):
    """A backward known to fault with this GPU and Triton (policy.triton_faults.backward_fault): refused with
    the reason instead of losing the process's CUDA context."""


class CodegenError(RuntimeError):
    """Generated source that does not compile: a bug in effc's code generator, not in the spec."""


class ResourceError(RuntimeError):
    """A generated kernel needs more of a GPU resource than the GPU has, even at its smallest pipelining
    (runtime.launch.launch_fitting): the message names the kernel, the need, the limit and the knobs to try."""
