"""The backward of the softmax family (FlashAttention-2 style), derived from the spec.

With P = softmax(s) over the kept keys and reductions R_r = P @ X_r, an output's gradient reaches

    dR_r, dlse          the epilogue's VJP (preprocess kernel, per query block)
    D = sum_r rowsum(dR_r * R_r) - dlse
    dP = sum_r dR_r @ X_r^T,   ds = P * (dP - D)          (P recomputed from the saved log-sum-exp)
    dX_r = P^T @ dR_r

and ds flows back through the score's pair ops (score modifiers, masks) to the query-side and
key-side values with the rules of passes.vjp_rules. Three kernels:

- `bwd_pre`: per query block, the epilogue VJP: dR_r, D and the epilogue's query-input gradients;
- `bwd_dq`: per query block, walk the visible key blocks; accumulate the adjoints of query-side
  values (partial sums over key blocks), then differentiate the query-side ops after the walk;
- `bwd_dkv`: per key block, walk the query blocks that see it; accumulate the adjoints of key-side
  values (and dX_r), then differentiate the key-side ops after the walk.

Each kernel's IR is split into what runs before the walk, inside it, and after it.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.nodes import C, Op, TileType
from ..ir.printer import print_op
from .fusion import live_ops
from .softmax import SoftmaxSchedule, softmax_op_type
from .vjp_rules import Adjoints, backprop

SEED = "_seed_"  # + output name: the incoming gradient of an output tile


def p_name(g: int) -> str:
    return f"_p{g}"


def dr_name(r: str) -> str:
    return f"_dR_{r}"


def dd_name(g: int) -> str:
    return f"_D{g}"


def acc_name(x: str) -> str:
    return f"_acc_{x}"


@dataclass(frozen=True)
class BwdKernel:
    name: str
    outer_ops: tuple[Op, ...]  # forward recompute before the walk (outer side)
    loop_fwd: tuple[Op, ...]  # forward recompute inside the walk
    loop_vjp: tuple[Op, ...]  # adjoints inside the walk
    accumulators: tuple[tuple[str, str], ...]  # (outer value, its per-block contribution)
    post_vjp: tuple[Op, ...]  # adjoints after the walk
    leaf_grads: tuple[tuple[str, str], ...]  # (leaf, gradient value on this kernel's side)
    types: dict

    def __str__(self) -> str:
        lines = [f"  kernel {self.name}"]
        after = "the epilogue's VJP" if self.name == "bwd_pre" else "after the walk"
        before = "recompute" if self.name == "bwd_pre" else "before the walk"
        for what, ops in ((before, self.outer_ops), ("walk: recompute", self.loop_fwd),
                          ("walk: adjoints", self.loop_vjp), (after, self.post_vjp)):
            if ops:
                lines.append(f"    {what}:")
                lines += [f"      {print_op(op)}" for op in ops]
        if self.accumulators:
            lines.append("    accumulated over the walk: " + ", ".join(f"d{x} += {c}" for x, c in self.accumulators))
        lines.append("    gradients: " + (", ".join(f"d{x} = {g}" for x, g in self.leaf_grads) or "-"))
        return "\n".join(lines)


@dataclass(frozen=True)
class SoftmaxBackward:
    pre: BwdKernel  # outer_ops: recompute; post_vjp: epilogue VJP; extra: dR, D values
    dq: BwdKernel
    dkv: BwdKernel
    d_reduction: tuple[tuple[str, str | None], ...]  # reduction R -> its adjoint value in `pre`
    d_group: tuple[str, ...]  # group -> the value D in `pre`

    def seeded_reductions(self) -> frozenset[str]:
        """Reductions whose cotangent is an output's own (the output is the reduction, `o = softmax(s) @ v`):
        the walks read the output's cotangent itself, and `pre` writes no copy of it."""
        return frozenset(r for r, g in self.d_reduction if g == f"_seed_{r}")

    def whole_grads(self) -> set[str]:
        """Leaves whose gradient one kernel writes whole (the others are parts summed after the kernels)."""
        written = [x for k in (self.pre, self.dq, self.dkv) for x, _ in k.leaf_grads]
        return {x for x in written if written.count(x) == 1}

    def __str__(self) -> str:
        return "\n".join(["backward (FlashAttention-2: P recomputed from the saved log-sum-exp):",
                          str(self.pre), str(self.dq), str(self.dkv)])


def _differentiable(sched: SoftmaxSchedule) -> set[str]:
    spec = sched.spec
    dep = set(sched.leaves)
    for op in spec.prefix.ops + spec.score.ops + spec.merge.ops:
        if any(isinstance(a, str) and a in dep for a in op.args):
            dep.add(op.out)
    return dep


def _seed_types(sched: SoftmaxSchedule) -> dict[str, TileType]:
    t = dict(sched.types)
    for o in sched.spec.outputs:
        t[SEED + o.name] = o.tile
    for gi, g in enumerate(sched.groups):
        t[p_name(gi)] = sched.types[g.score]
        t[dd_name(gi)] = TileType((C,))
        for r in g.reductions:
            t[dr_name(r.out)] = sched.types[r.out]
    return t


