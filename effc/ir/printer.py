"""A readable text form of the IR, used by `effc show --stage ir` and the golden pass tests."""
from __future__ import annotations

from .nodes import Op, Spec


def _arg(a) -> str:
    return repr(a) if isinstance(a, float) else a


def print_op(op: Op) -> str:
    t = f" : {op.type}" if op.type is not None else ""
    args = [_arg(a) for a in op.args]
    if op.kind == "expand":  # show the subscript pattern as written
        args = [args[0], "[" + ", ".join("None" if a == 1.0 else ":" for a in op.args[1:]) + "]"]
    return f"{op.out}{t} = {op.kind}({', '.join(args)})"


def print_spec(spec: Spec) -> str:
    lines = [f"spec {spec.name} (chunk {spec.chunk})"]
    for d in spec.inputs + spec.outputs + spec.states:
        ann = f" {' '.join(d.annotations)}" if d.annotations else ""
        lines.append(f"  {d.role} {d.name}[{', '.join(d.dims)}]{ann} tile {d.tile}")
    for p in spec.params:
        lines.append(f"  param {p.name} = {p.default}")
    for d, parts in spec.parts:
        lines.append(f"  dim {d} in parts {' + '.join(parts)}")
    if spec.keyseq is not None:
        ks = spec.keyseq
        pos = "undeclared" if ks.pos is None else f"{ks.pos[0]} * {ks.dim.lower()} + {ks.pos[1]}"
        lines.append(f"  key sequence {ks.dim}: kpos = {pos}")
    extra = tuple(s for s in (spec.prefix, spec.select, spec.score) if s.ops)  # the softmax family's stages
    for stage in extra + spec.stages:
        lines.append(f"  {stage.name}:")
        lines += [f"    {print_op(op)}" for op in stage.ops]
        if stage.name == "score" and spec.masks:
            lines.append(f"    masks: {', '.join(spec.masks)}")
        if stage.name == "select" and spec.selection is not None:
            sel = spec.selection
            shared = f"; shared {sel.shared}" if sel.shared else ""
            lines.append(f"    block {sel.block}; {sel.describe_rule()}{shared}; candidates: "
                         f"{', '.join(sel.candidates) or 'every block'}; forced: {', '.join(sel.forced) or '-'}")
    return "\n".join(lines)
