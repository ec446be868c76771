#!/usr/bin/env bash
# Item 000000000 of benchmarks/NEXT_GPU_RUN.md in one 10-minute call (the fifth 2026-12-05 session's leftovers):
# sparse decoding at 8x32768 after the pool and select changes, RoPE fused against RoPE in the prefix, the
# head-rows bf16 tests alone, and InfLLM-V2's training rows beside FlexAttention. Compiles run in parallel
# first (outputs dropped), then the timings one at a time.
# usage (device machine, carrying .device/wheels-a and .device/wheels-c): bash scripts/gpu_pending.sh
set -uo pipefail
export OUT=${OUT:-/tmp/out} PYTHONUNBUFFERED=1
python3 -c "import fla" 2>/dev/null || bash scripts/gpu.sh setup 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD EFFC_CACHE_DIR=/tmp/effc-cache
nvidia-smi --query-gpu=name --format=csv,noheader
(timeout 300 python3 -m pytest -q -s tests/gpu/test_softmax_bf16.py -k "row_partitions or sparse_decode" > $OUT/rows_tests.log 2>&1) &
for s in infllm_v2 moba; do DECODE=1 KV_HEADS=2 timeout 200 python3 scripts/kernel_profile.py $s 8x32768 > /dev/null 2>&1 & done
timeout 200 python3 scripts/rope_bench.py 2x8192 > /dev/null 2>&1 &
wait
echo "== tests"; grep -h "passed\|failed\|Error\|assert" $OUT/rows_tests.log | cut -c1-300 | tail -8
for s in infllm_v2 moba; do
  DECODE=1 KV_HEADS=2 timeout 60 python3 scripts/kernel_profile.py $s 8x32768 2>&1 | grep -v Warn | tee -a $OUT/profile.log | head -6
done
timeout 90 bash scripts/gpu.sh decode infllm_v2,moba 8x32768 2>&1 | grep -v Warn | tail -4
timeout 90 python3 scripts/rope_bench.py 2x8192 2>&1 | grep ROPE | tee -a $OUT/rope.jsonl | cut -c1-900
BACKWARD=1 KV_HEADS=1 PEER_TIMEOUT=120 timeout 200 bash scripts/gpu.sh bench infllm_v2 2x8192,1x32768 1 2>&1 \
  | grep -v Warn | tail -12
