"""A kernel's Triton signature, printed from its plan's argument list (passes.kernel_plan): the launcher
builds the call from the same list, so the two agree by construction."""
from __future__ import annotations

from ...passes.kernel_plan import KernelArg

# One line per group of roles. An open line lists each argument followed by ", " (it may be empty); a closed
# line joins its arguments and ends with "," (it is left out when empty). Each family keeps the layout its
# generated code has always had.
LINEAR_LAYOUT = ((("tensor",), True), (("param",), True), (("layout",), False), (("slot",), False),
                 (("shape", "tile"), False), (("option",), False), (("flag",), False))
SOFTMAX_LAYOUT = ((("tensor", "param"), True), (("layout",), False), (("shape",), True), (("tile", "option"), False),
                  (("flag",), False))


def _decl(a: KernelArg) -> str:
    return f"{a.name}: tl.constexpr" if a.constexpr else a.name


def signature(args: tuple[KernelArg, ...], layout) -> str:
    """The text between `def name(` and `\\n):`; every argument of `args` is printed, in order."""
    placed = [a for roles, _ in layout for a in args if a.role in roles]
    if [a.name for a in placed] != [a.name for a in args]:
        raise ValueError(f"kernel arguments {[a.name for a in args]} are not in the layout's role order")
    lines = []
    for roles, open_line in layout:
        mine = [_decl(a) for a in args if a.role in roles]
        if open_line:
            lines.append("".join(f"{d}, " for d in mine))
        elif mine:
            lines.append(", ".join(mine) + ",")
    return "\n    ".join(lines)
