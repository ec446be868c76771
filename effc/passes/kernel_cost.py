"""A time model of one chunk-parallel kernel from its IR: the partition pass (passes.partition) compares
schedules of the backward's gradient kernels with it.

A gradient kernel is one program per chunk (and per split block, unless it loops over the blocks), 8 warps,
one program an SM once its threads hold 255 registers (they all do: scripts/ptxas_report.py). At these tile
sizes (C = 32..64, d = 64..128) a program is latency bound, and its time grows with
- the matmul FLOPs it issues (small wgmmas with their operands converted to the dot layout),
- its elementwise ops (each a pass over a tile, its layout shuffles included),
- the fp32 values it keeps live past what fits beside the dot operands (spills and reloads),
while the bytes it moves hardly count (one SM's share of the bandwidth covers them). The three weights
are a least-squares fit to 14 gradient kernels profiled on the H200 (delta_net_l2, gated_delta_net_l2,
mlstm_sig at 2x8192, H=16, D=128; docs/benchmarks.md): relative error 20% (RMS). Not explained: a loop
kernel that Triton spills far beyond its live-value estimate (gated_delta_net_l2's `bwd_sums`, 3.8 KB a
thread, 4.7x the model); `effc tune` times the partitions where the model is wrong, and estimates
closer than the fit's error (RELATIVE_ERROR) do not rank partitions (passes.partition._default).

`Cost` keeps the features so the plan can say why one schedule won (`effc show SPEC --stage plan`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import sympy

from ..ir.nodes import C, Op, TileType, dim

SMS = 132  # H100 / H200 SXM
REGISTERS_PER_SM = 65536
THREADS = 256  # the gradient kernels run 8 warps (policy.triton_faults.backward_warps)
MAX_REGISTERS = 255
REGISTER_OVERHEAD = 40  # indices, masks and pointers beside the tiles' values
BYTES_PER_US_PER_SM = 4.8e6 / SMS  # HBM3e (H200)
# fitted per program (us), see the module docstring
US_PER_MFLOP = 0.84
# the fit's relative error (RMS) over the kernels it was fitted to: estimates closer than this do not rank
RELATIVE_ERROR = 0.20
US_PER_ELEMENTWISE_OP = 0.068
US_PER_EXCESS_LIVE = 0.0155  # per fp32 value a thread keeps live beyond LIVE_FREE
LIVE_FREE = 128  # what a thread holds beside the dot operands' staging without pressure
NOT_ELEMENTWISE = frozenset({"matmul", "transpose", "expand", "copy"})  # layout-only (or counted as FLOPs)


@dataclass(frozen=True)
class Cost:
    """One kernel's estimate: `us` in total, from the features beside it."""

    programs: int
    matmuls: int  # per program (a loop's body once per block)
    mflops: float  # per program
    kbytes: float  # per program, loads and stores
    live: int  # peak fp32 values live a thread
    spill_kbytes: float  # per program
    per_sm: int  # programs an SM holds at once
    us: float

    def __str__(self) -> str:
        spill = f", spills ~{self.spill_kbytes:.0f} KB" if self.spill_kbytes else ""
        return (f"{self.us:.0f} us: {self.programs} programs x {self.matmuls} matmuls, "
                f"{self.kbytes:.0f} KB a program, ~{self.live} live values a thread{spill}")


FEATURE, SPLIT_BLOCK = 128, 64  # the typical shape the compile-time models estimate at (the bench's D=128)


def typical_sizes(spec, split: str | None) -> dict:
    """The sizes of a spec's tile dims at the typical shape: C from the spec, feature dims FEATURE, the split
    dim's blocks SPLIT_BLOCK; a dim in power-of-two parts (passes.dim_parts) FEATURE over its parts, so a
    split spec is estimated at the width its caller's dim has."""
    parted = {p: len(ps) for _, ps in spec.parts for p in ps}
    return {C: spec.chunk, **{dim(d): SPLIT_BLOCK if d == split else FEATURE // parted.get(d, 1) for d in spec.dims}}


def size(t: TileType, sizes: dict) -> int:
    n = 1
    for d in t.shape:
        n *= int(d) if isinstance(d, (int, sympy.Integer)) else int(sympy.sympify(d).xreplace(sizes))
    return n


def live_values(ops: tuple[Op, ...], roots: tuple[str, ...], types: dict, sizes: dict) -> int:
    """Peak fp32 values live at once in a kernel running `ops` in order: what it loads is live from the start
    (the generated kernels load every tile first) to its last use, the roots to the end."""
    made = {op.out for op in ops}
    last = {a: i for i, op in enumerate(ops) for a in op.args if isinstance(a, str)}
    live = {a: size(types[a], sizes) for a in last if a not in made and a in types}
    peak = sum(live.values())
    for i, op in enumerate(ops):
        live[op.out] = size(op.type, sizes)
        peak = max(peak, sum(live.values()))
        for a in op.args:
            if isinstance(a, str) and last[a] == i and a not in roots:
                live.pop(a, None)
    return peak


def matmul_flops(op: Op, types: dict, sizes: dict) -> int:
    a = types[op.args[0]]
    return 2 * size(op.type, sizes) * size(TileType(a.shape[1:]), sizes)


def kernel_cost(programs: int, ops: tuple[Op, ...], roots: tuple[str, ...], types: dict, sizes: dict,
                loaded: dict[str, int], stored: dict[str, int], repeat: dict[str, int] | None = None) -> Cost:
    """`programs` running `ops` (each matmul `repeat[op.out]` times a program, default once); `loaded` /
    `stored`: bytes a program moves per tensor."""
    repeat = repeat or {}
    mms = [op for op in ops if op.kind == "matmul"]
    matmuls = sum(repeat.get(op.out, 1) for op in mms)
    flops = sum(repeat.get(op.out, 1) * matmul_flops(op, types, sizes) for op in mms)
    elementwise = sum(op.kind not in NOT_ELEMENTWISE for op in ops)
    moved = sum(loaded.values()) + sum(stored.values())
    live = live_values(ops, roots, types, sizes) // THREADS
    spill = max(0, live - MAX_REGISTERS) * 4 * THREADS * 2  # stored once and loaded back
    per_sm = max(1, REGISTERS_PER_SM // (THREADS * min(MAX_REGISTERS, live + REGISTER_OVERHEAD)))
    per_program = (flops / 1e6 * US_PER_MFLOP + elementwise * US_PER_ELEMENTWISE_OP
                   + max(0, live - LIVE_FREE) * US_PER_EXCESS_LIVE + (moved + spill) * per_sm / BYTES_PER_US_PER_SM)
    waves = math.ceil(programs / (SMS * per_sm))
    return Cost(programs, matmuls, flops / 1e6, moved / 1e3, live, spill / 1e3, per_sm, waves * per_program)
