"""A peer's kernels, as kernel_profile.py lists effc's: the forward and the training step of the peer `effc bench`
runs beside SPEC (effc.tools.peers), kernel by kernel (torch.profiler CUDA times).

usage: python scripts/peer_profile.py SPEC [BxT ...] (bf16, H=16, D=128; the first peer; fla autotunes on its
       first calls, which kernel_table's warm-up call absorbs)
"""
from __future__ import annotations

import sys

import torch

import effc
from effc.runtime.verify import random_inputs
from effc.tools.peers import PEERS, peer_scale
from kernel_profile import _print_table, kernel_table


def main(spec: str, shapes: list[str]) -> None:
    op, peer = effc.load(spec), PEERS[spec][0]
    for shape in shapes:
        B, T = map(int, shape.split("x"))
        xs = random_inputs(op.spec, B, T, 16, {d: 128 for d in op.spec.dims}, torch.bfloat16, "cuda")
        by_name = {d.name: x for d, x in zip(op.spec.inputs, xs)}
        args = [by_name[n].requires_grad_(by_name[n].is_floating_point()) for n in peer.inputs]
        fn, scale = peer.make(B, T, 16, 128), peer_scale(op, 128)
        d_out = torch.randn_like(fn(*args, scale=scale))

        def step():
            torch.autograd.grad(fn(*args, scale=scale), [a for a in args if a.requires_grad], d_out)

        with torch.no_grad():
            _print_table(f"{peer.label} {shape} forward", kernel_table(lambda: fn(*args, scale=scale)), "peer")
        _print_table(f"{peer.label} {shape} forward+backward", kernel_table(step), "peer")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["2x8192"])
