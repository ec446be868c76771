"""The compiler's passes, in order. One driver (compiler.driver.Compilation) runs this list for every
spec; `effc show --stage NAME` prints the value of any of them.

A pass reads earlier stages of the compilation and returns its own. The family (linear: a chunked state;
softmax: a score walked over key blocks; hybrid: both) is data on the IR (`Spec.family`); the passes that
differ by family take their rule from `FAMILIES`, one row per family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..passes.autodiff import differentiate
from ..passes.branches import PerBranch
from ..passes.decay_dot import factor_decays
from ..passes.fusion import fuse
from ..passes.grad_terms import place_gradient_terms
from ..passes.hand_on import hand_on, read_outputs
from ..passes.hoist import hoist
from ..passes.hybrid import split_hybrid
from ..passes.legality import analyze
from ..passes.lower import lower
from ..passes.partition import partition_gradients
from ..passes.plan import plan
from ..passes.reverse_scan import split_reverse_scan
from ..passes.shapes import infer_shapes, value_types
from ..passes.softmax import analyze_softmax, infer_softmax_shapes, softmax_value_types
from ..passes.softmax_bwd import differentiate_softmax
from ..passes.softmax_plan import HybridPlan, HybridSchedule, softmax_plan
from ..passes.token_values import hoist_token_values


@dataclass(frozen=True)
class Pass:
    name: str  # the stage it produces
    what: str  # one line for `effc show --stages`
    run: Callable  # (Compilation) -> the stage's value


def _emit_linear(c, backend: str) -> str:
    if backend == "tilelang":
        from ..codegen.tilelang import emit_module as emit_tilelang
        return emit_tilelang(c.plan)
    from ..codegen.triton import emit_module
    return emit_module(c.plan)


def _emit_softmax(c, backend: str) -> str:
    if backend != "triton":
        raise NotImplementedError(f"backend '{backend}' is not implemented for the softmax family yet; "
                                  "available: triton")
    if c.plan.schedule.select is not None:  # a select stage: its kernels, then the listed walks
        from ..codegen.triton.select_emit import emit_select_module
        return emit_select_module(c.plan)
    from ..codegen.triton.softmax_decode_emit import emit_decode_kernels
    from ..codegen.triton.softmax_emit import emit_softmax_module
    return emit_softmax_module(c.plan) + emit_decode_kernels(c.plan)  # decoding's kernels after the forward's


def _linear_fused(c):
    fused = fuse(c.typed, c.legality, c.backward)
    split = c.legality.split_dims[0] if c.legality.split_dims else None
    fused = place_gradient_terms(c.typed, fused, c.backward, split)
    fused = hand_on(split_reverse_scan(c.typed, hoist(c.typed, fused), split), split)
    types = value_types(c.typed)
    fused = read_outputs(fused, {o.name: types[o.name] for o in c.typed.outputs if o.name in types})
    return partition_gradients(c.typed, fused, c.backward, split, dict(fused.hoisted + fused.handed))


def _per_branch(c, stage: str) -> PerBranch:
    return PerBranch(c.branch_split.spec, c.branch_split.parts, tuple(getattr(p, stage) for p in c.parts))


def _ir(c):
    if c.module.family(c.name) == "branched":
        return _per_branch(c, "ir")
    return lower(c.module, c.name)


@dataclass(frozen=True)
class Family:
    """How each family-dependent pass runs for one family."""

    name: str
    schedule: str  # what `effc compile` says it chose
    typed: Callable
    legality: Callable
    backward: Callable
    fused: Callable
    plan: Callable
    emit: Callable  # (Compilation, backend) -> source; backends a family lacks raise NotImplementedError


FAMILIES = {f.name: f for f in (
    Family("linear", "chunked-state scan",
           typed=lambda c: factor_decays(infer_shapes(c.ir)),
           legality=lambda c: analyze(c.typed),
           backward=lambda c: differentiate(c.typed),
           fused=_linear_fused,
           plan=lambda c: plan(c.typed, c.legality, c.fused, c.backward),
           emit=_emit_linear),
    Family("softmax", "online softmax (FlashAttention-2 walk over key blocks)",
           typed=lambda c: hoist_token_values(infer_softmax_shapes(c.ir), infer_softmax_shapes),
           legality=lambda c: analyze_softmax(c.typed),
           backward=lambda c: differentiate_softmax(c.legality),
           fused=lambda c: softmax_plan(c.typed, c.legality, c.backward),
           plan=lambda c: c.fused,
           emit=_emit_softmax),
    # a spec with branches compiles as one softmax spec per branch (passes.branches)
    Family("branched", "online softmax walks, one per branch, merged per token",
           typed=lambda c: _per_branch(c, "typed"),
           legality=lambda c: _per_branch(c, "legality"),
           backward=lambda c: _per_branch(c, "backward"),
           fused=lambda c: _per_branch(c, "fused"),
           plan=lambda c: _per_branch(c, "plan"),
           emit=lambda c, backend: "\n\n".join(p.emit(backend) for p in c.parts)),
    # a hybrid compiles as its two branches (passes.hybrid), each a spec of one family
    Family("hybrid", "hybrid: online softmax (FlashAttention-2) for the score branch + chunked-state scan",
           typed=lambda c: infer_softmax_shapes(c.ir),
           legality=lambda c: HybridSchedule(c.split, c.branch("softmax").legality, c.branch("linear").legality),
           backward=lambda c: c.branch("softmax").backward,
           fused=lambda c: HybridPlan(c.branch("softmax").fused, c.branch("linear").fused),
           plan=lambda c: HybridPlan(c.branch("softmax").plan, c.branch("linear").plan),
           emit=lambda c, backend: c.branch("softmax").emit(backend) + "\n\n" + c.branch("linear").emit(backend)),
)}


PIPELINE: tuple[Pass, ...] = (
    Pass("ir", "AST -> IR: scopes checked, macros inlined, SSA (passes.lower); a spec with branches: each "
         "branch's spec (passes.branches)", _ir),
    Pass("typed", "a tile type for every value (passes.shapes; passes.softmax for a score stage); factored "
         "decays across a score matmul made one decay_dot (passes.decay_dot)",
         lambda c: c.rules.typed(c)),
    Pass("split", "a hybrid's two branches, a softmax spec and a linear one (passes.hybrid); a spec with branches: "
         "one softmax spec per branch (passes.branches); none otherwise",
         lambda c: split_hybrid(c.typed, softmax_value_types(c.typed)) if c.typed.family == "hybrid"
         else c.branch_split if c.typed.family == "branched" else None),
    Pass("legality", "the schedule: which stages run chunk-parallel, what the walk carries (passes.legality, "
         "passes.softmax)", lambda c: c.rules.legality(c)),
    Pass("backward", "the derived backward (passes.autodiff; passes.softmax_bwd)", lambda c: c.rules.backward(c)),
    Pass("fused", "stages fused into kernels, gradient terms placed, state-free work hoisted, the gradient "
         "kernels partitioned (passes.fusion, grad_terms, hoist, reverse_scan, hand_on, partition)", lambda c: c.rules.fused(c)),
    Pass("plan", "the kernel plan both code generators read (passes.plan, passes.softmax_plan)",
         lambda c: c.rules.plan(c)),
)
PASSES = {p.name: p for p in PIPELINE}
