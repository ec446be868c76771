"""Legality: which schedules the spec admits, computed from its inter and merge stages.

- Every spec here is a chunked scan, so the *walk* (one program carries the state over the
  chunks in order, on chip) is always legal.
- The walk can be cut into independent *segments* (run in parallel, then stitched) when each
  state's update is diagonal-affine, S_next = S * D + W, with D and W free of every state:
  then a segment is summarised by (prod D, W from a zero state) and segments compose.
- A feature dim can be split across programs when no op contracts or reduces over it.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import SpecError
from ..ir import ops as O
from ..ir.nodes import Op, Spec, next_state_name
from .shapes import value_types


@dataclass(frozen=True)
class Transition:
    """How a state is updated: S_next = S * decay + write (names of values in the spec, or None)."""

    state: str
    decay: str | float | None  # None: identity (D = 1)
    write: str | float | None  # None: no write; a sum of several state-free terms is shown as one string
    diagonal_affine: bool
    why: str


@dataclass(frozen=True)
class Legality:
    transitions: tuple[Transition, ...]
    segmentable: bool
    split_dims: tuple[str, ...]
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        lines = ["legality:"]
        for t in self.transitions:
            form = f"{t.state}' = {t.state} * {t.decay or 1} + {t.write or 0}" if t.diagonal_affine else "general"
            lines.append(f"  state {t.state}: {form} ({t.why})")
        lines.append(f"  schedules: walk{' + segmented walk' if self.segmentable else ''}")
        lines.append(f"  split across programs: {', '.join(self.split_dims) or 'none'}")
        lines += [f"  - {r}" for r in self.reasons]
        return "\n".join(lines)


def _depends(spec: Spec) -> dict[str, frozenset[str]]:
    """For every value, the set of states it depends on."""
    dep: dict[str, frozenset[str]] = {s.name: frozenset({s.name}) for s in spec.states}
    for stage in spec.stages:
        for op in stage.ops:
            dep[op.out] = frozenset().union(*(dep.get(a, frozenset()) for a in op.args if isinstance(a, str)))
    return dep


def _sum_terms(x, ops: dict[str, Op], dep) -> dict:
    """`x` as a signed sum: {term: coefficient}, nested add, sub, neg and copy that read a state flattened, in the
    order the terms appear; a state-free value stays one term. `S * e + x + y`, `x + (S * e + y)` and
    `(x + y) + e * S` all give S * e plus state-free terms. Memoised on the value, so a DAG costs its size."""
    memo: dict[str, dict] = {}

    def terms(v) -> dict:
        op = ops.get(v) if isinstance(v, str) else None
        if op is None or not dep.get(v) or op.kind not in ("add", "sub", "neg", "copy"):
            return {v: 1}
        if v not in memo:
            out: dict = {}
            for a, sign in zip(op.args, (-1,) if op.kind == "neg" else (1, -1) if op.kind == "sub" else (1, 1)):
                for t, c in terms(a).items():
                    out[t] = out.get(t, 0) + sign * c
            memo[v] = out
        return memo[v]

    return terms(x)


def _show_sum(terms: dict) -> str:
    out = ""
    for t, c in terms.items():
        mag = f"{abs(c)} * {t}" if abs(c) != 1 else str(t)
        out += (f" - {mag}" if c < 0 else f" + {mag}") if out else (f"-{mag}" if c < 0 else mag)
    return out


def _transition(spec: Spec, state: str, ops: dict[str, Op], dep) -> Transition:
    """Canonicalised before matching: the update is flattened into a signed sum of terms (`_sum_terms`), so every
    bracketing and ordering of the same sum gets the same transition. Diagonal-affine when exactly one term
    reads a state, with coefficient 1, and that term is this state scaled by a state-free value."""
    def free(x) -> bool:
        return not isinstance(x, str) or not dep.get(x)

    def scaled(x):  # x == S * D with D state-free -> D ; x == S -> 1.0
        if x == state:
            return 1.0
        op = ops.get(x)
        if op is None:
            return None
        if op.kind == "copy":
            return scaled(op.args[0])
        if op.kind == "mul":
            a, b = op.args
            if a == state and free(b):
                return b
            if b == state and free(a):
                return a
        return None

    root = next_state_name(state)
    terms = _sum_terms(root, ops, dep)
    stateful = [(t, c) for t, c in terms.items() if not free(t)]
    writes = {t: c for t, c in terms.items() if free(t) and c != 0}
    if len(stateful) == 1 and stateful[0][1] == 1 and (d := scaled(stateful[0][0])) is not None:
        decay = None if d == 1.0 else d
        if not writes:
            return Transition(state, decay, None, True, "decay only")
        write = next(iter(writes)) if list(writes.values()) == [1] else _show_sum(writes)
        return Transition(state, decay, write, True, "decay times state plus a state-free write")
    reads = sorted(dep.get(root, ()))
    return Transition(state, None, None, False,
                      f"update is not S * D + W with state-free D, W (depends on {', '.join(reads)})")


def _contracted_dims(spec: Spec) -> set[str]:
    """Dims that some op sums over (a matmul's inner dim, a reduction's axis) or mixes (a rotation's axis)."""
    types = value_types(spec)
    out: set[str] = set()
    for stage in spec.stages:
        for op in stage.ops:
            if op.kind == "matmul":
                out.add(str(types[op.args[0]].shape[1]))
            elif op.kind in O.REDUCTIONS:
                out.add(str(types[op.args[0]].shape[O.REDUCTIONS[op.kind][0]]))
            elif op.kind == "gather":  # picks one column per entry: every program needs all of them
                out.add(str(types[op.args[0]].shape[1]))
            elif op.kind in O.ROTATIONS:  # pairs features of its last axis: a block of them is not enough
                out.add(str(types[op.args[0]].shape[-1]))
    return out


def _check_directions(spec: Spec, dep) -> None:
    """A state's update may read only states scanned in its own direction: a forward state's next value is
    needed before the chunk to its right runs, a reverse state's before the chunk to its left, so an update
    reading both would need each walk to wait for the other."""
    for s in spec.states:
        other = sorted(x for x in dep.get(next_state_name(s.name), ())
                       if spec.decl(x).reverse != s.reverse)
        if other:
            mine, theirs = ("reverse", "forward") if s.reverse else ("forward", "reverse")
            raise SpecError(f"the update of {mine} state '{s.name}' reads {theirs} state(s) {', '.join(other)}",
                            s.loc, f"inter updates of {mine} states from {mine} states and the chunk only; "
                            "merge may read states of both directions")


def analyze(spec: Spec) -> Legality:
    """`spec` must be shape-checked (passes.shapes.infer_shapes)."""
    dep = _depends(spec)
    _check_directions(spec, dep)
    ops = {op.out: op for op in spec.inter.ops}
    transitions = tuple(_transition(spec, s.name, ops, dep) for s in spec.states)
    # segment summaries are not mirrored for a right-to-left walk yet: a spec with a reverse state walks
    # each sequence in one program per direction
    segmentable = bool(transitions) and all(t.diagonal_affine for t in transitions) and not spec.reverse_states
    reasons = []
    if spec.reverse_states:
        reasons.append(f"reverse state(s) {', '.join(s.name for s in spec.reverse_states)}: a second walk runs the "
                       "chunks right to left, merge runs in the out kernel from both walks' states; one segment "
                       "per direction (segmented reverse walks are not implemented)")
    if not transitions:
        reasons.append("no state: every chunk is independent")
    elif segmentable:
        reasons.append("every state update is diagonal-affine, so segments of the walk compose")
    elif bad := [t.state for t in transitions if not t.diagonal_affine]:
        reasons.append(f"state(s) {', '.join(bad)} have a general transition: one program walks all chunks")
    contracted = _contracted_dims(spec)
    out_dims = [d for o in spec.outputs for d in o.feature_dims]
    split = tuple(d for d in dict.fromkeys(out_dims) if d not in contracted)
    for d in dict.fromkeys(out_dims):
        if d in contracted:
            reasons.append(f"dim {d} is contracted or reduced, so it cannot be split across programs")
    return Legality(transitions, segmentable, split[:1], tuple(reasons))
