"""Tiling: chunk length, the block of the split dim, segments of the walk, warps.

The tile sizes are symbols with constraints (sympy); `choose` substitutes a concrete call
shape, picks values by an occupancy and register model, and checks every constraint,
saying which one fails. The choices are launch-time: one generated source serves them all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import sympy

from ..errors import SpecError
from ..ir import ops as O
from ..ir.nodes import C, Spec, dim
from ..passes.legality import Legality
from ..passes.shapes import value_types

MAX_REGISTERS = 255  # per thread on NVIDIA GPUs since Kepler
# the softmax family's prefix kernel (passes.softmax_plan.prefix_lowered): 64 tokens of one head a program, 4
# warps, one stage (elementwise work on [64, D] tiles, no products); BN is a key tile it does not walk
PREFIX_TILE = (64, 16, 4, 1)
BLOCK = sympy.Symbol("BLOCK", positive=True, integer=True)  # block of the split dim
SEGMENTS = sympy.Symbol("P", positive=True, integer=True)
LATE_LOADS_MARGIN = 1.1  # _warps: what loads at their first reader take off the live-value estimate
LIVE_PER_THREAD_LIMIT = int(MAX_REGISTERS * LATE_LOADS_MARGIN)  # the most live values a config's warps may hold
PROGRAMS_PER_SM = 2  # 4-warp programs near 255 registers: two fit an SM's register file
SUMMARY_COST = 0.5  # a summary chunk step costs about half a walk chunk step (no q, no output)
FOLD_COST = 0.25  # folding one earlier segment's summary (two state-sized loads) vs a walk chunk step
# the part of a serial chunk step (walk, bwd_scan) that does not shrink with a narrower block of the split
# dim, relative to the part that does (a full block's tile work): the latency of the step's chain of
# dependent loads and dots, and the K-side work every block repeats
SERIAL_STEP_FIXED = 1.0
# Triton 3.6 miscompiles the walk at C >= 64 with a block of the split dim under 32 on Hopper
# (policy.search.compiler_fault): no config goes narrower there
NARROW_FAULT_CHUNK, NARROW_FAULT_MIN_BLOCK = 64, 32
# and mlstm's backward at C=64 with serial kernels 32 wide faulted (an illegal memory access at 2x2048, H=16,
# D=128 on the H200, 2026-12-03; 64 ran). What sets it apart from the delta rules, whose gradients at 32 wide
# matched as closely as the bf16 reference's (H100, 2026-12-07, 2x2048, with initial states) and whose training
# step ran 3-5% faster there (gated_delta_net 2x8192: the walk 0.352 -> 0.289 ms, the adjoint scan 0.437 ->
# 0.331): states without the split dim (mlstm's n: [K], m: []), whose per-block adjoints the scan lays out by its
# own blocks (runtime.launch._regroup). Plans holding such a state keep the serial kernels in the main block at
# C >= 64 (a given walk_block=32 may, and effc tune remembers a fault).


@dataclass(frozen=True)
class Problem:
    """A concrete call: batch, tokens, heads, feature dims; the GPU's multiprocessor count."""

    B: int
    T: int
    H: int
    dims: tuple[tuple[str, int], ...]
    sm_count: int = 132

    def size(self, name: str) -> int:
        return dict(self.dims)[name]


@dataclass(frozen=True)
class TileConfig:
    chunk: int
    block: int  # block of the split dim (its full size when nothing is split)
    segments: int
    num_warps: int
    num_stages: int
    defer_merge: bool = False  # merge runs in the `out` kernel, not in the walk (specs with a state)
    partition: str | None = None  # the backward's gradient kernels (passes.partition); None: the plan's default
    # block of the split dim in the serial kernels (walk, bwd_scan) and the bwd_inject feeding the scan;
    # 0: the same as `block`, where no other is allowed (the chunk-parallel kernels always take `block`)
    walk_block: int = 0
    # the chunk length of the serial walk (a multiple of `chunk`), whose states are the history the forward
    # keeps: a coarse walk updates the state only (merge skipped), then each coarse chunk is walked again in
    # chunks of `chunk`, in parallel, from the state entering it, writing the outputs (the backward re-walks
    # it for the fine history). 0: the same as `chunk`, no coarse walk
    walk_chunk: int = 0
    reasons: tuple[str, ...] = field(default=(), compare=False)

    @property
    def serial_block(self) -> int:
        """The block of the split dim the serial kernels run in."""
        return self.walk_block or self.block

    @property
    def serial_chunk(self) -> int:
        """The chunk length of the serial walk and of the history the forward keeps."""
        return self.walk_chunk or self.chunk

    def __str__(self) -> str:
        walk = f" walk_block={self.walk_block}" if self.serial_block != self.block else ""
        walk += f" walk_chunk={self.walk_chunk}" if self.serial_chunk != self.chunk else ""
        head = (f"chunk={self.chunk} block={self.block}{walk} segments={self.segments} "
                f"warps={self.num_warps} stages={self.num_stages}" + (" merge=deferred" if self.defer_merge else "")
                + (f" partition={self.partition}" if self.partition else ""))
        return head + "".join(f"\n  - {r}" for r in self.reasons)


