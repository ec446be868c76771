"""The search space of tile configurations for one call shape, pruned before anything is compiled.

Knobs: chunk C, the block of the split dim, segments P, warps and pipeline stages, for specs with a
state whether merge is deferred to the chunk-parallel `out` kernel (`defer_merge`), and for a general
transition (an unsegmented walk) the block of the split dim in its serial kernels (`walk_block`, the walk
and the adjoint scan: at most the block, narrower for more programs at long T). A candidate
must satisfy the tiling constraints proved on the symbolic shapes (`TilingSpace`), and fit a
resource model evaluated on those symbolic tile sizes:

- shared memory per program ~ num_stages x (bytes of the input tiles one chunk step loads)
  + (bytes of the largest matmul's two operand tiles), in the input dtype, against the device's
  per-block limit (H100: 232448 B). The stage term is an upper bound: Triton keeps one buffer per
  stage for each load its pipeliner stages (Triton 3.6 stages none of the walk's masked loads: AOT
  for sm_90, gla's walk takes 32 KB at 1 and 3 stages alike). Only the largest matmul counts
  because the allocator reuses the buffers of operands that are not live together (gla at C=64,
  BLOCK=64 measures exactly its largest matmul's 32768 B).
- registers per thread ~ live fp32 values of a program (`TilingSpace.live_fp32`) / (32 x warps),
  against 255 (a chunked scan's with tiling.LATE_LOADS_MARGIN: a kernel that spills runs with its
  loads late). Past that ptxas spills: AOT for sm_90, every gla config over it spilled (C=64 at 4
  warps: 1184 B of spill stores); those under it spilled at most 248 B.

The softmax family (passes.softmax) has the same knobs on its forward kernel: C is the query block BM,
block the key block BN, P always 1 (one walk per query block); a stage holds one key block's
key-side tiles (K, V), and the live values are the query tile, the accumulators and the score tile
(`softmax_tiling_space`). Its backward kernels keep the model's tiles whatever the forward's.

`model_default` (the model's best guess: `choose`, `choose_softmax_tiles`) is always a candidate,
first, even where the resource model would prune it: it is what every other candidate is checked and
timed against, and its kernels run (retention and simple_gla's defaults, C=64 with 4 warps, are a
value or two per thread over 255, and are what the H100 sweeps picked), so its other segment counts,
which run the same kernels, stay too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..errors import SpecError
from ..ir.nodes import CK, C, Spec, dim
from ..passes.legality import Legality
from ..passes.softmax import SoftmaxSchedule, choose_softmax_tiles, softmax_tiling_space, visible_blocks
from .tiling import (
    BLOCK,
    LIVE_PER_THREAD_LIMIT,
    MAX_REGISTERS,
    PROGRAMS_PER_SM,
    Problem,
    TileConfig,
    TilingSpace,
    _check,
    _fixed_walk_block,
    NARROW_FAULT_CHUNK,
    NARROW_FAULT_MIN_BLOCK,
    _segments,
    _walk_block,
    choose,
    padded,
    split_blocks,
    tiling_space,
    walk_block_floor,
)

H100_SHARED_BYTES = 232448  # per block, opt-in maximum (also the H200's: same SM)
CHUNKS = (16, 32, 64, 128)
WARPS = (4, 8)  # 4 warps make one warpgroup, which Hopper's wgmma needs; fewer fall back to mma
STAGES = (1, 2, 3)
SOFTMAX_STAGES = (2, 3, 4)  # the forward's key/value loads want pipelining (the model picks 2 or 3)
MAX_SEGMENTS = 64  # as in the wave model of `choose`
MAX_WALK_CHUNK = 256  # the coarse walks tried: TFLA's chunks go to 256


def compiler_fault(chunk: int, block: int) -> str | None:
    """Configs that Triton 3.6 miscompiles on Hopper, whatever the resource model says: the chunked scan's
    walk at C >= 64 with a 16-wide block of the split dim (`block`: the walk's, Candidate.walk_block; gla
    2x8192 on the H100: wrong outputs at 1 stage, an illegal memory access at 2, which loses the process's
    CUDA context; triton-lang/triton#11366
    reports the same class of wgmma fault for narrow blocks beside several dots). Faults that depend on
    the spec (delta_net_l2 faults at C=64, block 32; gla runs it) are found by `effc tune` and remembered
    per spec and GPU (`runtime.tuning.record_fault`)."""
    floor = NARROW_FAULT_MIN_BLOCK if chunk >= NARROW_FAULT_CHUNK else 16
    if block < floor:
        return (f"Triton 3.6 miscompiles C={chunk} with block {block} < {floor} on Hopper (wrong "
                "output or a fault)")
    return None


@dataclass(frozen=True, order=True)
class Candidate:
    chunk: int
    block: int
    segments: int
    num_warps: int
    num_stages: int
    defer_merge: bool = False
    # the serial kernels' block (TileConfig.walk_block); 0: no such knob (segmentable walks, softmax)
    walk_block: int = 0
    walk_chunk: int = 0  # a coarse walk's chunk (TileConfig.walk_chunk); 0: none

    @classmethod
    def of(cls, cfg: TileConfig) -> "Candidate":
        return cls(cfg.chunk, cfg.block, cfg.segments, cfg.num_warps, cfg.num_stages, cfg.defer_merge,
                   getattr(cfg, "walk_block", 0), getattr(cfg, "walk_chunk", 0))

    def overrides(self) -> dict[str, int]:
        """Keyword arguments of the op (and of `choose`) that pin this configuration."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("walk_block", "walk_chunk") or getattr(self, f.name)}

    @property
    def variant(self) -> tuple[int, ...]:
        """What a compiled kernel depends on; P is a launch argument (up to Triton's specialisation)."""
        return (self.chunk, self.block, self.num_warps, self.num_stages, int(self.defer_merge), self.walk_block,
                self.walk_chunk)

    def __str__(self) -> str:
        walk = f" walk_block={self.walk_block}" if self.walk_block and self.walk_block != self.block else ""
        walk += f" walk_chunk={self.walk_chunk}" if self.walk_chunk else ""
        return (f"C={self.chunk} block={self.block}{walk} P={self.segments} "
                f"warps={self.num_warps} stages={self.num_stages}" + (" merge=deferred" if self.defer_merge else ""))


