#!/usr/bin/env bash
# Items 0000000 and 000000 of benchmarks/NEXT_GPU_RUN.md in one 10-minute call, as the fourth 2026-12-05 session
# ran them (its only machine): coarse walks' bf16 gradients and timings (walk_chunk), head rows' and DSA's bf16
# tests, head rows against token rows. Compiles run in parallel first, then the timings one at a time. Kept as
# the template for a session that may get one call; in that run the 240 s did not reach the row_partitions
# tests, and DSA's rows did not finish in 50 s.
# usage (device machine, carrying .device/wheels-a and .device/wheels-c): bash scripts/gpu_pending.sh
set -uo pipefail
export OUT=${OUT:-/tmp/out} PYTHONUNBUFFERED=1
python3 -c "import fla" 2>/dev/null || bash scripts/gpu.sh setup 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD EFFC_CACHE_DIR=/tmp/effc-cache
nvidia-smi --query-gpu=name --format=csv,noheader
(timeout 240 python3 -m pytest -q -s tests/gpu/test_bf16_grads.py -k coarse_walk > $OUT/coarse_tests.log 2>&1) &
(timeout 240 python3 -m pytest -q -s tests/gpu/test_softmax_bf16.py -k "row_partitions or token_selection or sparse_decode" > $OUT/rows_tests.log 2>&1) &
T1="model 64 64:128 64:256"; T2="model 32 32:64 32:128"
for s in mlstm_sig mlstm; do for t in $T1; do timeout 230 python3 scripts/walk_chunk_bench.py $s 2x8192 $t > /dev/null 2>&1 & done
  timeout 230 python3 scripts/walk_chunk_bench.py $s 1x32768 model > /dev/null 2>&1 & done
for t in $T2; do timeout 230 python3 scripts/walk_chunk_bench.py gated_delta_net 2x8192 $t > /dev/null 2>&1 & done
timeout 230 python3 scripts/walk_chunk_bench.py gated_delta_net 1x32768 model > /dev/null 2>&1 &
for a in "infllm_v2 2x8192 1" "dsa 1x32768 1"; do timeout 230 python3 scripts/rows_bench.py $a > /dev/null 2>&1 & done
wait
echo "== tests"; grep -h "passed\|failed\|Error\|assert" $OUT/coarse_tests.log $OUT/rows_tests.log | cut -c1-300 | tail -16
for a in "mlstm_sig 2x8192 $T1" "mlstm_sig 1x32768 $T1" "mlstm 2x8192 $T1" "mlstm 1x32768 $T1" \
         "gated_delta_net 2x8192 $T2" "gated_delta_net 1x32768 $T2"; do
  timeout 45 python3 scripts/walk_chunk_bench.py $a 2>&1 | tee -a $OUT/walk_chunk.jsonl | cut -c1-330
done
for a in "infllm_v2 2x8192 1" "dsa 1x32768 1" "infllm_v2 1x32768 1"; do
  timeout 50 python3 scripts/rows_bench.py $a > $OUT/rows-${a// /_}.log 2>&1
  grep -h ROWS $OUT/rows-${a// /_}.log | cut -c1-900 || tail -3 $OUT/rows-${a// /_}.log
done