@dataclass(frozen=True)
class TilingSpace:
    """The symbolic tiling of a spec: which dim is split, and the constraints on the symbols."""

    split_dim: str | None
    constraints: tuple[tuple[sympy.Basic, str], ...]
    live_fp32: sympy.Expr  # fp32 values a program keeps live, for the register model
    # for the shared-memory model (passes.search): elements of the input tiles one chunk step loads,
    # and of the two operand tiles of each matmul
    loaded: sympy.Expr = sympy.Integer(0)
    dot_operands: tuple[sympy.Expr, ...] = ()
    staged: str = "input tiles per chunk"  # what `loaded` is, for the shared-memory model's reasons
    knobs: str = "C = chunk, block = block of the split dim, P = segments of the walk"  # the candidates' names
    # a coarse walk's program (TileConfig.walk_chunk), which skips merge: the live values, input tiles and
    # matmul operands of the state update alone
    walk_live: sympy.Expr = sympy.Integer(0)
    walk_loaded: sympy.Expr = sympy.Integer(0)
    walk_dots: tuple[sympy.Expr, ...] = ()

    def coarse_walk(self) -> "TilingSpace":
        """The space of a coarse walk's program, for the resource model."""
        return replace(self, live_fp32=self.walk_live, loaded=self.walk_loaded, dot_operands=self.walk_dots)

    def __str__(self) -> str:
        lines = [f"tiling: chunk C, split dim {self.split_dim or '-'} in blocks of BLOCK, P segments"]
        lines += [f"  require {c}   # {why}" for c, why in self.constraints]
        lines.append(f"  live fp32 per program ~ {self.live_fp32}")
        if "walk_chunk" in self.knobs:
            lines.append("  live fp32 per coarse walk program (walk_chunk: C = its chunk, merge skipped) ~ "
                         f"{self.walk_live}")
        return "\n".join(lines)


class IsPow2(sympy.Function):
    """True for a positive integer power of two; stays symbolic until its argument is a number."""

    @classmethod
    def eval(cls, x):
        if x.is_Integer:
            v = int(x)
            return sympy.true if v > 0 and v & (v - 1) == 0 else sympy.false
        return None


_pow2 = IsPow2


def padded(n: int) -> int:
    """The tile size a feature dim of `n` is loaded in: the next power of two, at least 16 (tl.dot's
    minimum). Padded columns are masked: loads read 0 there, stores skip them."""
    return max(16, 1 << max(0, int(n) - 1).bit_length())


