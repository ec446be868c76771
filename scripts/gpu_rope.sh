#!/usr/bin/env bash
# RoPE alone (issue 24's bar), for a short device budget: the three forms timed (scripts/rope_bench.py), then
# softmax_rope's bf16 forward and gradients. usage (carrying .device/wheels-a, .device/wheels-c): bash scripts/gpu_rope.sh
set -uo pipefail
export OUT=${OUT:-/tmp/out} PYTHONUNBUFFERED=1
python3 -c "import lark" 2>/dev/null || bash scripts/gpu.sh setup 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD EFFC_CACHE_DIR=/tmp/effc-cache
timeout 150 python3 scripts/rope_bench.py 2x8192 2>&1 | grep -v Warn | tee -a $OUT/rope.jsonl | cut -c1-900
timeout 100 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_softmax_bf16.py -k softmax_rope 2>&1 \
  | tee $OUT/rope_tests.log | grep -h "softmax_rope\|passed\|failed" | cut -c1-300 | tail -4
