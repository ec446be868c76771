"""Where each value of a kernel plan lives in a TileLang program.

TileLang works on buffers, not values: an elementwise op that got its own buffer would cost a
shared-memory or register tile per IR value. So elementwise ops stay *inline* (printed into the
loop of whoever consumes them) and only *anchors* get buffers: matmuls (T.gemm accumulators),
scans (T.cumsum), reductions (T.reduce_*). `a + x @ y` with a single-use matmul becomes a gemm
that accumulates into a buffer holding `a`, which is the state's own buffer when the sum is the
state's next value and nothing reads the old state afterwards (the hand-written kernels' form).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from ...ir import ops as O
from ...ir.nodes import Op
from ...passes.plan import KernelPlan

_ONE = sympy.Integer(1)
ANCHOR_KINDS = frozenset(("matmul", "decay_dot") + O.SCANS + tuple(O.REDUCTIONS))


def matmul_form(op: Op, types) -> str:
    """'outer' (inner dim 1: elementwise), 'matvec' (a side of 1: too thin for T.gemm) or 'gemm'."""
    (m, kk), (_, n) = types[op.args[0]].shape, types[op.args[1]].shape
    if kk == _ONE:
        return "outer"
    return "matvec" if _ONE in (m, n) else "gemm"


@dataclass(frozen=True)
class Accumulate:
    """`out = other + matmul`: the gemm accumulates into a buffer that first holds `other`."""

    matmul: Op
    other: str | float


@dataclass
class KernelSchedule:
    plan: KernelPlan
    defs: dict[str, Op]
    anchors: frozenset[str]  # op outputs that get a buffer
    accumulate: dict[str, Accumulate]  # add output -> its fused gemm
    deferred: frozenset[str]  # matmuls emitted by their accumulating add
    in_place: dict[str, str]  # add output -> the state whose buffer it accumulates into
    reuse: dict[str, str]  # add output -> the single-use anchor whose buffer it accumulates into
    uses: dict[str, int] = field(default_factory=dict)

    def is_inline(self, name: str) -> bool:
        return name in self.defs and name not in self.anchors


def _count_uses(kp: KernelPlan) -> dict[str, int]:
    uses: dict[str, int] = {}
    names = [a for op in kp.ops for a in (op.args[:1] if op.kind == "expand" else op.args) if isinstance(a, str)]
    names += [o.name for o in kp.stores] + [s.next for s in kp.states]
    names += [s.decay for s in kp.states if isinstance(s.decay, str)]
    for n in names:
        uses[n] = uses.get(n, 0) + 1
    return uses


def schedule(kp: KernelPlan, types) -> KernelSchedule:
    defs = {op.out: op for op in kp.ops}
    anchors = {op.out for op in kp.ops if op.kind in ANCHOR_KINDS
               and not (op.kind == "matmul" and matmul_form(op, types) == "outer")}
    uses = _count_uses(kp)
    pinned = {o.name for o in kp.stores} | {s.next for s in kp.states}
    accumulate: dict[str, Accumulate] = {}
    for op in kp.ops:
        if op.kind != "add":
            continue
        for i, a in enumerate(op.args):
            m = defs.get(a) if isinstance(a, str) else None
            if (m is not None and m.kind == "matmul" and matmul_form(m, types) == "gemm" and uses[a] == 1
                    and a not in pinned and types[a].shape == op.type.shape):
                accumulate[op.out] = Accumulate(m, op.args[1 - i])
                anchors.add(op.out)
                break
    sched = KernelSchedule(kp, defs, frozenset(anchors), accumulate,
                           frozenset(a.matmul.out for a in accumulate.values()), {}, {}, uses)
    _choose_targets(sched, types)
    return sched


# -- which buffer a fused gemm accumulates into -------------------------------------------------

def leaves(sched: KernelSchedule, name, memo: dict | None = None) -> frozenset[str]:
    """The buffers (states, loads, anchors) an inline value reads."""
    memo = {} if memo is None else memo
    if not isinstance(name, str):
        return frozenset()
    if name in memo:
        return memo[name]
    op = sched.defs.get(name)
    if op is None or name in sched.anchors:
        out = frozenset((name,))
    else:
        args = op.args[:1] if op.kind == "expand" else op.args
        out = frozenset().union(*(leaves(sched, a, memo) for a in args))
    memo[name] = out
    return out


def anchor_operands(sched: KernelSchedule, name: str) -> tuple:
    acc = sched.accumulate.get(name)
    if acc is not None:
        return tuple(acc.matmul.args) + (acc.other,)
    return tuple(sched.defs[name].args)


def read_positions(sched: KernelSchedule) -> dict[str, list[int]]:
    """Where each buffer is read: an anchor's op index, len(ops) for the stores, len(ops)+1 for the
    state updates (and the summary kernel's decay products)."""
    memo: dict = {}
    pos: dict[str, list[int]] = {}

    def note(names, at):
        for n in names:
            for leaf in leaves(sched, n, memo):
                pos.setdefault(leaf, []).append(at)

    n_ops = len(sched.plan.ops)
    for i, op in enumerate(sched.plan.ops):
        if op.out in sched.anchors and op.out not in sched.deferred:
            note(anchor_operands(sched, op.out), i)
    note([o.name for o in sched.plan.stores], n_ops)
    note([s.next for s in sched.plan.states] + [s.decay for s in sched.plan.states], n_ops + 1)
    return pos


def _is_gemm_buffer(sched: KernelSchedule, name: str, types) -> bool:
    op = sched.defs.get(name)
    return name in sched.accumulate or (op is not None and op.kind == "matmul" and name not in sched.deferred
                                        and matmul_form(op, types) == "gemm")


def _choose_targets(sched: KernelSchedule, types) -> None:
    index = {op.out: i for i, op in enumerate(sched.plan.ops)}
    pos = read_positions(sched)
    next_of = {s.next: s for s in sched.plan.states}
    for out, acc in sched.accumulate.items():
        s = next_of.get(out)
        # in place: nothing after this op reads the entering state (its operands are staged first)
        if s is not None and len(s.dims) == 2 and all(p <= index[out] for p in pos.get(s.name, [])):
            sched.in_place[out] = s.name
            continue
        o = acc.other
        if (isinstance(o, str) and sched.uses.get(o) == 1 and o not in sched.in_place
                and _is_gemm_buffer(sched, o, types) and types[o].shape == types[out].shape):
            sched.reuse[out] = o
