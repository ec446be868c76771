"""Kernel plan -> a Triton module (source text). Index arithmetic is derived from each
tensor's declared dims; the body is one printed line per IR op."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ...ir.nodes import TensorDecl
from ...passes.plan import KernelPlan, Plan
from ...version import __version__
from .. import template
from .printer import TritonPrinter, feature_mask, head_index, helper_source
from .signature import LINEAR_LAYOUT, signature


def _axes(n: int, i: int) -> str:
    """Index suffix that puts axis i of an n-axis tile in place: [:, None] / [None, :]."""
    return "" if n == 1 else "[" + ", ".join(":" if j == i else "None" for j in range(n)) + "]"


def _row_major(base: str, dims: tuple[str, ...]) -> str:
    """Offsets of a tile over `dims` (innermost last) inside a block that starts at `base`."""
    expr = base
    for i, d in enumerate(dims):
        expr = f"({expr}) * {d} + r_{d}{_axes(len(dims), i)}"
    return expr


def _masks(axes, split: str | None) -> tuple[str, str]:
    """The load and store keyword arguments that mask the padded feature columns of a tile whose axes are
    `axes` (feature dim names; None for others): empty without feature dims, and constexpr-conditional
    (mask=None, the unmasked access, where no dim is padded)."""
    fm = feature_mask(list(axes), split)
    if fm is None:
        return "", ""
    m, cond = fm
    return (f", mask=({m} if {cond} else None), other=(0.0 if {cond} else None)", f", mask=({m} if {cond} else None)")


def _token_offsets(d: TensorDecl, heads: str = "H", base: str = "bos + tok",
                   split: str | None = None, rows: dict | None = None) -> tuple[str, str]:
    """Offsets and mask of a per-token tile of `d` in a (tokens, heads, features) tensor.
    `heads` is the tensor's head count: inputs with fewer heads (GQA) are shared by a group.
    The mask drops padded tokens and, where a feature dim is padded, its padded columns.
    `rows`: the width a feature dim's rows have in memory where it is not the dim's own (a part of a dim in
    power-of-two parts is a column slice of the caller's tensor: its rows are the whole dim apart)."""
    feats = d.feature_dims
    tok = f"({base})" + ("[:, None]" if feats else "")
    expr = f"{tok} * {heads} + {head_index(heads)}"
    for f in feats:
        expr = f"({expr}) * {(rows or {}).get(f, f)} + r_{f}[None, :]"
    if not feats:
        return expr, "tv"
    m, cond = feature_mask([None] + list(feats), split)
    return expr, f"(tv[:, None] & {m} if {cond} else tv[:, None])"


@dataclass
class _KernelView:
    fn: str
    plan: KernelPlan
    signature: str  # from the plan's arguments (codegen.triton.signature)
    body: list[str]
    tok_offs: dict[str, str]
    tok_mask: dict[str, str]
    state_offs: dict[str, str]
    seg_offs: dict[str, str]
    hist_offs: dict[str, str]
    state_block: dict[str, str]
    decay: dict[str, str]  # the expression of each state's diagonal decay (summary kernel)
    grad_offs: dict[str, str] = field(default_factory=dict)
    grad_value: dict[str, str] = field(default_factory=dict)
    dinit_offs: dict[str, str] = field(default_factory=dict)
    dhist_offs: dict[str, str] = field(default_factory=dict)
    bseg_offs: dict[str, str] = field(default_factory=dict)  # the reverse scan's segment summaries
    partial_state: dict[str, bool] = field(default_factory=dict)
    hoisted_offs: dict[str, str] = field(default_factory=dict)
    merge_flag: bool = False  # the walk takes FUSE_MERGE (plans with an out kernel; passes.plan lists it)
    coarse: bool = False  # the walk also runs as a coarse walk's fine walk (FROM_COARSE; TileConfig.walk_chunk)
    coarse_offs: dict[str, str] = field(default_factory=dict)  # the coarse state entering segment pid_p
    decay_flag: bool = False  # runs twice, factored then anchored decays (codegen/triton/decay.py.j2)
    solves: bool = False  # takes a scratch tile per program for the in-chunk solve (codegen/triton/solve.py.j2)
    optional_loads: set = field(default_factory=set)  # inputs only merge reads: not loaded when it is deferred
    block_loop: dict | None = None  # a gradient kernel looping over the split dim's blocks (_block_loop)
    # keyword arguments masking the padded feature columns of each state's tile (loads, stores) and each
    # hoisted tile's
    state_load: dict[str, str] = field(default_factory=dict)
    state_store: dict[str, str] = field(default_factory=dict)
    hoisted_load: dict[str, str] = field(default_factory=dict)
    hoisted_store: dict[str, str] = field(default_factory=dict)
    # a serial loop's loads issued a chunk ahead (_prefetches): name -> the load of the next chunk's tile
    prefetch: dict[str, str] = field(default_factory=dict)
    prefetch_order: tuple[str, str] = ("", "")  # the loop's first chunk, and the chunk after i_c in its order
    # loaded tiles kept in their storage dtype: only tl.dot reads them (TritonPrinter.dot_operands)
    narrow: set = field(default_factory=set)


def kernel_name(spec_name: str, kernel: str) -> str:
    return f"{spec_name}_{kernel}_kernel"


def caller_rows(spec) -> dict[str, str]:
    """The row width in memory of each part dim (passes.dim_parts) of the caller's tensors: the whole dim."""
    return {p: "(" + " + ".join(parts) + ")" for _, parts in spec.parts for p in parts}


def _grad_stores(view, plan: Plan, kp) -> None:
    """Where kernel `kp` stores each gradient it writes: whole, or one fp32 partial per split block, and several
    kernels' parts (passes.grad_terms) in their own slots, summed after. The launcher gives the first slot
    (`<x>_slot`, Plan.grad_slot): the partitions that share a kernel may place its part apart."""
    for x, g in kp.grads:
        if kp.role == "bwd_chunks":
            slot = f"{x.name}_slot" + (" + pid_s" if plan.per_block(x.name, kp.name) else "")
            base = f"({slot}) * T_total + bos + tok"
        else:
            base = "bos + tok"
        offs, mask = _token_offsets(x, "H", base, plan.split_dim, caller_rows(plan.spec))
        view.grad_offs[x.name] = offs
        view.tok_mask[x.name] = mask
        view.grad_value[x.name] = f"v_{g}" if g else "0.0"


def _block_loop(plan: Plan, kp, printer: TritonPrinter) -> dict:
    """What the template needs for a gradient kernel that loops over the split dim's blocks (passes.block_loop):
    per part of the loop, its loads and lines."""
    split, loop = plan.split_dim, kp.block_loop
    has = lambda dims: split in dims
    size = lambda d: "BLOCK" if str(d) == split else f"{d}_P" if str(d) in plan.spec.dims else str(d)
    zeros = lambda t: "tl.zeros([" + ", ".join(size(d) for d in t.shape) + "], tl.float32)"
    types = kp.types(plan.spec)
    return dict(
        loads=[d for d in kp.loads if not has(d.feature_dims)], loop_loads=[d for d in kp.loads if has(d.feature_dims)],
        hoisted=[d for d in kp.hoisted_loads if not has(d.feature_dims)],
        loop_hoisted=[d for d in kp.hoisted_loads if has(d.feature_dims)],
        states=[s for s in kp.states if not has(s.dims)], loop_states=[s for s in kp.states if has(s.dims)],
        # a state without the split dim: the scan left one partial adjoint per block; their sum is the adjoint
        block_dhist={s.name: _row_major(f"((c_base + i_c) * H + i_h) * tl.cdiv({split}, BLOCK) + vb", s.dims)
                     for s in kp.states if not has(s.dims)},
        outputs=[o for o in plan.spec.outputs if not has(o.feature_dims)],
        loop_outputs=[o for o in plan.spec.outputs if has(o.feature_dims)],
        before=[f"v_{op.out} = {printer.expr(op)}" for op in loop.before],
        sum_inits=[f"v_{n} = {zeros(types[n])}" for n in loop.sums],
        body=[f"v_{op.out} = " + (f"v_{op.out} + " if op.out in loop.sums else "") + printer.expr(op)
              for op in loop.body],
        after=[f"v_{op.out} = {printer.expr(op)}" for op in loop.after],
        grads=[(x, g) for x, g in kp.grads if not has(x.feature_dims)],
        loop_grads=[(x, g) for x, g in kp.grads if has(x.feature_dims)])


SERIAL_ROLES = ("walk", "summary", "bwd_scan")
_NEXT = {"tok": "tok_n", "tv": "tv_n", "i_c": "i_n"}


def _next_chunk(expr: str) -> str:
    """An offset or mask expression of the current chunk, of the next one instead."""
    return re.sub(r"\b(tok|tv|i_c)\b", lambda m: _NEXT[m.group(1)], expr)


def _in_segment(shape: str) -> str:
    """A mask of a tile of `shape` (a Triton shape list): whether chunk i_n lies in the program's segment."""
    chunk = f"(tl.zeros({shape}, tl.int64) + i_n)"  # the tile's shape: a mask of it, no scalar
    return f"({chunk} >= c_lo) & ({chunk} < c_hi)"


def _prefetches(kp, view, spec, split: str | None) -> dict[str, str]:
    """The loads a serial loop (walk, summary, adjoint scan) issues one chunk ahead, so that the chunk's work
    does not wait on them: Triton's pipeliner carries the tiles that feed a dot over iterations, but leaves a
    per-token vector (a gate, beta) and the scan's injected terms (added, not multiplied) loaded in the
    iteration that uses them, and a serial loop has nothing else to run meanwhile. The next chunk is i_n
    (tok_n, tv_n); past the segment's end the load is masked off."""
    if kp.role not in SERIAL_ROLES:
        return {}
    out = {}
    for d in kp.loads:
        if not d.feature_dims:
            out[d.name] = (f"tl.load({d.name}_ptr + {_next_chunk(view.tok_offs[d.name])}, "
                           f"mask={_next_chunk(view.tok_mask[d.name])}, other=0.0)")
    for d in kp.hoisted_loads:  # prep's row vectors (the gates' cumulative sums): chunk-padded, a chunk's rows all
        if not d.feature_dims:
            out[d.name] = (f"tl.load({d.name}_ptr + {_next_chunk(view.hoisted_offs[d.name])}, "
                           f"mask={_in_segment('[C]')}, other=0.0)")
        elif kp.role == "bwd_scan" and d.role == "handed":  # bwd_inject's per-token terms, added like the above
            axes = [f if f in spec.dims else None for f in d.feature_dims]
            shape = "[C, " + ", ".join("BLOCK" if f == split else f"{f}_P" if f else "C" for f in axes) + "]"
            mask = _in_segment_masked(shape, [None] + axes, split)
            out[d.name] = f"tl.load({d.name}_ptr + {_next_chunk(view.hoisted_offs[d.name])}, mask={mask}, other=0.0)"
    if kp.role == "bwd_scan":
        dims = {st.name: st.dims for st in spec.states}
        for s, x in kp.injected:
            mask = _in_segment_masked(view.state_block[s], list(dims[s]), split)
            out[x] = f"tl.load({s}_inj_ptr + {_next_chunk(view.dhist_offs[s])}, mask={mask}, other=0.0)"
    return out


def _in_segment_masked(shape: str, axes, split: str | None) -> str:
    """`_in_segment` of a tile of `shape` whose `axes` (feature dim names; None for others) may be padded: also
    its real columns where a dim is padded (constexpr-conditional, as `_masks`)."""
    whole, fm = _in_segment(shape), feature_mask(axes, split)
    return whole if fm is None else f"({whole} & {fm[0]} if {fm[1]} else {whole})"


# the kernels whose dot-only tiles load in their storage dtype (H100, bf16, 2x8192, D=128, one call beside the
# tree): the walk 0.285 -> 0.262 ms (gated_delta_net), 0.247 -> 0.231 (delta_net), its pipelined loop streaming
# w and k into shared memory; narrowed as well, the adjoint scan went 0.311 -> 0.351, bwd_sums 0.972 -> 1.124
# and delta_net's out 0.159 -> 0.182, the conversion to the dot's layout then done per dot
NARROW_ROLES = ("walk",)


def _narrow_loads(kp, printer: TritonPrinter) -> set[str]:
    """The token and prep tiles kernel `kp` loads that only tl.dot reads: kept as stored, not widened to fp32
    (tl.dot casts them to DOT_DTYPE; bf16 -> fp32 -> bf16 is exact, so the result is the same)."""
    if kp.role not in NARROW_ROLES:
        return set()
    template_reads = {s.decay for s in kp.states}  # the template reads each state's decay itself
    return (printer.dot_operands(kp.ops) & {d.name for d in kp.loads + kp.hoisted_loads}) - template_reads


def _scratch_stores(kp) -> tuple:
    """The per-token tiles a kernel writes for later kernels: prep's hoisted values, a gradient kernel's sums,
    the free parts bwd_inject writes per token and the values a serial kernel hands on (passes.hand_on)."""
    return (kp.stores if kp.role in ("prep", "bwd_chunks", "bwd_inject") else ()) + kp.hands


def _check_scan_decay(plan: Plan, kp) -> None:
    """The segmented reverse scan multiplies out each state's decay (the adjoint's transition is the forward's
    diagonal one), which the scan's body must compute (plan() names it as autodiff's CSE left it)."""
    known = {op.out for op in kp.ops} | {p.name for p in plan.spec.params} | {d.name for d in kp.loads}
    for s in kp.states:
        if isinstance(s.decay, str) and s.decay not in known:
            raise NotImplementedError(f"spec '{plan.spec.name}': the segmented reverse scan needs the decay of "
                                      f"state {s.name} ({s.decay}) in its body, which does not compute it")


def emit_module(plan: Plan, late_loads: bool = False) -> str:
    """The Triton module of a linear spec's plan. `late_loads`: each chunk-parallel kernel's tile loads at their
    first reader (codegen.at_first_use) instead of at the top of the chunk's work: fewer registers live, later
    loads; the module a launch uses for a kernel whose compiled form spills (runtime.launch.spill_free)."""
    spec = plan.spec
    split = plan.split_dim
    views = []
    for kp in plan.kernels:
        if kp.role == "bwd_scan":
            _check_scan_decay(plan, kp)
        printer = TritonPrinter(spec, kp.types(spec), split)
        printer.row_pointers = {d.name: f"{d.name}_ptr + ((c_base + i_c) * H + i_h) * C + {{row}}"
                                for d in kp.hoisted_loads if not d.feature_dims}
        rows = caller_rows(spec)  # the caller's inputs and outputs; the kernels' own scratch is dense
        toks = {d.name: _token_offsets(d, f"HX_{d.name}", split=split, rows=rows) for d in kp.loads}
        toks.update({d.name: _token_offsets(d, split=split, rows=rows if d in spec.outputs else None)
                     for d in kp.stores + (spec.outputs if kp.backward else ())})
        # with merge deferred (FUSE_MERGE false) the walk skips what only the outputs need; a constexpr `if`
        # is resolved when Triton compiles, and names it defines stay in scope
        optional = set(plan.merge_only()) if kp.role == "walk" else set()
        view = _KernelView(
            fn=kernel_name(spec.name, kp.name), plan=kp, signature=signature(kp.args, LINEAR_LAYOUT),
            body=[("if FUSE_MERGE: " if op.out in optional else "") + f"v_{op.out} = {printer.expr(op)}"
                  for op in kp.ops],
            # the plan gives the walk FUSE_MERGE and FROM_COARSE when it has an out kernel
            merge_flag="FUSE_MERGE" in kp.arg_names, decay_flag="DECAY_MODE" in kp.arg_names,
            solves="solve_ptr" in kp.arg_names,
            coarse="FROM_COARSE" in kp.arg_names,
            coarse_offs={s.name: _row_major("(coarse_base + pid_p) * H + i_h", s.dims) for s in kp.states},
            optional_loads={d.name for d in kp.loads + kp.hoisted_loads} - {
                a for op in kp.ops if op.out not in optional for a in op.args if isinstance(a, str)} if optional else set(),
            tok_offs={n: t[0] for n, t in toks.items()}, tok_mask={n: t[1] for n, t in toks.items()},
            state_offs={s.name: _row_major("i_bh", s.dims) for s in kp.states},
            seg_offs={s.name: _row_major("i_bh * n_segments + seg", s.dims) for s in kp.states},
            hist_offs={s.name: _row_major("(c_base + i_c) * H + i_h", s.dims) for s in kp.states + kp.read_states},
            state_block={s.name: "[" + ", ".join("BLOCK" if d == split else f"{d}_P" for d in s.dims) + "]"
                         for s in kp.states},
            decay={s.name: printer.ref(s.decay) for s in kp.states if s.decay is not None},
            # hoisted values are chunk-padded (every row of a chunk, padding included, as the walk would compute
            # it): no masks, and the split dim's block of a [C, d] tile reads its own columns
            hoisted_offs={d.name: _row_major("(c_base + i_c) * H + i_h", ("C",) + d.feature_dims)
                          for d in kp.hoisted_loads + _scratch_stores(kp)})
        # bwd_inject stores the injected terms of states whose history it need not read
        injected = tuple(s for s in spec.states if s.name in dict(kp.injected) and s.name not in view.hist_offs)
        for s in kp.states + kp.read_states + injected:
            view.state_load[s.name], view.state_store[s.name] = _masks(s.dims, split)
        for d in kp.hoisted_loads + _scratch_stores(kp):
            axes = (None,) + tuple(f if f in spec.dims else None for f in d.feature_dims)  # [C, C] tiles: no mask
            view.hoisted_load[d.name], view.hoisted_store[d.name] = _masks(axes, split)
        _grad_stores(view, plan, kp)
        if kp.block_loop is not None:
            view.block_loop = _block_loop(plan, kp, printer)
        for s in kp.states + injected:
            # a state without the split dim has one partial adjoint per split block: each block's share of
            # the cotangents, summed over the blocks through the input gradients and dinit
            partial = split is not None and split not in s.dims
            view.partial_state[s.name] = partial
            view.dinit_offs[s.name] = _row_major("pid_s * n_bh + i_bh" if partial else "i_bh", s.dims)
            view.bseg_offs[s.name] = _row_major(
                f"(i_bh * n_segments + q_seg) * tl.cdiv({split}, BLOCK) + pid_s" if partial else "i_bh * n_segments + q_seg",
                s.dims)
            view.dhist_offs[s.name] = _row_major(
                f"((c_base + i_c) * H + i_h) * tl.cdiv({split}, BLOCK) + pid_s" if partial else "(c_base + i_c) * H + i_h",
                s.dims)
        view.prefetch = _prefetches(kp, view, spec, split)
        view.narrow = _narrow_loads(kp, printer)
        # the adjoint scan runs right to left, the walk left to right; a reverse state's the other way
        left_to_right = (kp.role == "bwd_scan") == bool(kp.reverse)
        view.prefetch_order = ("c_lo", "i_c + 1") if left_to_right else ("c_hi - 1", "i_c - 1")
        views.append(view)
    summary = (f"kernels: {', '.join(k.name for k in plan.kernels)}; split dim: {split or '-'}")
    return template(__file__, "kernels.py.j2").render(version=__version__, spec=spec, kernels=views, dims=spec.dims,
                              split=split, summary=summary, serial_roles=SERIAL_ROLES, late_loads=late_loads,
                              helpers=helper_source(op for kp in plan.kernels for op in kp.ops))
