"""dK/dV per key head (passes.softmax_plan.GROUPED_KEYS): the training step with the query heads a dK/dV
program walks forced to 1, to the model's choice (passes.softmax.key_group) and to the whole group, in one
process, beside each other (bf16, H=16, D=128).

usage: python scripts/gqa_ab.py SPEC BxT KV_HEADS [SPEC BxT KV_HEADS ...]"""
from __future__ import annotations

import sys

import torch

import effc
from effc.passes.softmax import key_group
from effc.runtime import softmax_op
from effc.runtime.verify import random_inputs
from effc.tools.peers import time_training_step

H, D = 16, 128


def main(args: list[str]) -> None:
    for spec, shape, hk in zip(args[::3], args[1::3], args[2::3]):
        B, T = map(int, shape.split("x"))
        op = effc.load(spec)
        xs = random_inputs(op.spec, B, T, H, {d: D for d in op.spec.dims}, torch.bfloat16, "cuda", kv_heads=int(hk))
        leaves = [x.requires_grad_() for x in xs]
        grad = torch.randn_like(op(*leaves)[0])
        for label, rule in (("GQ=1", lambda group, *a: 1), ("model", key_group), ("whole group", lambda g, *a: g)):
            softmax_op.key_group = rule
            ms, mib = time_training_step(lambda: op(*leaves)[0], leaves, grad)
            print(f"GQA_AB {spec} {shape} kv_heads={hk} {label:12s} fwd+bwd {ms:.3f} ms peak {mib:.0f} MiB", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