@dataclass(frozen=True)
class Resources:
    shared: int  # bytes per program
    staged: int  # bytes of input tiles loaded per chunk step (one stage)
    dots: int  # bytes of the largest matmul's operand tiles
    live: int  # fp32 values a program keeps live
    registers: int  # per thread
    what: str = "input tiles per chunk"  # what one stage holds (TilingSpace.staged)

    def over(self, num_warps: int, num_stages: int, smem_limit: int, max_registers: int = MAX_REGISTERS) -> list[str]:
        """Why the configuration does not fit, one reason per exceeded limit."""
        why = []
        if self.shared > smem_limit:
            why.append(f"shared memory {self.shared} B > {smem_limit} B per block ({num_stages} stages x "
                       f"{self.staged} B of {self.what} + {self.dots} B of the largest matmul's operands)")
        if self.registers > max_registers:
            why.append(f"registers: ~{self.registers} live fp32 values per thread > {max_registers} "
                       f"({self.live} per program / (32 x {num_warps} warps))")
        return why


def resources(space: TilingSpace, values: dict, num_warps: int, num_stages: int, dtype_bytes: int) -> Resources:
    staged = int(space.loaded.subs(values)) * dtype_bytes
    dots = max((int(d.subs(values)) for d in space.dot_operands), default=0) * dtype_bytes
    live = int(space.live_fp32.subs(values))
    return Resources(num_stages * staged + dots, staged, dots, live, math.ceil(live / (32 * num_warps)), space.staged)


@dataclass(frozen=True)
class Pruned:
    candidate: Candidate
    reason: str


