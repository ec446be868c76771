"""Splitting the reverse scan: what reads no carried adjoint leaves the serial loop.

The backward's reverse scan carries each state's adjoint from the last chunk to the first. Its update
is a sum: terms that read the carried adjoint (for the delta rule, -w^T (kn dS)) and terms that read
only the output cotangents and the chunk (-w^T causal(qn kn^T)^T dO + qn^T dO): most of the matmuls.
`bwd_inject` computes the second group for every chunk in parallel and writes it; the scan adds it: the
serial chain keeps what it must. Where a per-token value (a [C, d] tile, d the split dim) is such a sum
and its free part costs a matmul (the delta rule's `dv = kn dS + causal(qn kn^T)^T dO`), the cut is made
there: bwd_inject writes that part per token (in the matmul operand dtype, as fla's `dv_local`) and the
scan forms the value whole, so the matmuls after it run once on the sum and the value itself can be handed
on to the gradient kernels (passes.hand_on). Otherwise the free part is pushed out through the linear ops to
the state's adjoint and written state-sized (fp32 or the history's dtype, per chunk). A diagonal
transition's scan runs in segments, each chunk's body twice (segment summaries, then the walk): there, and
after a per-token cut (the scan then loads per-token tiles anyway), a state-sized write pays off only when
the free part is more than one matmul of loaded tiles (mLSTM's normaliser recomputes the output), and
retention's (and the delta rules') `q^T dO` stays in the scan.
"""
from __future__ import annotations

from dataclasses import replace

from ..ir.nodes import C, Op, Spec, TileType, next_state_name
from .autodiff import is_seed, linear_arg, seed_name, split_once
from .fusion import Fused, FusedKernel, depends, needed, topological


class _Split:
    """Splits a value linear in the cotangents into (the part that reads the carried adjoint, the rest),
    pushing the sum out through the ops linear in it, matmuls included: `w^T @ -(k dS + A^T dO)` becomes
    `w^T @ -(k dS)` + `w^T @ -(A^T dO)`; but a per-token sum (`per_token`) is cut where it is formed: it
    stays whole, reading its free part from bwd_inject (`cuts`). New values are named `_rs<n>`; None is an
    empty part."""

    def __init__(self, ops: tuple[Op, ...], carried: set[str], seeds: set[str], per_token):
        self.defs = {op.out: op for op in ops}
        self.carried, self.adjoint = carried, depends(ops, seeds)
        self.per_token = per_token  # (a value's type, its free part's ops) -> cut it there?
        self.cuts: list[tuple[str, str, TileType]] = []  # (cut value, its free part, the type)
        self.new: list[Op] = []
        self.n = 0  # the next name's number
        self.memo: dict[str, tuple[tuple, int]] = {}  # value -> (its parts, ops its split emitted)

    def emit(self, kind: str, args: tuple, t: TileType) -> str:
        out = f"_rs{self.n}"
        self.n += 1
        self.new.append(Op(out, kind, args, t))
        return out

    def __call__(self, v) -> tuple:
        """Each value is split once (autodiff.split_once)."""
        if not isinstance(v, str) or v not in self.carried:
            return None, v
        return split_once(self.memo, v, self._split, self)

    def _split(self, v: str) -> tuple:
        op = self.defs.get(v)
        if op is None:
            return v, None
        k, args, t = op.kind, op.args, op.type
        if k in ("add", "sub") and all(isinstance(a, str) and a in self.adjoint for a in args):
            (ca, fa), (cb, fb) = self(args[0]), self(args[1])
            if fa is None and fb is None:
                return v, None
            kept, free = self._combine(k, ca, cb, t), self._combine(k, fa, fb, t)
            if kept is not None and self.per_token(t, self.free_ops(free)):
                self.cuts.append((v, free, t))
                self.new.append(Op(v, "add", (kept, injection_name(v)), t))
                return v, None
            return kept, free
        i = linear_arg(op, self.adjoint, through_matmul=True)
        c, f = self(args[i]) if i is not None else (v, None)
        if f is None:
            return v, None
        wrap = lambda x: None if x is None else self.emit(k, args[:i] + (x,) + args[i + 1:], t)
        return wrap(c), wrap(f)

    def free_ops(self, free: str) -> tuple[Op, ...]:
        return needed(tuple(self.defs.values()) + tuple(self.new), (free,))

    def _combine(self, kind: str, a, b, t):
        if b is None:
            return a
        if a is None:
            return b if kind == "add" else self.emit("neg", (b,), t)
        return self.emit(kind, (a, b), t)


