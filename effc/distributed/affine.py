"""Which affine map a shard of the sequence applies to each carried state, read from the spec's IR.

Context parallelism needs every state's update over a whole shard to be affine in the state entering
it: S_out = A(S_in) + W. Two forms are recognised, per state, without knowing any mechanism:

- diagonal: legality's diagonal-affine transition, S' = S * D + W (retention, gla, mlstm_sig, ...).
  A is elementwise; it is sent at the broadcast shape of the spec's decay value (a scalar per head
  for retention, a [K, 1] column for gla), not at the state's shape.
- matrix: S' = M S + W with M acting on the state's first feature dim, the same M for every index
  of the others (the delta rules, rwkv7, hdla). A is a [R, R] matrix (R the first feature dim).

Anything else (a max-stabiliser, a state multiplied from the right, two states feeding each other)
raises NotImplementedError naming the state and the op that breaks the form.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.nodes import Spec, next_state_name
from ..passes.legality import Legality
from ..passes.shapes import value_types


@dataclass(frozen=True)
class StateMap:
    """How one state's shard summary is formed and applied."""

    state: str
    kind: str  # "diagonal" or "matrix" ("passed": not affine, for the ring schedule, which passes states whole)
    dims: tuple[str, ...]  # the state's feature dims, e.g. ("K", "V")
    keep: tuple[bool, ...]  # diagonal: per feature dim, whether the decay varies along it
    why: str

    def probes(self, sizes: dict[str, int]) -> int:
        """Initial states the probe run needs to recover A (besides the zero state)."""
        if self.kind == "diagonal":
            return 1
        rows, rest = self.split(sizes)
        return -(-rows // rest)

    def split(self, sizes: dict[str, int]) -> tuple[int, int]:
        """(rows A acts on, product of the other feature dims)."""
        if not self.dims:
            return 1, 1
        rest = 1
        for d in self.dims[1:]:
            rest *= sizes[d]
        return sizes[self.dims[0]], rest

    def summary_shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """The shape of A per (batch, head)."""
        if self.kind == "diagonal":
            return tuple(sizes[d] if k else 1 for d, k in zip(self.dims, self.keep))
        rows, _ = self.split(sizes)
        return (rows, rows)


def _right_aligned_keep(decay_shape, state_shape) -> tuple[bool, ...]:
    """Per state axis: does a value of `decay_shape`, broadcast (NumPy rules) against the state, vary there?"""
    pad = (1,) * (len(state_shape) - len(decay_shape)) + tuple(decay_shape)
    return tuple(str(d) != "1" for d in pad)


def _matrix_form(spec: Spec, state: str, ops: dict, types, free, target: str | None = None) -> str | None:
    """None when `target` (default: the next value of `state`) is M @ state + (state-free); else why not
    (naming the op)."""
    rank = len(types[state].shape)
    memo: dict[str, str | None] = {}

    def bad(v) -> str | None:  # None: v is linear in `state` along its first axis (or state-free)
        if free(v) or v == state:
            return None
        if v in memo:
            return memo[v]
        op = ops.get(v)
        if op is None:
            why = f"'{v}' reads another state"
        else:
            args = [a for a in op.args if isinstance(a, str)]
            lin = [a for a in args if not free(a)]
            why = next((b for b in (bad(a) for a in lin) if b), None)
            if why is None:
                why = _op_breaks(op, lin, types, rank, free)
        memo[v] = why
        return why

    return bad(target or next_state_name(state))


def _op_breaks(op, lin, types, rank, free) -> str | None:
    """Why `op` (whose args in `lin` are linear in the state, along its first axis) is not, or None."""
    where = f"'{op.out} = {op.kind}({', '.join(map(str, op.args))})'"
    if op.kind in ("add", "sub", "neg", "copy"):
        return None
    if op.kind in ("mul", "div") and len(lin) == 1 and (op.kind == "mul" or op.args[0] == lin[0]):
        other = op.args[1] if op.args[0] == lin[0] else op.args[0]
        if not isinstance(other, str):
            return None
        lin_shape, f_shape = types[lin[0]].shape, types[other].shape
        # a factor that varies along a trailing axis would scale columns differently: not one M for all
        if len(lin_shape) >= 2 and len(f_shape) >= 1 and str(f_shape[-1]) != "1":
            return f"{where} scales the state along a trailing dim"
        return None
    if op.kind == "matmul" and len(lin) == 1 and op.args[1] == lin[0] and free(op.args[0]):
        return None
    return f"{where} is not linear in the state from the left"


def _dataflow(spec: Spec):
    """(value types, the op defining each value, the states each value depends on)."""
    types = value_types(spec)
    ops = {op.out: op for stage in spec.stages for op in stage.ops}
    dep: dict[str, frozenset] = {s.name: frozenset({s.name}) for s in spec.states}
    for stage in spec.stages:
        for op in stage.ops:
            dep[op.out] = frozenset().union(*(dep.get(a, frozenset()) for a in op.args if isinstance(a, str)))
    return types, ops, dep


def output_states(spec: Spec) -> tuple[str, ...]:
    """The states the spec's outputs read (through any chain of values)."""
    dep = _dataflow(spec)[2]
    return tuple(sorted(frozenset().union(*(dep.get(o.name, frozenset()) for o in spec.outputs))))


def output_form(spec: Spec, maps: tuple[StateMap, ...]) -> str | None:
    """None when the op's output over a shard is affine in the state entering it with one left factor per
    token, o_t = o_t(0) + u_t @ S_in (u_t a state-free row over the state's first dim, the same for every
    column): then a rank can run its shard from a zero state before the entering state is known and add
    u @ S_in after (context parallel's overlap). Else why not, naming the construct. Needs: forward states
    only, one output reading one state, that state's map a left product (matrix, or a decay constant along
    its trailing dims), the output's feature dims the state's trailing dims, and the output linear in the
    state from the left (the same walk as a matrix transition's)."""
    if spec.reverse_states:
        return "reverse states enter from the pieces after the shard too"
    if len(spec.outputs) != 1:
        return f"{len(spec.outputs)} outputs (one is supported)"
    out = spec.outputs[0]
    types, ops, dep = _dataflow(spec)
    read = sorted(dep.get(out.name, frozenset()))
    if len(read) != 1:
        return f"output {out.name} reads {len(read)} states ({', '.join(read) or '-'}); the probe separates one"
    m = next(x for x in maps if x.state == read[0])
    if m.kind == "diagonal" and any(m.keep[1:]):
        return f"the decay of state {m.state} varies along its trailing dims: not a left product"
    if m.kind not in ("diagonal", "matrix"):
        return f"state {m.state} is {m.kind}, not an affine map"
    if tuple(out.feature_dims) != tuple(m.dims[1:]):
        return (f"output {out.name} [{', '.join(out.feature_dims)}] is not indexed by state {m.state}'s trailing "
                f"dims [{', '.join(m.dims[1:])}]")
    why = _matrix_form(spec, m.state, ops, types, lambda v: not isinstance(v, str) or m.state not in dep.get(v, ()),
                       target=out.name)
    if why is not None:
        return f"output {out.name} is not linear in state {m.state} from the left ({why})"
    return None


def state_maps(spec: Spec, legality: Legality) -> tuple[StateMap, ...]:
    """The affine form of every state's update (see the module doc); raises NotImplementedError."""
    if not spec.states:
        raise NotImplementedError(f"context parallel: {spec.name} has no state to pass between ranks")
    types, ops, dep = _dataflow(spec)
    out = []
    for s, t in zip(spec.states, legality.transitions):
        dims = s.feature_dims
        if t.diagonal_affine:
            decay = t.decay
            shape = types[decay].shape if isinstance(decay, str) else ()
            out.append(StateMap(s.name, "diagonal", dims, _right_aligned_keep(shape, types[s.name].shape),
                                f"{s.name}' = {s.name} * {decay or 1} + W"))
            continue
        others = sorted(dep.get(next_state_name(s.name), frozenset()) - {s.name})
        if others:
            raise NotImplementedError(f"context parallel: the update of state '{s.name}' of {spec.name} reads "
                                      f"state(s) {', '.join(others)}: coupled states are not supported")
        why = _matrix_form(spec, s.name, ops, types, lambda v, n=s.name: not isinstance(v, str) or n not in dep.get(v, ()))
        if why is not None:
            raise NotImplementedError(f"context parallel: the update of state '{s.name}' of {spec.name} is not "
                                      f"affine in the state ({why}), so a shard cannot be summarised as A S + W")
        out.append(StateMap(s.name, "matrix", dims, (True,) * len(dims),
                            f"{s.name}' = M @ {s.name} + W, M [{dims[0] if dims else 1}, {dims[0] if dims else 1}]"))
    return tuple(out)
