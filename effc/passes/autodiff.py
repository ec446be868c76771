"""Reverse-mode differentiation of one chunk step: (inputs, entering states) -> (outputs, leaving states).

The backward of the scan is this step run over the chunks in reverse: the adjoint of each state
is carried from chunk to chunk (the transposed transition), and the adjoints of the chunk's
inputs are written out. The result is IR in the same tile ops, so every backend prints it with
the printer it already has. Gates are differentiated where they live, in log space, with the
derivatives of the tile ops in passes.vjp_rules.

Seeds: `_seed_<output>` is the incoming gradient of an output tile, `_seed_<next state>` the
adjoint of a state leaving the chunk (carried from the chunk after it).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import ops as O
from ..ir.nodes import Op, Spec, TileType, next_state_name
from ..ir.printer import print_op
from .cse import cse_with_aliases
from .fusion import live_ops
from .shapes import value_types
from .vjp_rules import Adjoints, backprop


@dataclass(frozen=True)
class Backward:
    ops: tuple[Op, ...]  # forward recomputation (only what the adjoints need) then adjoints
    seeds: tuple[tuple[str, str], ...]  # (seed value name, output or state it is the gradient of)
    input_grads: tuple[tuple[str, str | None], ...]  # input -> its adjoint value (None: no dependence)
    state_grads: tuple[tuple[str, str | None], ...]  # state -> adjoint of the state entering the chunk
    seed_types: tuple[tuple[str, TileType], ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()  # forward value -> the one computing it in `ops` (cse)

    def forward_name(self, value: str) -> str:
        """The name `ops` gives a forward value (its repeats were merged before differentiating)."""
        return dict(self.aliases).get(value, value)

    def types(self, spec: Spec) -> dict[str, TileType]:
        """Tile types of every value the backward ops read or write."""
        return {**value_types(spec), **dict(self.seed_types), **{op.out: op.type for op in self.ops}}

    def __str__(self) -> str:
        lines = ["backward (one chunk, run in reverse chunk order):",
                 "  seeds: " + ", ".join(f"{s} = d{t}" for s, t in self.seeds)]
        lines += [f"    {print_op(op)}" for op in self.ops]
        lines.append("  gradients: " + ", ".join(f"d{x} = {g or 0}" for x, g in self.input_grads + self.state_grads))
        return "\n".join(lines)


def seed_name(target: str) -> str:
    return f"_seed_{target}"


def is_seed(name: str) -> bool:
    """A value the backward reads as given: the cotangent of an output or of a next state."""
    return name.startswith("_seed_")


# ops whose result is linear in their one argument that reads a cotangent (the others forward values)
_LINEAR_UNARY = frozenset(O.SCANS) | {"rowsum", "colsum", "neg", "copy", "transpose", "expand", "bcast", "unlast",
                                      "total", "last"}


def linear_arg(op: Op, adjoint: set[str], through_matmul: bool = False) -> int | None:
    """The position of `op`'s argument that a sum can be pushed out through (op(a + b) = op(a) + op(b)), when
    that argument is the op's only one in `adjoint` (the values reading a cotangent); else None. A matmul counts
    only `through_matmul`: pushing a sum through it duplicates the matmul."""
    pos = [i for i, a in enumerate(op.args) if isinstance(a, str) and a in adjoint]
    if len(pos) != 1:
        return None
    k, args = op.kind, op.args
    if (k in _LINEAR_UNARY or (k in O.MASKS and (len(args) == 1 or args[1] == 0.0))) and pos == [0]:
        return 0
    if k == "mul" or (k == "div" and pos == [0]) or (k == "matmul" and through_matmul):
        return pos[0]
    return None


def split_once(memo: dict, value: str, split, namer):
    """`split(value)`, memoised on the value's name in `memo`, so that a DAG of shared values is walked in
    linear time, not once per path. `namer.n` numbers the ops a split emits: a value met again advances it by
    what its first split emitted, so every later name is the one an unmemoised walk gives it, and the
    generated source does not depend on the memo."""
    if value in memo:
        result, emitted = memo[value]
        namer.n += emitted
        return result
    n0 = namer.n
    result = split(value)
    memo[value] = result, namer.n - n0
    return result


def differentiate(spec: Spec) -> Backward:
    """`spec` must be shape-checked. Differentiates outputs and leaving states w.r.t. inputs and entering states."""
    types = value_types(spec)
    # one value per distinct expression, so each adjoint is summed before it flows back through its producer
    # (delta rules write `u - w @ S` in merge and inter: two copies would backpropagate through `w @ S` twice)
    roots = tuple(o.name for o in spec.outputs) + tuple(next_state_name(s.name) for s in spec.states)
    forward, aliases = cse_with_aliases(spec.intra.ops + spec.merge.ops + spec.inter.ops, roots)
    leaves = {d.name for d in spec.inputs + spec.states}

    # a value needs an adjoint only if it depends on an input or a state
    depends: set[str] = set(leaves)
    for op in forward:
        if any(isinstance(x, str) and x in depends for x in op.args):
            depends.add(op.out)

    a = Adjoints(types)
    seeds = []
    for o in spec.outputs:
        seeds.append((seed_name(o.name), o.name))
    for s in spec.states:
        seeds.append((seed_name(next_state_name(s.name)), s.name))
    for seed, target in seeds:
        a.types[seed] = types[target]
    for o in spec.outputs:
        a.grad[o.name] = seed_name(o.name)
    for s in spec.states:
        a.grad[next_state_name(s.name)] = seed_name(next_state_name(s.name))

    backprop(a, (op for op in forward if op.out in depends), lambda v: v in depends)

    input_grads = tuple((d.name, a.grad.get(d.name)) for d in spec.inputs)
    state_grads = tuple((s.name, a.grad.get(s.name)) for s in spec.states)
    roots = tuple(g for _, g in input_grads + state_grads if g is not None)
    adjoint = live_ops(tuple(a.ops), roots)
    needed = {x for op in adjoint for x in op.args if isinstance(x, str)}
    recompute = live_ops(forward, tuple(v for v in needed if v in {op.out for op in forward}))
    return Backward(recompute + adjoint, tuple(seeds), input_grads, state_grads,
                    tuple((seed, a.types[seed]) for seed, _ in seeds), tuple(aliases.items()))