def injection_name(root: str) -> str:
    return f"_inj{root}"


def whole_per_token(t: TileType | None, split: str | None) -> bool:
    """A [C, d] tile (d the split dim, or any named dim without one): each of a serial kernel's blocks holds
    its own columns whole, so it can be written per token (a per-token cut here, passes.hand_on)."""
    return (t is not None and t.rank == 2 and t.shape[0] == C and not str(t.shape[1]).isdigit()
            and (split is None or str(t.shape[1]) == split))


def _per_token_cut(split: str | None):
    """Is a value of type `t` whose free part computes `free_ops` cut per token? A whole per-token tile whose
    free part does matmul work."""
    def cut(t: TileType, free_ops) -> bool:
        return whole_per_token(t, split) and any(op.kind == "matmul" for op in free_ops)
    return cut


def split_reverse_scan(spec: Spec, fused: Fused, split: str | None = None) -> Fused:
    """bwd_scan -> bwd_inject (the carried-free terms of each state adjoint, per chunk, in parallel) +
    bwd_scan (the carried terms, plus the injected sum). A state whose adjoint has no carried-free part
    (`_Split`), or whose carried-free part is too cheap to write out (`worth`), stays as it was. `split`: the
    split dim, whose blocks the scan runs in (a per-token cut needs the value whole in each)."""
    names = [k.name for k in fused.kernels]
    if "bwd_scan" not in names or spec.reverse_states:  # (not split for the bidirectional scans yet)
        return fused
    scan = fused.kernels[names.index("bwd_scan")]
    state_tiles = {seed_name(next_state_name(s.name)): s.tile for s in spec.states}
    seeds = {a for op in scan.ops for a in op.args if isinstance(a, str) and is_seed(a)}
    splitter = _Split(scan.ops, depends(scan.ops, set(state_tiles)), seeds, _per_token_cut(split))
    inject, rewritten, injected = [], {}, []
    for root in scan.roots:
        kept, free = splitter(root)
        # matmuls in the free part that pay for writing it state-sized
        worth = 2 if "summary" in names or splitter.cuts else 1
        free_ops = splitter.free_ops(free) if free else ()
        if kept is None or free is None or sum(op.kind == "matmul" for op in free_ops) < worth:
            continue
        t = splitter.defs[root].type
        x_name = injection_name(root)
        inject.append(Op(x_name, "copy", (free,), t))
        rewritten[root] = [Op(root, "add", (kept, x_name), t)]
        injected.append((root, x_name))
    per_token = [(injection_name(v), t) for v, _, t in splitter.cuts]
    if not injected and not per_token:
        return fused
    inject += [Op(injection_name(v), "copy", (free,), t) for v, free, t in splitter.cuts]
    cut = {v for v, _, _ in splitter.cuts}
    scan_ops = ([op for op in scan.ops if op.out not in rewritten and op.out not in cut] + splitter.new
                + [op for r in rewritten.values() for op in r])
    if cut:  # a cut value is made after the ops reading it were: put each op after what it reads
        scan_ops = topological({op.out: op for op in scan_ops}, scan.roots)
    scan_ops = needed(tuple(scan_ops), scan.roots)
    free_roots = tuple(x for _, x in injected) + tuple(x for x, _ in per_token)
    inject_ops = needed(tuple(scan.ops) + tuple(splitter.new) + tuple(inject), free_roots)
    kernels = list(fused.kernels)
    kernels[names.index("bwd_scan")] = replace(scan, ops=scan_ops)
    kernels.insert(names.index("bwd_scan"), FusedKernel("bwd_inject", scan.stages, inject_ops, free_roots,
                                                        scratch_stores=tuple(per_token)))
    return replace(fused, kernels=tuple(kernels), injected=tuple(injected), handed=fused.handed + tuple(per_token))
