"""The in-chunk inverse (I + L)^-1 (the `unit_lower_inv` tile op) alone, three ways, on a GPU: the generated
`_unit_lower_inv` (by halves through a scratch tile in memory, the blocks of one size as one batch), by halves
one block at a time (codegen version 6), and by repeated squaring of the whole tile
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
def generated_kernel(a_ptr, x_ptr, scratch_ptr, C: tl.constexpr):
    r = tl.arange(0, C)
    at = tl.program_id(0).to(tl.int64) * C * C + r[:, None] * C + r[None, :]
    scratch = scratch_ptr + tl.program_id(0).to(tl.int64) * C * C
    tl.store(x_ptr + at, _unit_lower_inv(tl.load(a_ptr + at), r, C, scratch))


@triton.jit
def squaring_kernel(a_ptr, x_ptr, scratch_ptr, C: tl.constexpr):
    r = tl.arange(0, C)
    at = tl.program_id(0).to(tl.int64) * C * C + r[:, None] * C + r[None, :]
    tl.store(x_ptr + at, _unit_lower_inv_squaring(tl.load(a_ptr + at), r, C))


@triton.jit
def _block(scratch, row0, col0, n: tl.constexpr, C: tl.constexpr):
    return scratch + (row0 + tl.arange(0, n))[:, None] * C + (col0 + tl.arange(0, n))[None, :]


@triton.jit
def _merge_pairs(scratch, n: tl.constexpr, C: tl.constexpr):
    """One level of the merge: each pair of inverted n-row diagonal blocks gets its block below, -X22 L21 X11."""
    for p in tl.static_range(C // (2 * n)):
        top, bottom = 2 * p * n, 2 * p * n + n
        x11 = tl.load(_block(scratch, top, top, n, C))
        l21 = tl.load(_block(scratch, bottom, top, n, C))
        x22 = tl.load(_block(scratch, bottom, bottom, n, C))
        x21 = -tl.dot(tl.dot(x22, l21, input_precision=FP32_PRECISION), x11, input_precision=FP32_PRECISION)
        tl.debug_barrier()
        tl.store(_block(scratch, bottom, top, n, C), x21)


@triton.jit
def _one_at_a_time(a, r_C, C: tl.constexpr, scratch):
    """By halves through the scratch tile as codegen version 6 did: one diagonal block, then one pair, at a time."""
    tl.store(scratch + r_C[:, None] * C + r_C[None, :], tl.where(r_C[:, None] > r_C[None, :], a, 0.0))
    tl.debug_barrier()
    r16 = tl.arange(0, 16)
    for i in tl.static_range(C // 16):
        at = _block(scratch, i * 16, i * 16, 16, C)
        inverse = _unit_lower_inv_squaring(tl.load(at), r16, 16)
        tl.debug_barrier()
        tl.store(at, inverse)
    tl.debug_barrier()
    for level in tl.static_range(4, C.bit_length() - 1):
        _merge_pairs(scratch, 1 << level, C)
        tl.debug_barrier()
    return tl.load(scratch + r_C[:, None] * C + r_C[None, :])


@triton.jit
def one_at_a_time_kernel(a_ptr, x_ptr, scratch_ptr, C: tl.constexpr):
    r = tl.arange(0, C)
    at = tl.program_id(0).to(tl.int64) * C * C + r[:, None] * C + r[None, :]
    scratch = scratch_ptr + tl.program_id(0).to(tl.int64) * C * C
    tl.store(x_ptr + at, _one_at_a_time(tl.load(a_ptr + at), r, C, scratch))


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
        scratch = torch.empty_like(a)
        for name, kernel in (("generated", generated_kernel), ("one block", one_at_a_time_kernel),
                             ("squaring", squaring_kernel)):
            x = torch.empty_like(a)
            try:
                kernel[(n,)](a, x, scratch, C, num_warps=4)
                torch.cuda.synchronize()
            except Exception as e:  # the squaring's [C, C] products outgrow shared memory at C = 128
                print(f"C={C} {name}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}")  # the cause: last
                continue
            err = ((x.double() - ref).abs().max() / ref.abs().max()).item()
            ms = triton.testing.do_bench(lambda: kernel[(n,)](a, x, scratch, C, num_warps=4))
            print(f"C={C} {name:9s} {n} tiles: {ms * 1e3:8.1f} us, max error / max |inverse| {err:.2e} "
                  f"({FP32_PRECISION.value} products)")


if __name__ == "__main__":
    main()
