"""An experiment: kernel_profile.py with a power-of-two feature dim of 128 run as two parts of 64 (passes.dim_parts
splits only dims that are not powers of two; fla's delta-rule kernels hold the [K, V] state as two 64-row
halves). usage: python scripts/parts_experiment.py SPEC [BxT ...] (kernel_profile.py's environment knobs)"""
import sys

import effc.runtime.dim_parts as runtime_parts
from kernel_profile import main

halves = runtime_parts.part_sizes
runtime_parts.part_sizes = lambda n: (n // 2, n // 2) if n == 128 else halves(n)

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["2x8192"])
