"""Gradient terms: an input gradient summed across the backward kernels that already hold its parts.

passes.fusion gives each input gradient a kernel of its own. A gradient that a decay's log (`g`) or a gate
reaches collects a term from nearly every path of the chunk, so its kernel recomputes every adjoint at once
(gated_delta_net_l2's dg: ~5 KB of register spills a thread on sm_90, 7.5 of the backward's 14 ms). Adjoints
are linear in the cotangents, so the gradient is a sum of terms; a term whose matmuls another gradient's
kernel computes anyway costs that kernel a few elementwise ops and one more store. Each kernel then writes
its part of the gradient, and the runtime sums the parts as it sums the split blocks' partials.

A term is what is left of the gradient's expression after pushing the sum out through the ops linear in
the adjoint (add, neg, masks, reductions, scans, broadcasts, scaling by a forward value); a matmul ends it,
so no matmul is ever duplicated.
"""
from __future__ import annotations

from dataclasses import replace

from ..ir.nodes import Op, Spec
from .autodiff import linear_arg, split_once
from .fusion import Fused, FusedKernel, depends, live_ops, needed
from .kernel_cost import live_values, typical_sizes
from .vjp_rules import Adjoints

# A value whose split would give more terms than this stays one term. The terms of a value are its paths
# through the ops linear in the adjoint, so they can grow exponentially with the depth of a DAG of shared
# values (a merge chaining conjugate-gradient steps: 15, 207, 2739 terms for 1, 2, 3 steps). The library's
# largest split has 96 terms (hdla), so the bound changes none of its kernels.
MAX_TERMS = 256


def split_terms(ops: tuple[Op, ...], root: str, adjoint: set[str], b: Adjoints) -> list[str]:
    """The values (in `b.ops` or `ops`) whose sum is `root`: the sum pushed out through ops linear in the
    adjoint values (`adjoint`: the values that read a cotangent), at most MAX_TERMS of them per value."""
    return _Splitter({op.out: op for op in ops}, adjoint, b)(root)


class _Splitter:
    """Splits each value once (autodiff.split_once): a shared value's terms are built once and shared by
    every value that reads it."""

    def __init__(self, by_out: dict[str, Op], adjoint: set[str], b: Adjoints):
        self.by_out, self.adjoint, self.b = by_out, adjoint, b
        self.memo: dict[str, tuple[list[str], int]] = {}  # value -> (its terms, ops its split emitted)

    def __call__(self, root: str) -> list[str]:
        return split_once(self.memo, root, self._bounded, self.b)

    def _bounded(self, root: str) -> list[str]:
        terms = self._split(root)
        return [root] if len(terms) > MAX_TERMS else terms

    def _split(self, root: str) -> list[str]:
        op, adjoint, b = self.by_out.get(root), self.adjoint, self.b
        if op is None or root not in adjoint:
            return [root]
        k, args = op.kind, op.args
        if k == "add" and all(isinstance(a, str) and a in adjoint for a in args):
            return self(args[0]) + self(args[1])
        if k == "sub" and all(isinstance(a, str) and a in adjoint for a in args):
            return self(args[0]) + [b.emit("neg", t) for t in self(args[1])]
        wraps = linear_arg(op, adjoint)  # never through a matmul: each term would repeat it
        if wraps is None:
            return [root]
        inner = self(args[wraps])
        if len(inner) == 1:
            return [root]
        return [b.emit(k, *(args[:wraps] + (t,) + args[wraps + 1:])) for t in inner]


def _leaves(ops) -> set[str]:
    made = {op.out for op in ops}
    return {a for op in ops for a in op.args if isinstance(a, str) and a not in made}


# A host may grow to this many live fp32 values a thread (8 warps), or by 5%. Measured on the H100
# (fwd+bwd, 2x8192): dissolving kernels within it sped training up by 3-52% (gated_delta_net_l2 13.7 -> 6.6 ms,
# rwkv7 19.9 -> 13.7, gla 5.9 -> 4.9, hdla 43.7 -> 38.2); without the limit mlstm's f kernel grew from
# 371 to 403 values (8.1 -> 9.2 ms) and hdla's g kernel from 676 to 1248 (43.7 -> 63.4 ms).
HOST_LIVE_LIMIT, HOST_GROWTH = 300, 1.05
THREADS = 256


