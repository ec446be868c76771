"""The backward of the softmax family's prefix stage, derived like the walks' (passes.vjp_rules).

The prefix kernel (passes.softmax_plan.prefix_lowered) computes per token the values the walks read (RoPE's
rotated q and k). The walks' backward ends with the gradients of those stored values; this pass carries them
back through the prefix ops to the inputs the prefix reads, per token, as one more kernel (`bwd_prefix`):

    load the inputs and the stored values' cotangents -> recompute the prefix ops the adjoints read ->
    the adjoints -> store each input's gradient

Every prefix op of a lowered prefix is per token (no scan, no reduction over tokens), so a program owns its
block of tokens and writes each gradient whole.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.nodes import Op
from ..ir.printer import print_op
from .cse import cse
from .fusion import live_ops
from .softmax import SoftmaxSchedule, softmax_op_type
from .vjp_rules import Adjoints, backprop

SEED = "_seed_"  # + a stored value's name: its incoming cotangent


@dataclass(frozen=True)
class PrefixBackward:
    recompute: tuple[Op, ...]  # the forward prefix ops the adjoints read
    vjp: tuple[Op, ...]  # the adjoints, from the seeds to the inputs
    seeds: tuple[str, ...]  # the stored values whose cotangents the kernel reads
    grads: tuple[tuple[str, str], ...]  # (input, its gradient's value)
    types: dict

    def __str__(self) -> str:
        lines = ["  kernel bwd_prefix", "    recompute:"] + [f"      {print_op(op)}" for op in self.recompute]
        lines += ["    adjoints:"] + [f"      {print_op(op)}" for op in self.vjp]
        lines.append("    gradients: " + (", ".join(f"d{x} = {g}" for x, g in self.grads) or "-"))
        return "\n".join(lines)


def differentiate_prefix(sched: SoftmaxSchedule, stores: tuple[str, ...]) -> PrefixBackward:
    """The prefix stage's backward, from the cotangents of `stores` (the values the prefix kernel writes) to
    the spec's inputs the prefix reads."""
    spec = sched.spec
    inputs = [d.name for d in spec.inputs]
    read = spec.prefix.reads
    depends = {x for x in inputs if x in read}
    forward = cse(spec.prefix.ops, stores)  # a value computed twice (RoPE's cos for q and for k) is read once
    for op in forward:
        if any(isinstance(a, str) and a in depends for a in op.args):
            depends.add(op.out)
    seeds = tuple(x for x in stores if x in depends)
    b = Adjoints({**sched.types, **{SEED + x: sched.types[x] for x in seeds}}, "_r", softmax_op_type)
    b.grad.update({x: SEED + x for x in seeds})
    backprop(b, forward, lambda x: x in depends)
    grads = tuple((x, b.grad[x]) for x in inputs if x in read and x in b.grad)
    vjp = live_ops(tuple(b.ops), tuple(g for _, g in grads))
    need = {a for op in vjp for a in op.args if isinstance(a, str)}
    recompute = live_ops(forward, tuple(x for x in need if x not in inputs))
    return PrefixBackward(recompute, vjp, seeds, grads, b.types)
