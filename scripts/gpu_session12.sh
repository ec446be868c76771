#!/usr/bin/env bash
# The 2026-12-06 (sixth session) first call:
#   1. the serial kernels at two stages (Launcher._serial_options): bf16 gradients of every linear spec (a
#      miscompiled pipelined loop is O(1) off), then scripts/launch_probe.py for gated_delta_net at 2x8192
#   2. dK/dV's per-query-head copies in bf16 and grouped to the query's size (passes.softmax.copies_heads):
#      the GQA bf16 checks, then scripts/gqa_ab.py (one head a program / the model / the whole group)
# usage (device machine): bash scripts/gpu_session12.sh [gqa|linear|probe|walk64]...
. "$(dirname "$0")/gpu_env.sh"
for part in ${@:-gqa linear}; do
  case $part in
    linear)
      timeout ${LIMIT:-240} bash scripts/gpu.sh test tests/gpu/test_bf16_grads.py \
        -k "test_bf16_gradients and not every_partition" 2>&1 | tee $OUT/check.log \
        | grep -E "passed|failed|FAIL|Error" | tail -12
      OUT=$OUT/bench BACKWARD=1 timeout 60 bash scripts/gpu.sh bench gated_delta_net 2x8192 0 2>&1 | grep -v Warn \
        | grep -v '^{' | tail -3 ;;
    probe)
      KERNELS="walk bwd_scan" timeout 120 python3 scripts/launch_probe.py 2>&1 | grep PROBE | tee $OUT/probe.log ;;
    gqa)
      timeout 100 bash scripts/gpu.sh test tests/gpu/test_softmax_bf16.py \
        -k "key_heads_walked or gqa_varlen or row_partitions" 2>&1 | tee $OUT/gqa_check.log \
        | grep -E "passed|failed|FAIL|Error" | tail -8
      timeout 120 python3 scripts/gqa_ab.py softmax_attn 2x8192 4 infllm_v2 8x2048 1 nsa 2x8192 1 \
        2>&1 | grep -v Warn | tee $OUT/gqa_ab.log | tail -16 ;;
    walk64)
      WALK_CHUNK=64 timeout 100 python3 scripts/kernel_profile.py gated_delta_net 2x8192 2>&1 | grep -v Warn \
        | tee "$OUT/profile_gdn_walk64.log" | grep -A12 "PROFILE.*forward+backward" ;;
  esac
done
true
