#!/usr/bin/env bash
# The 2026-12-07 session's GPU calls (inverse and linear ran then, before the serial kernels' two stages and the
# in-chunk inverse by halves landed; mesa, heads and t37 are still to run):
#   inverse: the inverse alone, three ways (scripts/inverse_ab.py), then gated_delta_net's kernels
#            at chunk 32 (the spec's) and 64
#   mesa:    mesanet's and log_linear_attn's forward kernels, merge fused or deferred, block 64 or 128
#   linear:  bf16 gradients of every linear spec (both changes at once)
#   heads:   head rows' dK/dV stored per key head (softmax_emit._grad_heads): GQA bf16 checks, then the peaks
#   t37:     bf16 gradients on Triton 3.7.1 (carry .device/triton37 too)
# usage (device machine, carrying .device/wheels-a and .device/wheels-c): bash scripts/gpu_session14.sh [PART]...
. "$(dirname "$0")/gpu_env.sh"
for part in ${@:-inverse linear}; do
  case $part in
    inverse)
      timeout 90 python3 scripts/inverse_ab.py 2>&1 | grep -v Warn | tee $OUT/inverse_ab.log
      for c in 32 64; do  # the spec's chunk, and fla's (wgmma takes 64-row products)
        CHUNK=$c timeout ${PROFILE_LIMIT:-100} python3 scripts/kernel_profile.py gated_delta_net 2x8192 2>&1 \
          | tee $OUT/gdn_profile_c$c.log | grep -v Warn | tail -28
      done ;;
    mesa)  # forwards far behind fla's (0.04x, 0.18x at 32-wide blocks): merge deferred, one V block
      for spec in mesanet log_linear_attn; do
        for knobs in "" "DEFER_MERGE=1" "DEFER_MERGE=1 BLOCK=128"; do
          echo "== $spec $knobs"; env $knobs timeout 100 python3 scripts/kernel_profile.py $spec 2x8192 2>&1 \
            | grep -v Warn | grep -A8 "forward:" | tee -a $OUT/mesa_profile.log
        done
      done ;;
    linear)
      timeout ${LIMIT:-330} bash scripts/gpu.sh test tests/gpu/test_bf16_grads.py -k "test_bf16_gradients and not \
every_partition" 2>&1 | tee $OUT/linear_check.log | grep -E "passed|failed|FAIL|Error" | tail -16 ;;
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
