#!/usr/bin/env bash
# The sixth 2026-12-05 session's second call, most wanted first: RoPE's three forms (the fused one now computes
# its rotations once per token: passes.token_values), issue 22's rows (InfLLM-V2 beside dense SDPA and
# FlexAttention, forward and training, 2x8192 and 1x32768, then 1x131072 alone), then decoding replayed from
# CUDA graphs (test and timing). Compiles warm in parallel first.
# usage (device machine, carrying .device/wheels-a and .device/wheels-c): bash scripts/gpu_session6.sh
set -uo pipefail
export OUT=${OUT:-/tmp/out} PYTHONUNBUFFERED=1
python3 -c "import fla" 2>/dev/null || bash scripts/gpu.sh setup 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD EFFC_CACHE_DIR=/tmp/effc-cache
KV_HEADS=1 timeout 120 python3 scripts/kernel_profile.py infllm_v2 1x32768 > /dev/null 2>&1 &
(timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_softmax_bf16.py -k softmax_rope > $OUT/rope_tests.log 2>&1) &
wait
grep -h "softmax_rope\|passed\|failed" $OUT/rope_tests.log | cut -c1-300 | tail -4
timeout 100 python3 scripts/rope_bench.py 2x8192 2>&1 | grep -v Warn | tee -a $OUT/rope.jsonl | cut -c1-900
BACKWARD=1 KV_HEADS=1 PEER_TIMEOUT=200 timeout 330 bash scripts/gpu.sh bench infllm_v2 1x32768,2x8192 1 2>&1 | grep -v Warn | tail -14
OUT=$OUT/long BACKWARD=1 KV_HEADS=1 timeout 100 bash scripts/gpu.sh bench infllm_v2 1x131072 0 2>&1 | grep -v Warn | tail -4
timeout 100 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_decode_graphs.py > $OUT/decode_graphs.log 2>&1
grep -h "relative\|passed\|failed\|Error" $OUT/decode_graphs.log | tail -8
timeout 60 bash scripts/gpu.sh decode infllm_v2,softmax_attn 8x32768 2>&1 | grep -v Warn | tail -3
