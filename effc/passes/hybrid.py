"""Hybrids: a spec with both a state (intra/merge/inter) and a score stage is two scans merged.

The split (a pass IR -> IR, IR):

- the **softmax branch** S: the prefix and score stages and the part of merge that computes the
  reductions over keys (softmax(s) @ x, logsumexp(s)); its outputs are those reductions, one value
  per query token. It compiles to the online-softmax walk (passes.softmax).
- the **state branch** L: intra, inter and the rest of merge, with every reduction (and every prefix
  value it reads) turned into a per-token input. It compiles to the chunked-state scan of the linear
  family (passes.legality, fusion, plan; its backward from passes.autodiff).

At run time S's kernels write the reductions (B, T, H, D) and L's walk reads them as inputs in its
merge; autograd chains the two backwards. The cost over a fused hybrid kernel is one write and one
read of each reduction per token.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import SpecError
from ..ir.nodes import Spec, Stage, TensorDecl
from .fusion import live_ops


@dataclass(frozen=True)
class HybridSplit:
    softmax: Spec  # outputs: the reductions
    linear: Spec  # inputs: the spec's inputs, then the reductions, then the prefix values it reads
    reductions: tuple[str, ...]
    prefix_inputs: tuple[str, ...]

    def __str__(self) -> str:
        return (f"hybrid: the softmax branch writes {', '.join(self.reductions)} per token (online-softmax walk); "
                f"the state branch reads them as inputs in merge (chunked-state scan)"
                + (f"; prefix values {', '.join(self.prefix_inputs)} are inputs of the state branch"
                   if self.prefix_inputs else ""))


def _decl(name: str, t, role: str) -> TensorDecl:
    return TensorDecl(name, role, ("B", "T", "H") + tuple(str(d) for d in t.shape[1:]))


def split_hybrid(spec: Spec, types: dict) -> HybridSplit:
    """`spec` typed (passes.softmax.infer_softmax_shapes), with states and a score stage."""
    merge = spec.merge.ops
    reductions = []
    softmaxes = {op.out for op in merge if op.kind == "softmax"}
    for op in merge:
        if op.kind == "logsumexp" or (op.kind == "matmul" and op.args[0] in softmaxes):
            reductions.append(op.out)
    if not reductions:
        raise SpecError(f"spec '{spec.name}' has a score stage but merge reads no softmax over keys",
                        merge[0].loc if merge else None, "softmax(s) @ v or logsumexp(s) in merge")
    s_merge = live_ops(merge, tuple(reductions))
    taken = {op.out for op in s_merge}
    l_merge = tuple(op for op in live_ops(merge, tuple(o.name for o in spec.outputs)) if op.out not in taken)
    # an output that is a reduction itself (`o = softmax(s) @ v`: merge does not read the state): the softmax
    # branch writes it under another name and the state branch's merge copies it to the output
    renamed = {r: f"_{r}_softmax" for r in reductions if r in {o.name for o in spec.outputs}}  # no SSA name
    l_merge += tuple(replace(op, kind="copy", args=(renamed[op.out],)) for op in s_merge if op.out in renamed)
    s_merge = tuple(replace(op, out=renamed.get(op.out, op.out)) for op in s_merge)
    types = {**types, **{new: types[r] for r, new in renamed.items()}}
    reductions = [renamed.get(r, r) for r in reductions]
    score_values = {op.out for op in spec.score.ops} | {"qpos", "kpos"}
    for op in l_merge:
        for a in op.args:
            if isinstance(a, str) and a in score_values:
                raise SpecError("in a hybrid, merge reads the score stage only through softmax(s) @ x and "
                                "logsumexp(s)", op.loc, "the state branch's values, inputs and the reductions")
        if op.kind in ("key", "query"):
            raise SpecError(f"'{op.kind}(...)' in the state branch of a hybrid: an input declared `key` is key "
                            "side in merge", op.loc, "inputs without the `key` annotation in the state branch")
    used = {a for op in spec.intra.ops + l_merge + spec.inter.ops for a in op.args if isinstance(a, str)}
    prefix_inputs = tuple(op.out for op in spec.prefix.ops if op.out in used)
    # both branches keep the spec's name, which every error a call can raise names (their kernels' names differ)
    soft = replace(spec, outputs=tuple(_decl(r, types[r], "output") for r in reductions),
                   states=(), intra=Stage("intra", ()), inter=Stage("inter", ()), merge=Stage("merge", s_merge))
    extra = tuple(_decl(r, types[r], "input") for r in reductions + list(prefix_inputs))
    lin = Spec(spec.name, spec.inputs + extra, spec.outputs, spec.states, spec.params, spec.chunk,
               _untyped(spec.intra), Stage("merge", tuple(op.typed(None) for op in l_merge)), _untyped(spec.inter))
    return HybridSplit(soft, lin, tuple(reductions), prefix_inputs)


def _untyped(stage: Stage) -> Stage:
    return Stage(stage.name, tuple(op.typed(None) for op in stage.ops))
