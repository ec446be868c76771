"""The `unit_lower_inv` tile op in generated Triton (codegen/triton/solve.py.j2): (I + L)^-1 by halves, the
diagonal 16-row blocks inverted and merged pairwise through a scratch tile, against float64 `torch.linalg.inv`
and against the repeated squaring it replaced; then a delta rule at the chunks where the merges go two and
three sizes deep."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

import effc
from effc.errors import SpecError
from effc.runtime.verify import check_op

helpers = effc.load("delta_net").module
_unit_lower_inv, _unit_lower_inv_squaring = helpers._unit_lower_inv, helpers._unit_lower_inv_squaring


@triton.jit
def _inverse_kernel(a_ptr, x_ptr, scratch_ptr, C: tl.constexpr, HALVES: tl.constexpr):
    r = tl.arange(0, C)
    at = tl.program_id(0) * C * C + r[:, None] * C + r[None, :]
    a = tl.load(a_ptr + at)
    if HALVES:
        x = _unit_lower_inv(a, r, C, scratch_ptr + tl.program_id(0) * C * C)
    else:
        x = _unit_lower_inv_squaring(a, r, C)
    tl.store(x_ptr + at, x)


def _tiles(C: int) -> torch.Tensor:
    """Three tiles: a delta rule's (beta k k^T under a decay, unit-norm k), one of entries up to 4 / sqrt(C)
    whose inverse grows past them, and one whose upper part and diagonal are garbage the op must ignore."""
    g = torch.Generator().manual_seed(C)
    k = torch.nn.functional.normalize(torch.randn(C, 32, generator=g), dim=-1)
    b = torch.cumsum(-torch.rand(C, generator=g) / 4, 0)
    delta = torch.rand(C, 1, generator=g) * (k @ k.T) * torch.exp((b[:, None] - b[None, :]).tril())
    strong = (torch.rand(C, C, generator=g) * 8 - 4) / C ** 0.5
    # only the strict lower part counts: the diagonal and above hold garbage
    garbage = (torch.randn(C, C, generator=g) / C ** 0.5).tril(-1) + (torch.randn(C, C, generator=g) * 1e3).triu()
    return torch.stack([delta, strong, garbage]).float()


@pytest.mark.parametrize("C", [16, 32, 64, 128])
def test_inverse_by_halves_matches_linalg(C):
    a = _tiles(C)
    want = torch.linalg.inv(torch.eye(C, dtype=torch.float64) + a.double().tril(-1))
    for halves in (True, False):
        x, scratch = torch.empty_like(a), torch.full_like(a, float("nan"))  # no value of it may leak in
        _inverse_kernel[(a.shape[0],)](a, x, scratch, C, halves)
        for i in range(a.shape[0]):
            err = (x[i].double() - want[i]).abs().max() / want[i].abs().max()
            assert err < 1e-5, f"C={C} tile {i} {'halves' if halves else 'squaring'}: error {err:.2e}"
        assert torch.equal(x.triu(1), torch.zeros_like(x.triu(1))), "the inverse of a unit lower matrix is lower"


@pytest.mark.parametrize("name,chunk", [("gated_delta_net", 64), ("delta_net", 128)])
def test_delta_rules_at_deep_chunks_match_the_oracle(name, chunk):
    """The solve two and three levels of halves deep inside the prep kernel, forward and every gradient, T
    ragged (the last chunk's padded rows must not reach the real ones through the inverse)."""
    op = effc.load(name)
    for what, verdict in check_op(op, 1, chunk + 37, 2, {"K": 32, "V": 32}, chunk=chunk):
        assert verdict.ok, f"{name} chunk={chunk} {what}: {verdict}"


def test_a_chunk_past_the_solve_s_merges_is_refused():
    op = effc.load("delta_net")
    with pytest.raises(SpecError, match="C <= 256 fails for C=512.*in-chunk solve"):
        check_op(op, 1, 40, 1, {"K": 16, "V": 16}, chunk=512)


LAYOUT_SCRIPT = r"""
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
import effc
from effc.codegen.triton.aot import linear_dot_operands, ptx_only
helpers = effc.load("delta_net").module
_unit_lower_inv = helpers._unit_lower_inv


@triton.jit
def inverse(a_ptr, x_ptr, scratch_ptr, C: tl.constexpr):
    r = tl.arange(0, C)
    at = r[:, None] * C + r[None, :]
    tl.store(x_ptr + at, _unit_lower_inv(tl.load(a_ptr + at), r, C, scratch_ptr))


found = {}
for C in map(int, sys.argv[1:]):
    with ptx_only():
        k = triton.compile(triton.compiler.ASTSource(fn=inverse, signature={"a_ptr": "*fp32", "x_ptr": "*fp32",
                           "scratch_ptr": "*fp32", "C": "constexpr"}, constexprs={"C": C}),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=1))
    found[C] = linear_dot_operands(k.asm["ttgir"])
print("LAYOUTS " + json.dumps(found))
"""


@pytest.mark.parametrize("C", [64, 128])
def test_no_dot_operand_of_the_solve_comes_from_a_linear_layout(C, tmp_path):
    """Compiled for sm_90 (to TTGIR, on the CPU): splitting the register tile into halves (tl.split / tl.join)
    fed two of C = 64's dots from Triton's linear layout, the shape of the Hopper miscompile of transposed dot
    results that Triton 3.4-3.7.0 have (fla #640, policy/triton_faults.py); the blocks go through the scratch
    tile instead."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"EFFC_CACHE_DIR": str(tmp_path)}
    script = tmp_path / "layouts.py"  # @triton.jit reads its source from a file
    script.write_text(LAYOUT_SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(C)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.split("LAYOUTS ", 1)[1])[str(C)]
    assert not found, f"C={C}: dot operands converted from a linear layout:\n" + "\n".join(found)