def differentiate_softmax(sched: SoftmaxSchedule) -> SoftmaxBackward:
    spec = sched.spec
    diff = _differentiable(sched)
    leaves = set(sched.leaves)
    sides = sched.sides
    base_types = _seed_types(sched)
    reduced = {r.out for g in sched.groups for r in g.reductions}
    lses = {x: gi for gi, g in enumerate(sched.groups) for x in g.lse}

    # ---- preprocess: the epilogue's VJP ------------------------------------------------------------
    b = Adjoints(base_types, "_e", softmax_op_type)
    grads = b.grad
    grads.update({o.name: SEED + o.name for o in spec.outputs})
    fwd = sched.c_ops + sched.q_ops + sched.post_ops
    backprop(b, fwd, lambda x: x in diff or x in reduced or x in lses)
    d_red = tuple((r.out, grads.get(r.out)) for g in sched.groups for r in g.reductions)
    d_group = []
    for gi, g in enumerate(sched.groups):
        terms = [b.emit("rowsum", b.emit("mul", grads[r.out], r.out)) for r in g.reductions if r.out in grads]
        for x in g.lse:
            if x in grads:
                terms.append(b.emit("neg", grads[x]))
        d = terms[0] if terms else None
        for t in terms[1:]:
            d = b.emit("add", d, t)
        if d is None:  # nothing reads this group's outputs' gradients: D = 0
            d = b.emit("mul", b.emit("rowsum", b.emit("mul", g.reductions[0].out, 0.0)), 0.0) if g.reductions \
                else b.emit("mul", g.lse[0], 0.0)
        d_group.append(d)
    q_grads = tuple((x, grads[x]) for x in sched.leaves if x in grads)
    roots = tuple(g for _, g in d_red if g) + tuple(d_group) + tuple(g for _, g in q_grads)
    vjp = live_ops(tuple(b.ops), roots)
    need = {a for op in vjp for a in op.args if isinstance(a, str)}
    recompute = live_ops(fwd, tuple(need))
    pre = BwdKernel("bwd_pre", recompute, (), (), (), vjp, q_grads, b.types)

    # ---- the two walks ---------------------------------------------------------------------------
    def walk(name: str, outer: str) -> BwdKernel:
        outer_ops = sched.c_ops + (sched.q_ops if outer == "Q" else sched.k_ops)
        loop_fwd = (sched.k_ops if outer == "Q" else sched.q_ops) + sched.p_ops
        b = Adjoints(base_types, "_b", softmax_op_type)
        grads = b.grad
        for gi, g in enumerate(sched.groups):
            dp = None
            for r in g.reductions:
                term = b.emit("matmul", dr_name(r.out), b.emit("transpose", r.x))
                dp = term if dp is None else b.emit("add", dp, term)
            centred = b.emit("neg", b.emit("expand", dd_name(gi), 0.0, 1.0)) if dp is None else \
                b.emit("sub", dp, b.emit("expand", dd_name(gi), 0.0, 1.0))
            b.add(g.score, b.emit("mul", p_name(gi), centred))
            if outer == "K":
                for r in g.reductions:
                    if r.x in diff:
                        b.add(r.x, b.emit("matmul", b.emit("transpose", p_name(gi)), dr_name(r.out)))
        backprop(b, sched.p_ops, lambda x: x in diff and sides.get(x) in ("P", outer) and x not in leaves)
        # the adjoints that leave the walk: outer-side values read by pair (or reduction) ops
        acc = tuple((x, grads[x]) for x in grads if sides.get(x) == outer and x in diff and x not in leaves)
        loop_vjp = live_ops(tuple(b.ops), tuple(c for _, c in acc))
        acc = tuple((x, c) for x, c in acc if any(op.out == c for op in loop_vjp) or c in base_types)
        # after the walk: through the outer-side ops to the leaves
        pb = Adjoints({**b.types, **{acc_name(x): b.types[x] for x, _ in acc}}, "_a", softmax_op_type)
        pgrads = pb.grad
        pgrads.update({x: acc_name(x) for x, _ in acc})
        sinks = {op.out: op.args[0] for op in outer_ops if op.kind in ("query", "key")}
        backprop(pb, outer_ops, lambda x: x in diff and x not in leaves)
        per_leaf: dict[str, str] = {}
        for y, leaf in sinks.items():
            g = pgrads.get(y)
            if g is None:
                continue
            t = pb.types[y]
            if t.rank == 2 and t.shape[1] == 1 and pb.types[leaf].rank == 1:  # query column [C, 1] -> [C]
                g = pb.emit("rowsum", g)
            elif t.rank == 2 and t.shape[0] == 1:  # key row [1, CK] -> [CK]
                g = pb.emit("colsum", g)
            per_leaf[leaf] = pb.emit("add", per_leaf[leaf], g) if leaf in per_leaf else g
        post = live_ops(tuple(pb.ops), tuple(per_leaf.values()))
        return BwdKernel(name, outer_ops, loop_fwd, loop_vjp, acc, post, tuple(per_leaf.items()), pb.types)

    return SoftmaxBackward(pre, walk("bwd_dq", "Q"), walk("bwd_dkv", "K"), d_red, tuple(d_group))
