#!/usr/bin/env bash
# The first 2026-12-06 (third) session's calls (NEXT_GPU_RUN item 000000000000). Each carries
# .device/wheels-a and wheels-c.
#   profile: where the sparse training step goes at 8x2048 (InfLLM-V2 with one key head, MoBA per head) and
#            gated_delta_net's training step at 2x8192 (issue 21), kernel by kernel
#   fla:     issue 24's fla rows, one spec at a time (rwkv7, log_linear_attn, mesanet at 8x2048)
#   sparse:  InfLLM-V2 and MoBA at 8x2048 beside SDPA and FlexAttention (after a change to their backward)
#   gqa:     dK/dV per key head: its bf16 gradient test, the sparse rows again, InfLLM-V2 at 1x32768 and
#            softmax_attn with 4 key heads beside SDPA
# usage (device machine): bash scripts/gpu_session9.sh profile|fla|sparse|gqa
. "$(dirname "$0")/gpu_env.sh"
case "${1:-}" in
  profile)
    KV_HEADS=1 timeout 170 python3 scripts/kernel_profile.py infllm_v2 8x2048 2>&1 | grep -v Warn | tee "$OUT/profile_infllm.log" | grep -A13 PROFILE
    KV_HEADS=1 timeout 150 python3 scripts/kernel_profile.py moba 8x2048 2>&1 | grep -v Warn | tee "$OUT/profile_moba.log" | grep -A13 PROFILE
    timeout 200 python3 scripts/kernel_profile.py gated_delta_net 2x8192 2>&1 | grep -v Warn | tee "$OUT/profile_gdn.log" | grep -A13 PROFILE ;;
  fla)
    for s in ${SPECS:-rwkv7 log_linear_attn mesanet}; do
      OUT=$OUT/lib24-$s PEER_TIMEOUT=${PEER_TIMEOUT:-200} timeout ${LIMIT:-250} bash scripts/gpu.sh bench $s ${SHAPES:-8x2048} 1 2>&1 | grep -v Warn | grep -v '^{' | tail -6
    done ;;
  sparse)
    OUT=$OUT/sparse BACKWARD=1 KV_HEADS=1 PEER_TIMEOUT=120 timeout 260 bash scripts/gpu.sh bench infllm_v2,moba 8x2048 1 2>&1 | grep -v Warn | grep -v '^{' | tail -14 ;;
  gqa)
    timeout 150 bash scripts/gpu.sh test tests/gpu/test_softmax_bf16.py -k key_heads_walked 2>&1 | tail -3
    bash "$0" sparse
    OUT=$OUT/long BACKWARD=1 KV_HEADS=1 timeout 150 bash scripts/gpu.sh bench infllm_v2 1x32768 0 2>&1 | grep -v Warn | grep -v '^{' | tail -4
    OUT=$OUT/dense BACKWARD=1 KV_HEADS=4 PEER_TIMEOUT=100 timeout 160 bash scripts/gpu.sh bench softmax_attn 8x2048,2x8192 1 2>&1 | grep -v Warn | grep -v '^{' | tail -10 ;;
  *) echo "usage: scripts/gpu_session9.sh profile|fla|sparse|gqa"; exit 2 ;;
esac
