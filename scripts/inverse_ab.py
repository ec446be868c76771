"""The in-chunk inverse (I + L)^-1 (the `unit_lower_inv` tile op) alone, three ways, on a GPU: by halves in
registers (the generated `_unit_lower_inv`: tl.split / tl.join of dot results), by halves through a scratch tile
in memory (blocks loaded by address: no dot result changes layout, the pattern behind Triton's Hopper
miscompiles of transposed accumulators), and by repeated squaring of the whole tile
(`_unit_lower_inv_squaring`, the helper before codegen version 6). Tiles as the delta rule forms them (beta k k^T times the gated decay, unit-norm k);
each way's largest error against float64 `torch.linalg.inv`, and its time over N tiles.

usage: python scripts/inverse_ab.py [N_TILES] [C ...]      (default 4096 tiles = 2x8192 tokens x 16 heads / 64)
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

import effc

helpers = effc.load("gated_delta_net").module  # any spec with the solve: the helpers of the generated module
_unit_lower_inv, _unit_lower_inv_squaring = helpers._unit_lower_inv, helpers._unit_lower_inv_squaring
FP32_PRECISION = helpers.FP32_PRECISION


@triton.jit
def halves_kernel(a_ptr, x_ptr, C: tl.constexpr):
    r = tl.arange(0, C)
    at = tl.program_id(0).to(tl.int64) * C * C + r[:, None] * C + r[None, :]
    tl.store(x_ptr + at, _unit_lower_inv(tl.load(a_ptr + at), r, C))


@triton.jit
def squaring_kernel(a_ptr, x_ptr, C: tl.constexpr):
    r = tl.arange(0, C)
    at = tl.program_id(0).to(tl.int64) * C * C + r[:, None] * C + r[None, :]
    tl.store(x_ptr + at, _unit_lower_inv_squaring(tl.load(a_ptr + at), r, C))


@triton.jit
def _blocks(s_ptr, row0, col0, n: tl.constexpr, C: tl.constexpr):
    rows, cols = row0 + tl.arange(0, n), col0 + tl.arange(0, n)
    return s_ptr + rows[:, None] * C + cols[None, :]


@triton.jit
def _merge_pairs(s_ptr, n: tl.constexpr, C: tl.constexpr):
    for p in tl.static_range(C // (2 * n)):
        x11 = tl.load(_blocks(s_ptr, 2 * p * n, 2 * p * n, n, C))
        l21 = tl.load(_blocks(s_ptr, 2 * p * n + n, 2 * p * n, n, C))
        x22 = tl.load(_blocks(s_ptr, 2 * p * n + n, 2 * p * n + n, n, C))
        x21 = -tl.dot(tl.dot(x22, l21, input_precision=FP32_PRECISION), x11, input_precision=FP32_PRECISION)
        tl.debug_barrier()
        tl.store(_blocks(s_ptr, 2 * p * n + n, 2 * p * n, n, C), x21)
    tl.debug_barrier()


@triton.jit
def scratch_kernel(a_ptr, x_ptr, C: tl.constexpr):
    """The scratch is the output tile: L (a's strict lower part), its diagonal 16-blocks inverted in place, then
    each level's lower-left blocks -X22 L21 X11 written over L21 (still L's: no smaller level reaches it)."""
    r = tl.arange(0, C)
    base = tl.program_id(0).to(tl.int64) * C * C
    s_ptr = x_ptr + base
    a = tl.load(a_ptr + base + r[:, None] * C + r[None, :])
    tl.store(s_ptr + r[:, None] * C + r[None, :], tl.where(r[:, None] > r[None, :], a, 0.0))  # L alone
    tl.debug_barrier()
    r16 = tl.arange(0, 16)
    for i in tl.static_range(C // 16):
        at = _blocks(s_ptr, i * 16, i * 16, 16, C)
        inv = _unit_lower_inv_squaring(tl.load(at), r16, 16)
        tl.debug_barrier()
        tl.store(at, inv)
    tl.debug_barrier()
    if C > 16:  # blocks of 16, 32, 64 and 128 rows merged in pairs
        _merge_pairs(s_ptr, 16, C)
    if C > 32:
        _merge_pairs(s_ptr, 32, C)
    if C > 64:
        _merge_pairs(s_ptr, 64, C)
    if C > 128:
        _merge_pairs(s_ptr, 128, C)


def delta_rule_tiles(n: int, C: int, K: int = 128) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(n, C, K, generator=g), dim=-1)
    beta = torch.sigmoid(torch.randn(n, C, 1, generator=g))
    b = torch.cumsum(torch.nn.functional.logsigmoid(torch.randn(n, C, generator=g)) / 16, dim=1)
    decay = torch.exp((b[:, :, None] - b[:, None, :]).tril())
    return (beta * k @ k.transpose(1, 2) * decay).tril(-1).cuda()


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    for C in [int(c) for c in sys.argv[2:]] or [32, 64, 128]:
        a = delta_rule_tiles(n, C)
        ref = torch.linalg.inv(torch.eye(C, device="cuda", dtype=torch.float64) + a.double())
        for name, kernel in (("halves", halves_kernel), ("scratch", scratch_kernel), ("squaring", squaring_kernel)):
            x = torch.empty_like(a)
            try:
                kernel[(n,)](a, x, C, num_warps=4)
                torch.cuda.synchronize()
            except Exception as e:  # the squaring's [C, C] products outgrow shared memory at C = 128
                print(f"C={C} {name}: {type(e).__name__}: {str(e)[:120]}")
                continue
            err = ((x.double() - ref).abs().max() / ref.abs().max()).item()
            ms = triton.testing.do_bench(lambda: kernel[(n,)](a, x, C, num_warps=4))
            print(f"C={C} {name:9s} {n} tiles: {ms * 1e3:8.1f} us, max error / max |inverse| {err:.2e} "
                  f"({FP32_PRECISION.value} products)")


if __name__ == "__main__":
    main()
