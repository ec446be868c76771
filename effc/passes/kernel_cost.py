"""A time model of one chunk-parallel kernel from its IR: the partition pass (passes.partition) compares
schedules of the backward's gradient kernels with it.

A gradient kernel is one program per chunk (and per split block, unless it loops over the blocks). At
the sizes these kernels run (C = 32..64, d = 64..128) a program is latency bound: each matmul waits for
the layout shuffles of its operands, so a matmul costs a fixed latency plus its FLOPs at one SM's
tensor-core rate. Memory is charged at one SM's share of the bandwidth. A thread past 255 live fp32
values spills; the spilled bytes go to memory and back. Programs share an SM while their registers fit.

`Cost` keeps the features so the plan can say why one schedule won (`effc show SPEC --stage plan`);
scripts/ptxas_report.py cross-checks the live-value estimate against ptxas on the CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import sympy

from ..ir.nodes import Op, TileType

# The model's machine: an H100/H200 SXM (132 SMs, 64K registers and ~25 GB/s of HBM bandwidth a SM).
SMS = 132
REGISTERS_PER_SM = 65536
THREADS = 128  # the gradient kernels run 4 warps
MAX_REGISTERS = 255
REGISTER_OVERHEAD = 40  # indices, masks and pointers beside the tiles' values
BYTES_PER_US_PER_SM = 3.0e6 / SMS  # 3.0 TB/s (measured device-to-device copy on the H100)
MMA_FLOPS_PER_US_PER_SM = 4.0e8 / SMS  # what small-tile kernels reach (~half the dense peak)
# A matmul's fixed latency (us): operands converted to the dot layout through shared memory, the wgmma
# issued and waited for. Fitted to the delta rules' gradient kernels on the H200 (2x8192, C=32, D=128:
# per-block k 1.59 ms, beta 0.98 ms, looped q 0.35 ms; docs/benchmarks.md).
MATMUL_LATENCY_US = 0.6


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
    """`programs` running `ops` (each op `repeat[op.out]` times a program, default once); `loaded` / `stored`:
    bytes a program moves per tensor."""
    repeat = repeat or {}
    mms = [op for op in ops if op.kind == "matmul"]
    matmuls = sum(repeat.get(op.out, 1) for op in mms)
    flops = sum(repeat.get(op.out, 1) * matmul_flops(op, types, sizes) for op in mms)
    moved = sum(loaded.values()) + sum(stored.values())
    live = live_values(ops, roots, types, sizes) // THREADS
    spill = max(0, live - MAX_REGISTERS) * 4 * THREADS * 2  # stored once and loaded back
    per_sm = max(1, REGISTERS_PER_SM // (THREADS * min(MAX_REGISTERS, live + REGISTER_OVERHEAD)))
    per_program = (matmuls * MATMUL_LATENCY_US + flops / MMA_FLOPS_PER_US_PER_SM
                   + (moved + spill) * per_sm / BYTES_PER_US_PER_SM)
    waves = math.ceil(programs / (SMS * per_sm))
    return Cost(programs, matmuls, flops / 1e6, moved / 1e3, live, spill / 1e3, per_sm, waves * per_program)
