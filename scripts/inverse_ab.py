"""The in-chunk inverse (I + L)^-1 (the `unit_lower_inv` tile op) alone, three ways, on a GPU: the generated
`_unit_lower_inv` (by halves, the blocks through a scratch tile in memory), by halves in registers (the tile
split and joined with tl.split / tl.join: the layout changes behind Triton's Hopper miscompiles of transposed
dot results, fla #640), and by repeated squaring of the whole tile (`_unit_lower_inv_squaring`, the helper
before codegen version 6). Tiles as the delta rule forms them (beta k k^T times the gated decay, unit-norm k);
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
def _row_halves(x):
    return tl.split(tl.permute(tl.reshape(x, (2, x.shape[0] // 2, x.shape[1])), (1, 2, 0)))


@triton.jit
def _col_halves(x):
    return tl.split(tl.permute(tl.reshape(x, (x.shape[0], 2, x.shape[1] // 2)), (0, 2, 1)))


@triton.jit
def _join_rows(top, bottom):
    return tl.reshape(tl.permute(tl.join(top, bottom), (2, 0, 1)), (2 * top.shape[0], top.shape[1]))


@triton.jit
def _join_cols(left, right):
    return tl.reshape(tl.permute(tl.join(left, right), (0, 2, 1)), (left.shape[0], 2 * left.shape[1]))


@triton.jit
def _in_registers(a, r_C, C: tl.constexpr):
    if C <= 16:
        x = _unit_lower_inv_squaring(a, r_C, C)
    else:
        top, bottom = _row_halves(a)
        a11, _ = _col_halves(top)
        a21, a22 = _col_halves(bottom)
        r_half = tl.arange(0, C // 2)
        x11 = _in_registers(a11, r_half, C // 2)
        x22 = _in_registers(a22, r_half, C // 2)
        x21 = -tl.dot(tl.dot(x22, a21, input_precision=FP32_PRECISION), x11, input_precision=FP32_PRECISION)
        x = _join_rows(_join_cols(x11, tl.zeros_like(x11)), _join_cols(x21, x22))
    return x


@triton.jit
def registers_kernel(a_ptr, x_ptr, scratch_ptr, C: tl.constexpr):
    r = tl.arange(0, C)
    at = tl.program_id(0).to(tl.int64) * C * C + r[:, None] * C + r[None, :]
    tl.store(x_ptr + at, _in_registers(tl.load(a_ptr + at), r, C))


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
        for name, kernel in (("generated", generated_kernel), ("registers", registers_kernel),
                             ("squaring", squaring_kernel)):
            x = torch.empty_like(a)
            try:
                kernel[(n,)](a, x, scratch, C, num_warps=4)
                torch.cuda.synchronize()
            except Exception as e:  # the squaring's [C, C] products outgrow shared memory at C = 128
                print(f"C={C} {name}: {type(e).__name__}: {str(e)[:120]}")
                continue
            err = ((x.double() - ref).abs().max() / ref.abs().max()).item()
            ms = triton.testing.do_bench(lambda: kernel[(n,)](a, x, scratch, C, num_warps=4))
            print(f"C={C} {name:9s} {n} tiles: {ms * 1e3:8.1f} us, max error / max |inverse| {err:.2e} "
                  f"({FP32_PRECISION.value} products)")


if __name__ == "__main__":
    main()