def stored_width(n: int, itemsize: int) -> int:
    """The width a feature row of `n` elements is laid out in for the kernels: n rounded up to 16 bytes.
    A row of 60 bf16 (120 bytes) puts every other head's rows 8 bytes off alignment, and its loads then
    move 8 bytes at a time instead of 16 (FlashAttention pads such head dims the same way)."""
    step = max(1, 16 // itemsize)
    return -(-int(n) // step) * step


class PadTo(sympy.Function):
    """padded(x) of a number; stays symbolic until its argument is one."""

    @classmethod
    def eval(cls, x):
        if x.is_Integer:
            return sympy.Integer(padded(int(x)))
        return None


def split_blocks(size: int, block: int) -> int:
    """Programs along the split dim: blocks of `block`, the last one masked where it passes `size`."""
    return -(-size // block)


def default_block(size: int) -> int:
    """The split dim's block: at most 64 columns of the state tile, the last block masked where 64 does not
    divide the dim. Measured on the H200 (8x4096, H=16, D=96, fwd+bwd): two blocks of 64, the second half
    masked, beat three exact blocks of 32 (delta_net_l2 5.7 against 8.3 ms, gla 7.0 against 8.1), as each
    program repeats the chunk's work over the other dims."""
    return min(padded(size), 64)


MAX_SOLVE_CHUNK = 256


def tiling_space(spec: Spec, legality: Legality) -> TilingSpace:
    split = legality.split_dims[0] if legality.split_dims else None
    cons: list[tuple[sympy.Basic, str]] = [
        (sympy.Ge(C, 16), "tl.dot needs tiles of at least 16"),
        (_pow2(C), "block shapes are powers of two"),
    ]
    if any(op.kind in O.SOLVES for st in spec.stages for op in st.ops):
        cons.append((sympy.Le(C, MAX_SOLVE_CHUNK), "the in-chunk solve (unit_lower_inv) merges blocks of up to "
                     f"{MAX_SOLVE_CHUNK // 2} rows (codegen/triton/solve.py.j2)"))
    # feature dims take any size: their tiles are padded to PadTo(d) columns (a power of two >= 16), masked past d
    if split:
        s = dim(split)
        cons += [(sympy.Ge(BLOCK, 16), "BLOCK is a matmul dim"), (_pow2(BLOCK), "BLOCK is a power of two"),
                 (sympy.Le(BLOCK, PadTo(s)), f"BLOCK is at most {split} padded to a power of two")]
    sub = {dim(split): BLOCK} if split else {}

    def elements(shape) -> sympy.Expr:
        return sympy.Mul(*(x.subs(sub) for x in shape))

    loaded = sum((elements(i.tile.shape) for i in spec.inputs), sympy.Integer(0))
    states = sum((elements(st.tile.shape) for st in spec.states), sympy.Integer(0))
    live = states + loaded + C * C
    types = value_types(spec)

    def dot_operands(ops) -> tuple[sympy.Expr, ...]:
        """Elements of each matmul's two operand tiles (a decay contraction, passes.decay_dot, is one)."""
        return tuple(sum((elements(types[a].shape) for a in op.args[:2]), sympy.Integer(0))
                     for op in ops if op.kind == "matmul" or op.kind in O.DECAY)

    dots = dot_operands(op for st in spec.stages for op in st.ops)
    update = _state_update(spec)
    walk_loaded = sum((elements(i.tile.shape) for i in spec.inputs if i.name in update), sympy.Integer(0))
    pairs = any(tuple(types[n].shape) == (C, C) for n in update if n in types)
    walk_live = states + walk_loaded + (C * C if pairs else 0)
    walk_dots = dot_operands(op for st in (spec.intra, spec.inter) for op in st.ops if op.out in update)
    knobs = (f"C = chunk, block = block of {split} (BLOCK), P = segments of the walk" if split
             else "C = chunk, block = 1 (no dim is split), P = segments of the walk")
    if split and not legality.segmentable:
        knobs += f", walk_block = block of {split} in the walk and the adjoint scan"
    if spec.states and not spec.reverse_states:
        knobs += ", walk_chunk = chunk of a coarse walk"
    return TilingSpace(split, tuple(cons), sympy.expand(live), sympy.expand(loaded), dots, knobs=knobs,
                       walk_live=sympy.expand(walk_live), walk_loaded=sympy.expand(walk_loaded),
                       walk_dots=walk_dots or (sympy.Integer(0),))


def _state_update(spec: Spec) -> set[str]:
    """The values and inputs the state update reads (inter, what it reads of intra): what a coarse walk's
    program computes. A [C, C] tile among them (the delta rules' in-chunk inverse; not mLSTM's) is live there."""
    made = {op.out: op for st in (spec.intra, spec.inter) for op in st.ops}
    todo, seen = [op.out for op in spec.inter.ops], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [a for a in made[name].args if isinstance(a, str)] if name in made else []
    return seen


def _segments(legality: Legality, programs: int, n_chunks: int, slots: int,
              spec_reverse: bool = False) -> tuple[int, str]:
    """Cut the walk into P segments to fill the GPU. A wave of `slots` programs runs at once;
    time ~ waves(walk) * (chunks per segment + FOLD_COST * (P - 1))
           + SUMMARY_COST * waves(summary) * chunks per segment."""
    if not legality.segmentable:
        return 1, ("one walk per direction over all chunks: reverse states are not segmented"
                   if spec_reverse else "one fused walk over all chunks: a general transition cannot be segmented")

    def cost(p: int) -> float:
        per = math.ceil(n_chunks / p)
        summary = SUMMARY_COST * math.ceil(programs * (p - 1) / slots) * per if p > 1 else 0.0
        return math.ceil(programs * p / slots) * (per + FOLD_COST * (p - 1)) + summary

    best = min(range(1, min(n_chunks, 64) + 1), key=lambda p: (cost(p), p))
    if best == 1:
        return 1, f"one fused walk over all chunks: {programs} programs for {slots} slots; the state never leaves the chip"
    per = math.ceil(n_chunks / best)
    return best, (f"{programs} programs for {slots} slots: {best} segments of {per} chunks run in parallel, "
                  f"stitched through per-segment summaries (wave model cost {cost(best):.0f} vs {cost(1):.0f} unsegmented)")


def _warps(live: int) -> tuple[int, str]:
    """4 warps while a program's live fp32 values fit 4 warps' registers (fewer threads, less shuffling: the
    H100 at D=128 ran 4 faster than 8), 8 when they do not: past 255 a thread spills, and at padded head
    dims (D=192 in 256-wide tiles) 8 warps beat 4 (gla 2.89 vs 4.10 ms forward at 2x4096 on the H200).
    The estimate counts every input tile live at once, which a kernel that spills does not keep (it runs with
    its loads at their first reader, runtime.launch.spill_free), so up to LATE_LOADS_MARGIN past the register
    file 4 warps still run: two 4-warp programs share an SM where one 8-warp program above 128 registers runs
    alone (H100, 2x8192, D=128, chunk 64, estimate ~256: gated_delta_net's forward 0.81 ms at 4 warps against
    1.09 at 8, delta_net's 0.66 against 0.95)."""
    per_thread = live // 128
    if per_thread <= MAX_REGISTERS:
        return 4, f"4 warps, ~{per_thread} live fp32 values per thread (at most {MAX_REGISTERS} fit)"
    if per_thread <= LIVE_PER_THREAD_LIMIT:
        return 4, (f"4 warps, ~{per_thread} live fp32 values per thread: past {MAX_REGISTERS}, where a kernel "
                   "that spills takes its loads at their first reader")
    return 8, f"8 warps: ~{per_thread} live fp32 values per thread at 4 would spill, ~{live // 256} at 8"


def walk_block_floor(spec: Spec, split: str, chunk: int, block: int) -> int:
    """The narrowest block (at most `block`) the model gives the serial kernels at chunk `chunk`: 16 (tl.dot's
    minimum), at C >= NARROW_FAULT_CHUNK 32 (Triton's miscompile of narrower ones), and there `block` itself for
    a plan holding a state without the split dim (mlstm's fault at 32, see above)."""
    if chunk < NARROW_FAULT_CHUNK:
        return 16
    if any(split not in s.dims for s in spec.states):
        return block
    return min(block, NARROW_FAULT_MIN_BLOCK)


def _walk_block(split_size: int, block: int, rows: int, slots: int, floor: int) -> tuple[int, str]:
    """The block of the split dim for the serial kernels of an unsegmented walk: one program per
    (block, batch*head) walks every chunk in order, so when those programs leave slots idle the walk is
    latency bound, and a narrower block gives more programs, each doing less per step. The chunk-parallel
    kernels keep `block` (a narrower one repeats their K-side work per block). A wave of `slots` programs
    runs at once; time ~ waves(programs) * (SERIAL_STEP_FIXED + block width / `block`): halve the block
    while that falls (while the programs still fit the waves they took), no narrower than `floor`."""
    def cost(b: int) -> float:
        return math.ceil(split_blocks(split_size, b) * rows / slots) * (SERIAL_STEP_FIXED + b / block)

    best = block
    while best // 2 >= floor and cost(best // 2) < cost(best):
        best //= 2
    programs = split_blocks(split_size, block) * rows
    if best == block:
        if programs >= slots:
            why = f"{programs} walk programs fill {slots} slots"
        elif block // 2 < floor:
            held = floor > NARROW_FAULT_MIN_BLOCK  # walk_block_floor: a state without the split dim
            why = (f"{programs} walk programs for {slots} slots, but no block narrower than {floor} runs right"
                   + (" for a plan with a state without the split dim (one faulted at 32 on sm_90)" if held else ""))
        else:
            why = f"{programs} walk programs for {slots} slots; a narrower block would need more waves"
        return block, f"walk and adjoint scan in blocks of {block} too: {why}"
    return best, (f"walk and adjoint scan in blocks of {best}: {programs} programs at block {block} for {slots} "
                  f"slots, {split_blocks(split_size, best) * rows} at {best} (wave model cost {cost(best):.2f} vs "
                  f"{cost(block):.2f}); the chunk-parallel kernels keep block {block}")


def _fixed_walk_block(spec: Spec, legality: Legality, split: str | None) -> str | None:
    """Why the serial kernels must run in the main block, or None when they may take their own."""
    if not split:
        return "nothing to split"
    if legality.segmentable:
        # the segments' summaries and folds are launched in the main block (and fill the GPU already)
        return "a segmentable walk: its segments fill the GPU"
    return None


def _check(space: TilingSpace, values: dict) -> None:
    for c, why in space.constraints:
        ok = c.subs(values)
        if ok is not sympy.true:
            raise SpecError(f"tiling constraint {c} fails for {', '.join(f'{k}={v}' for k, v in values.items())}: {why}")


def choose(spec: Spec, legality: Legality, problem: Problem, *, chunk: int | None = None,
           block: int | None = None, segments: int | None = None, num_warps: int | None = None,
           num_stages: int | None = None, defer_merge: bool | None = None, partition: str | None = None,
           walk_block: int | None = None, walk_chunk: int | None = None) -> TileConfig:
    """Pick a configuration for `problem`; explicit arguments override the model."""
    space = tiling_space(spec, legality)
    reasons = []
    c = chunk or spec.chunk
    n_chunks = max(1, math.ceil(problem.T / c))
    split_size = problem.size(space.split_dim) if space.split_dim else 1
    if block is None:
        block = default_block(split_size) if space.split_dim else 1
        reasons.append(f"block {block} of {space.split_dim}: keeps the state tile at most 64 columns wide"
                       if space.split_dim else "nothing to split")
    n_split = split_blocks(split_size, block)
    programs = n_split * problem.B * problem.H
    if segments is None:
        segments, why = _segments(legality, programs, n_chunks, problem.sm_count * PROGRAMS_PER_SM,
                                  bool(spec.reverse_states))
        reasons.append(why)
    segments = max(1, min(segments, n_chunks))
    if segments > 1 and not legality.segmentable:
        raise SpecError(f"spec '{spec.name}' cannot run in {segments} segments: "
                        + "; ".join([t.why for t in legality.transitions if not t.diagonal_affine]
                                    + [f"reverse state {s.name}: segmented right-to-left walks are not implemented"
                                       for s in spec.reverse_states]))
    values = {C: c, **{dim(d): problem.size(d) for d in spec.dims}}
    if space.split_dim:
        values[BLOCK] = block
    _check(space, values)
    walk_chunk = _check_walk_chunk(spec, c, walk_chunk, defer_merge)
    # the serial kernels run at the coarse walk's chunk, where Triton's narrow-block faults are the coarse chunk's
    walk_block, why = _choose_walk_block(spec, legality, space, values, problem, block, walk_block, walk_chunk or c)
    if why:
        reasons.append(why)
    values.update({dim(d): padded(problem.size(d)) for d in spec.dims})  # the register model counts padded tiles
    if num_warps is None:
        num_warps, why = _warps(int(space.live_fp32.subs(values)))
        reasons.append(why)
    if defer_merge and not spec.states:
        raise SpecError(f"spec '{spec.name}': deferred merge needs a state (the out kernel reads each chunk's)")
    if spec.reverse_states:  # merge reads the states of both walks: only the out kernel has them all
        if defer_merge is False:
            raise SpecError(f"spec '{spec.name}': merge cannot be fused into a walk with reverse state(s) "
                            f"{', '.join(s.name for s in spec.reverse_states)} (it reads both directions' states)",
                            None, "defer_merge=None or True")
        defer_merge = True
        reasons.append("merge deferred to the out kernel: it reads the forward and the reverse walks' states")
    if walk_chunk:
        defer_merge = False
        reasons.append(f"a coarse walk in chunks of {walk_chunk} (given or tuned): the state only, then every coarse "
                       f"chunk walked again in chunks of {c}, in parallel, writing the outputs")
    if defer_merge is None and spec.states and not legality.segmentable:
        defer_merge, why = _defer(programs, n_chunks, problem.sm_count * PROGRAMS_PER_SM)
        reasons.append(why)
    # a segmentable walk keeps merge fused unless asked (or tuned): segments fill the GPU without writing states
    return TileConfig(c, block, segments, num_warps, num_stages or 1, bool(defer_merge), partition, walk_block,
                      walk_chunk, tuple(reasons))


def _check_walk_chunk(spec: Spec, chunk: int, walk_chunk: int | None, defer_merge: bool | None) -> int:
    """TileConfig.walk_chunk for a call that asks for one (0: none). The model does not pick a coarse walk: it
    has not been timed on a GPU yet (`effc tune` times it)."""
    if not walk_chunk or walk_chunk == chunk:
        return 0
    if not spec.states or spec.reverse_states:
        why = ("has no state" if not spec.states else
               f"has reverse state(s) {', '.join(s.name for s in spec.reverse_states)}, walked right to left")
        raise SpecError(f"spec '{spec.name}' {why}: walk_chunk= (a coarse walk refined in chunks of {chunk}) needs "
                        "forward states", None, "walk_chunk=None")
    if walk_chunk < chunk:
        raise SpecError(f"walk_chunk={walk_chunk} is shorter than chunk={chunk}: the coarse walk's chunks hold whole "
                        "chunks", None, f"walk_chunk >= {chunk}")
    if defer_merge:
        raise SpecError(f"walk_chunk={walk_chunk} with defer_merge=True: the fine walk of each coarse chunk writes "
                        "the outputs (merge fused); there is no out kernel to defer to", None, "defer_merge=None")
    return walk_chunk


def _choose_walk_block(spec: Spec, legality: Legality, space: TilingSpace, values: dict, problem: Problem,
                       block: int, walk_block: int | None, chunk: int) -> tuple[int, str]:
    """The serial kernels' block (TileConfig.walk_block): the model's, or `walk_block` checked; 0 where they
    must take the main block (no knob: what `effc tune` records and the op passes leaves it out)."""
    fixed = _fixed_walk_block(spec, legality, space.split_dim)
    if walk_block is None:
        if fixed:  # nothing chosen: the walk runs in the block, as it always has (no reason printed)
            return 0, ""
        return _walk_block(problem.size(space.split_dim), block, problem.B * problem.H,
                           problem.sm_count * PROGRAMS_PER_SM, walk_block_floor(spec, space.split_dim, chunk, block))
    if walk_block == block:
        return (0 if fixed else block), ""
    if fixed:
        raise SpecError(f"spec '{spec.name}': walk_block={walk_block} differs from block={block}, but the serial "
                        f"kernels must run in the main block here ({fixed})", None, f"walk_block=None or {block}")
    if walk_block > block:
        raise SpecError(f"walk_block={walk_block} is wider than block={block}: the serial kernels' block must not "
                        "be wider than the chunk-parallel kernels'", None, f"walk_block <= {block}")
    _check(space, {**values, BLOCK: walk_block})
    return walk_block, f"walk and adjoint scan in blocks of {walk_block} (given)"


def _defer(programs: int, n_chunks: int, slots: int) -> tuple[bool, str]:
    """A general transition's walk is one program per (block, batch*head). When those leave the GPU
    idle, the serial chain is the time: merge moves to the chunk-parallel `out` kernel, at the cost of
    writing and reading each chunk's state. A full GPU pays for that traffic, so merge stays fused."""
    if n_chunks > 1 and programs < slots:
        return True, (f"merge deferred to the out kernel: {programs} walk programs for {slots} slots, so the "
                      "walk keeps only the state update and merge runs for all chunks in parallel")
    return False, (f"merge fused in the walk: {programs} programs for {slots} slots" if n_chunks > 1
                   else "merge fused in the walk: one chunk")


HISTORY_FACTOR = 2.0


def history_policy(history_bytes: int, input_bytes: int, prep_bytes: int = 0) -> tuple[int, str]:
    """What the forward keeps for the backward, within HISTORY_FACTOR x the inputs: 0 nothing, 1 the per-chunk
    states, 2 the states and prep's values (passes.hoist). Keeping the states saves the backward one more
    forward walk, a serial pass, so they come first; prep's values save it prep's run (gated_delta_net at
    2x8192: 0.24 ms of a 3.15 ms step on the H100, fla keeping its in-chunk inverse likewise) for their
    memory (0.8x the inputs there)."""
    ratio = lambda b: b / max(1, input_bytes)
    why = f"per-chunk states are {ratio(history_bytes):.1f}x the inputs: "
    if history_bytes > HISTORY_FACTOR * input_bytes:
        return 0, why + f"recomputed in the backward (> {HISTORY_FACTOR:g}x)"
    if prep_bytes and history_bytes + prep_bytes <= HISTORY_FACTOR * input_bytes:
        return 2, why + f"kept from the forward, with prep's values ({ratio(prep_bytes):.1f}x)"
    why += "kept from the forward"
    return 1, why + (f"; prep's values ({ratio(prep_bytes):.1f}x more) recomputed" if prep_bytes else "")
