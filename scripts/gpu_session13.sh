#!/usr/bin/env bash
# The 2026-12-06 (seventh session) first call, with 59853c2 (serial kernels at two stages) applied uncommitted:
#   linear: bf16 gradients of the linear specs the sixth session did not reach at two stages
#   heads:  head rows' dK/dV stored per key head (softmax_emit._grad_heads): GQA bf16 checks, then the peaks
#   t37:    bf16 gradients on Triton 3.7.1, where the 4-warp and 32-block holds end (carry .device/triton37 too)
# usage (device machine, carrying .device/wheels-a and .device/wheels-c): bash scripts/gpu_session13.sh [linear|heads]...
. "$(dirname "$0")/gpu_env.sh"
for part in ${@:-linear heads}; do
  case $part in
    linear)
      timeout ${LIMIT:-260} bash scripts/gpu.sh test tests/gpu/test_bf16_grads.py -k "test_bf16_gradients and not \
every_partition and (lion_s or mlstm or race or retention or rwkv7 or simple_gla or zeros)" 2>&1 \
        | tee $OUT/linear_check.log | grep -E "passed|failed|FAIL|Error" | tail -12 ;;
    heads)
      timeout 120 bash scripts/gpu.sh test tests/gpu/test_softmax_bf16.py -k "row_partitions or key_heads_walked" \
        2>&1 | tee $OUT/heads_check.log | grep -E "passed|failed|FAIL|Error" | tail -8
      timeout ${AB_LIMIT:-150} python3 scripts/gqa_ab.py ${AB:-nsa 2x8192 1 infllm_v2 1x32768 1 infllm_v2 8x2048 1} \
        2>&1 | grep -v Warn | tee $OUT/gqa_ab.log | tail -16 ;;
    t37)
      SPECS="gated_delta_net rwkv7 hdla zeros" LIMIT=110 bash scripts/gpu_triton37.sh check ;;
  esac
done
true