def _host_cost(term_ops: tuple[Op, ...], host: tuple[Op, ...], types: dict) -> int | None:
    """Elementwise work a term adds to a host kernel's ops, or None if it would need a matmul the host does
    not compute or a tile the host does not load (a [C] vector or a scalar may be loaded)."""
    have = {op.out for op in host}
    extra = [op for op in term_ops if op.out not in have]
    reads = {n for n in _leaves(term_ops) if len(types[n].shape) > 1}
    if any(op.kind == "matmul" for op in extra) or not reads <= _leaves(host) | have:
        return None
    return len(extra)


def place_gradient_terms(spec: Spec, fused: Fused, backward, split_dim: str | None = None) -> Fused:
    """Dissolve gradient kernels into the others, largest first: a `bwd_chunks_<x>` kernel goes if every term
    of x's gradient fits in another kernel (`_host_cost`: no new matmul, no new tile load) and no host grows
    past HOST_LIVE_LIMIT live values a thread (or by more than HOST_GROWTH). Each term goes where it adds the
    fewest ops. A kernel that receives terms is kept; each kernel writing a part of x's gradient lists it in
    its `grads` (Plan.grad_writers orders the parts)."""
    chunks = {k.name: k for k in fused.kernels if k.name.startswith("bwd_chunks_")}
    if backward is None or len(chunks) < 2:
        return fused
    adjoint = depends(backward.ops, {s for s, _ in backward.seeds})
    b = Adjoints(backward.types(spec), prefix="_t")  # builds the term ops
    sizes = typical_sizes(spec, split_dim)
    placed: dict[str, list[tuple[str, str]]] = {n: list(k.grads) for n, k in chunks.items()}  # kernel -> terms

    memo: dict[tuple, tuple] = {}

    def kernel_ops(name, extra=()):
        roots = tuple(t for _, t in placed[name]) + tuple(extra)
        if roots not in memo:  # b.ops only grows, and a root's ops never change
            memo[roots] = live_ops(backward.ops + tuple(b.ops), roots)
        return roots, memo[roots]

    def live(name, extra=()):
        roots, ops = kernel_ops(name, extra)
        return live_values(ops, roots, b.types, sizes) / THREADS

    dissolved, hosts = set(), set()
    for name in sorted(chunks, key=live, reverse=True):
        if name in hosts:
            continue
        moves: dict[str, list[tuple[str, str]]] = {}
        for x, g in placed[name]:
            for term in split_terms(backward.ops, g, adjoint, b):
                term_ops = needed(backward.ops + tuple(b.ops), (term,))
                costs = [(c, h) for h in chunks if h != name and h not in dissolved
                         for c in [_host_cost(term_ops, kernel_ops(h)[1], b.types)] if c is not None]
                if not costs:
                    break
                moves.setdefault(min(costs)[1], []).append((x, term))
            else:
                continue
            break
        else:
            if all(live(h, [t for _, t in m]) <= max(HOST_LIVE_LIMIT, HOST_GROWTH * live(h)) for h, m in moves.items()):
                dissolved.add(name)
                del placed[name]
                for h, m in moves.items():
                    hosts.add(h)
                    placed[h] += m
    if not dissolved:
        return fused
    out = []
    for k in fused.kernels:
        if k.name in dissolved:
            continue
        if k.name not in placed or placed[k.name] == list(k.grads):
            out.append(k)
            continue
        grads: dict[str, str] = {}
        for x, term in placed[k.name]:
            grads[x] = b.emit("add", grads[x], term) if x in grads else term
        roots = tuple(grads.values())
        out.append(FusedKernel(k.name, k.stages, live_ops(backward.ops + tuple(b.ops), roots), roots,
                               tuple(grads.items())))
    return replace(fused, kernels=tuple(out))