@dataclass(frozen=True)
class SearchSpace:
    problem: Problem
    default: Candidate
    candidates: tuple[Candidate, ...]  # the default first, then by how many knobs differ from it
    pruned: tuple[Pruned, ...]
    default_over_model: str = ""  # what the resource model says of the default (kept regardless)
    knobs: str = ""  # what the candidates' C, block and P are (TilingSpace.knobs)

    def reason(self, cand: Candidate) -> str | None:
        """Why `cand` was pruned, or None when it is a candidate (or was never generated)."""
        return next((p.reason for p in self.pruned if p.candidate == cand), None)

    def groups(self) -> list[list[Candidate]]:
        """Candidates sharing compiled kernels (they differ in P only), in candidate order; each group's
        first candidate has the wave model's P for its chunk and block."""
        out: dict[tuple, list[Candidate]] = {}
        for c in self.candidates:
            out.setdefault(c.variant, []).append(c)
        return list(out.values())

    def __str__(self) -> str:
        p = self.problem
        lines = [f"search space for B={p.B} T={p.T} H={p.H} {dict(p.dims)}: {len(self.candidates)} candidates "
                 f"in {len(self.groups())} compiled variants, {len(self.pruned)} pruned"]
        if self.knobs:
            lines.append(f"  knobs: {self.knobs}")
        lines.append(f"  model default: {self.default}"
                     + (f" (kept with its other P, though over the resource model: {self.default_over_model})"
                        if self.default_over_model else ""))
        lines += [f"  candidate {c}" for c in self.candidates]
        lines += [f"  pruned {x.candidate}: {x.reason}" for x in self.pruned]
        return "\n".join(lines)


def _pow2_upto(lo: int, hi: int) -> list[int]:
    return [1 << i for i in range(lo.bit_length() - 1, hi.bit_length()) if lo <= 1 << i <= hi]


def model_default(spec: Spec, legality, problem: Problem) -> Candidate:
    """The model's choice for `problem` as a candidate: what `effc tune` times every other against (and
    what an op runs when no tuning entry is recorded), for either family."""
    if isinstance(legality, SoftmaxSchedule):
        return Candidate.of(choose_softmax_tiles(spec, dict(problem.dims), interpreting=False,
                                                 visible=visible_blocks(legality, problem.T, {})))
    if not isinstance(legality, Legality):
        what = ("has branches (passes.branches): each branch's walk is tuned as its own spec, FILE:<spec>__<branch>, "
                "as `effc tune SPEC` does" if getattr(legality, "family", None) == "branched" else
                "is a hybrid (a state and a score stage): `effc tune` covers the chunked-scan and the softmax "
                "family, not a hybrid's two branches yet")
        raise NotImplementedError(f"spec '{spec.name}' {what}")
    return Candidate.of(choose(spec, legality, problem))


@dataclass(frozen=True)
class _Tile:
    """One (chunk, block) of the grid: the symbol values, the segment counts worth trying, the wave model's."""

    chunk: int
    block: int
    values: dict
    segments: tuple[int, ...]
    wave: int
    defers: tuple[bool, ...] = (False,)  # merge fused, and deferred too where the plan has an out kernel
    walk_blocks: tuple[int, ...] = (0,)  # the serial kernels' blocks worth trying (0: no such knob)
    walk_chunks: tuple[int, ...] = ()  # coarse walks worth trying (TileConfig.walk_chunk), beside none


