"""Where the host time of a training step goes (cProfile over warm steps): a step whose host time exceeds its
kernels' time is launch bound. usage: python scripts/host_profile.py SPEC [BxT] (bf16, H=16, D=128)"""
import cProfile
import pstats
import sys

import torch

import effc
from effc.runtime.verify import random_inputs

spec, shape = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "2x8192"
B, T = map(int, shape.split("x"))
op = effc.load(spec)
xs = [x.requires_grad_() if x.is_floating_point() else x for x in
      random_inputs(op.spec, B, T, 16, {d: 128 for d in op.spec.dims}, torch.bfloat16, "cuda")]
grad = torch.randn_like(op(*xs)[0])
step = lambda: torch.autograd.grad(op(*xs)[0], [x for x in xs if x.requires_grad], grad)
for _ in range(3):
    step()
torch.cuda.synchronize()
prof = cProfile.Profile()
prof.enable()
for _ in range(10):
    step()
torch.cuda.synchronize()
prof.disable()
pstats.Stats(prof).sort_stats("cumulative").print_stats(28)
pstats.Stats(prof).sort_stats("tottime").print_stats(15)