def _scan_grid(spec: Spec, legality: Legality, problem: Problem, default: Candidate, chunks,
               merge_modes: tuple[bool, ...]) -> list[_Tile]:
    """Chunk C x block of the split dim, with segment counts around the wave model's."""
    space = tiling_space(spec, legality)
    split = space.split_dim
    split_size = problem.size(split) if split else 1
    blocks = _pow2_upto(16, padded(split_size)) if split else [1]
    t_pow2 = 1 << max(0, problem.T - 1).bit_length()
    chunk_set = sorted({c for c in chunks if c <= max(t_pow2, 16)} | {default.chunk})
    slots = problem.sm_count * PROGRAMS_PER_SM
    defers = merge_modes if spec.states else (False,)  # passes.fusion's `out` kernel
    if spec.reverse_states:  # merge reads both walks' states: only deferred (policy.tiling)
        defers = (True,)
    out = []
    for c in chunk_set:
        for b in blocks:
            values = {C: c, **{dim(d): padded(problem.size(d)) for d in spec.dims}}
            if split:
                values[BLOCK] = b
            n_chunks = max(1, math.ceil(problem.T / c))
            programs = split_blocks(split_size, b) * problem.B * problem.H
            best, _ = _segments(legality, programs, n_chunks, slots)
            ps = {1}
            if legality.segmentable:
                ps |= {p for p in (best // 2, best, best * 2) if 1 <= p <= min(n_chunks, MAX_SEGMENTS)}
            if (c, b) == (default.chunk, default.block):
                ps.add(default.segments)
            out.append(_Tile(c, b, values, tuple(sorted(ps)), best, defers,
                             _walk_blocks(spec, legality, split, split_size, c, b, problem, default),
                             _walk_chunks(spec, c, t_pow2) if True in merge_modes else ()))
    return out


def _walk_chunks(spec: Spec, chunk: int, t_pow2: int) -> tuple[int, ...]:
    """Coarse walks for one chunk (TileConfig.walk_chunk): 2 and 4 times it, up to MAX_WALK_CHUNK and the call's
    length; none for a spec without forward states only."""
    if not spec.states or spec.reverse_states:
        return ()
    return tuple(w for w in (2 * chunk, 4 * chunk) if w <= min(MAX_WALK_CHUNK, t_pow2))


def _walk_blocks(spec: Spec, legality: Legality, split: str | None, split_size: int, chunk: int, block: int,
                 problem: Problem, default: Candidate) -> tuple[int, ...]:
    """The serial kernels' blocks for one (chunk, block): 0 (the block itself) where they must take it
    (policy.tiling._fixed_walk_block), else every power of two from 16 up to it, the model's first."""
    if _fixed_walk_block(spec, legality, split):
        return (0,)
    model, _ = _walk_block(split_size, block, problem.B * problem.H, problem.sm_count * PROGRAMS_PER_SM,
                           walk_block_floor(spec, split, chunk, block))
    extra = {default.walk_block} if (chunk, block) == (default.chunk, default.block) else set()
    return (model,) + tuple(sorted((set(_pow2_upto(16, block)) | extra) - {model}, reverse=True))


def _softmax_grid(spec: Spec, problem: Problem, default: Candidate, blocks) -> list[_Tile]:
    """Query block BM x key block BN of the forward kernel (one segment: a walk per query block); blocks
    past T (rounded up to a power of two) only pad."""
    t_pow2 = max(1 << max(0, problem.T - 1).bit_length(), 16)
    sizes = sorted({b for b in blocks if b <= t_pow2})
    dims = {dim(d): padded(problem.size(d)) for d in spec.dims}
    return [_Tile(bm, bn, {C: bm, CK: bn, **dims}, (1,), 1)
            for bm in sorted(set(sizes) | {default.chunk}) for bn in sorted(set(sizes) | {default.block})]


def search_space(spec: Spec, legality, problem: Problem, *, dtype_bytes: int = 2,
                 smem_limit: int = H100_SHARED_BYTES, max_registers: int | None = None,
                 chunks=CHUNKS, warps=WARPS, stages=None, faulty: dict | None = None,
                 merge_modes: tuple[bool, ...] = (False, True)) -> SearchSpace:
    """All configurations worth compiling for `problem`, and the pruned ones with the reason. `legality` is
    a chunked scan's (passes.legality) or a softmax spec's schedule (passes.softmax); `chunks` are the
    chunk lengths, or the query and key blocks; `stages` default to STAGES, SOFTMAX_STAGES. `faulty` maps
    compiled variants (chunk, block, warps, stages, defer_merge) that faulted on this GPU before to the GPU's error.
    `merge_modes`: defer_merge values to try for a spec with states ((False,) for a backend without `out`, whose
    walk cannot skip merge: no coarse walks then either)."""
    faulty = faulty or {}
    if dtype_bytes not in (2, 4):
        raise ValueError(f"dtype_bytes must be 2 (bfloat16, float16) or 4 (float32), got {dtype_bytes}")
    if smem_limit <= 0:
        raise ValueError(f"smem_limit must be a positive number of bytes, got {smem_limit}")
    default = model_default(spec, legality, problem)
    if isinstance(legality, SoftmaxSchedule):
        space, grid = softmax_tiling_space(legality), _softmax_grid(spec, problem, default, chunks)
        stages = stages or SOFTMAX_STAGES
        max_registers = max_registers or MAX_REGISTERS
    else:
        space, grid = tiling_space(spec, legality), _scan_grid(spec, legality, problem, default, chunks,
                                                                     merge_modes)
        stages = stages or STAGES
        # a chunked scan's kernel that spills runs with its loads late (tiling.LATE_LOADS_MARGIN)
        max_registers = max_registers or LIVE_PER_THREAD_LIMIT
    keep: list[Candidate] = []
    pruned: list[Pruned] = []
    over_model = ""
    wave = {(t.chunk, t.block): t.wave for t in grid}
    for t in grid:
        try:
            _check(space, t.values)
            bad = None
        except SpecError as e:
            bad = str(e).removeprefix("error: ")
        for w in warps:
            for s in stages:
                model = [bad] if bad else resources(space, t.values, w, s, dtype_bytes).over(w, s, smem_limit,
                                                                                              max_registers)
                # a coarse walk fuses merge into its fine walk, in the first serial block Triton runs right there
                coarse = [(False, next((wb for wb in t.walk_blocks if not compiler_fault(wc, min(t.block, wb or t.block))),
                                       t.walk_blocks[0]), wc) for wc in t.walk_chunks]
                for d, wb, wc in [(d, wb, 0) for d in t.defers for wb in t.walk_blocks] + coarse:
                    # the walk runs the narrower of its block and the main one (the fault is the walk's)
                    fault = (None if isinstance(legality, SoftmaxSchedule)
                             else compiler_fault(max(t.chunk, wc), min(t.block, wb or t.block)))
                    why = model + [fault] if fault else model
                    if wc and not bad:  # the coarse walk's own tiles: the state update at C = wc
                        why = why + [f"coarse walk at C={wc}: {r}" for r in resources(
                            space.coarse_walk(), {**t.values, C: wc}, w, s, dtype_bytes).over(w, s, smem_limit,
                                                                                          max_registers)]
                    variant = (t.chunk, t.block, w, s, int(d), wb, wc)
                    fails = why + ([f"faulted on this GPU in an earlier tune ({faulty[variant]})"]
                                   if variant in faulty else [])
                    if fails and variant == default.variant:
                        over_model = "; ".join(fails)
                        fails = []  # the default's kernels run whatever the model says; so do its other P
                    for p in t.segments:
                        cand = Candidate(t.chunk, t.block, p, w, s, d, wb, wc)
                        if cand == default:
                            continue
                        if fails:
                            pruned.append(Pruned(cand, "; ".join(fails)))
                        else:
                            keep.append(cand)

    def distance(x: Candidate) -> tuple:
        # a compiled variant's first candidate takes the wave model's P: it stands for its variant
        knobs = sum(getattr(x, k) != getattr(default, k)
                    for k in ("chunk", "block", "num_warps", "num_stages", "defer_merge", "walk_block", "walk_chunk"))
        far = (abs(math.log2(x.chunk / default.chunk)) + abs(math.log2(x.block / default.block))
               + abs(math.log2(max(1, x.walk_block) / max(1, default.walk_block)))
               + abs(math.log2(max(x.chunk, x.walk_chunk) / max(default.chunk, default.walk_chunk))))
        return knobs, x.segments != wave[x.chunk, x.block], far, x

    return SearchSpace(problem, default, (default, *sorted(keep, key=distance)), tuple(pruned), over_model,
                       space.knobs)
