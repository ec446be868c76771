#!/usr/bin/env bash
# The second 2026-12-06 session's calls on one warm machine (NEXT_GPU_RUN item 00000000000). `first` and
# `third` carry .device/wheels-a and wheels-c, `second` and `fourth` .device/wheels-b (TileLang, which fla's
# parallel_nsa needs on Triton 3.6).
#   first:  InfLLM-V2 at 1x131072 alone (issue 22's cost against T.k), then delta_net_l2 at D=192 (issue 20)
#   second: NSA beside fla with one key head, then issue 24's fla rows at 8x2048
#   third:  RoPE with the generated prefix backward (scripts/gpu_rope.sh), then InfLLM-V2 and MoBA at 8x2048
#           beside SDPA, FlexAttention and fla's parallel_moba
#   fourth: NSA at 8x2048 beside fla
# usage (device machine): bash scripts/gpu_session8.sh first|second|third|fourth
. "$(dirname "$0")/gpu_env.sh"
case "${1:-}" in
  first)
    OUT=$OUT/long BACKWARD=1 KV_HEADS=1 timeout 330 bash scripts/gpu.sh bench infllm_v2 1x131072 0 2>&1 | grep -v Warn | tail -6
    OUT=$OUT/dims DIMS=128,192 BACKWARD=1 timeout 170 bash scripts/gpu.sh bench delta_net_l2 8x4096 0 2>&1 | grep -v Warn | tail -8 ;;
  second)
    python3 -c "import tilelang" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels-b/*.whl
    OUT=$OUT/nsa BACKWARD=1 KV_HEADS=1 PEER_TIMEOUT=240 timeout 300 bash scripts/gpu.sh bench nsa 2x8192,1x32768 1 2>&1 | grep -v Warn | tail -8
    OUT=$OUT/lib24 PEER_TIMEOUT=100 timeout 200 bash scripts/gpu.sh bench rwkv7,log_linear_attn,mesanet 8x2048 1 2>&1 | grep -v Warn | tail -6 ;;
  third)
    bash scripts/gpu_rope.sh
    OUT=$OUT/sparse BACKWARD=1 KV_HEADS=1 PEER_TIMEOUT=120 timeout 220 bash scripts/gpu.sh bench infllm_v2,moba 8x2048 1 2>&1 | grep -v Warn | grep -v '^{' | tail -14 ;;
  fourth)
    python3 -c "import tilelang" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels-b/*.whl
    OUT=$OUT/nsa BACKWARD=1 KV_HEADS=1 PEER_TIMEOUT=200 timeout 260 bash scripts/gpu.sh bench nsa 8x2048 1 2>&1 | grep -v Warn | grep -v '^{' | tail -8 ;;
  *) echo "usage: scripts/gpu_session8.sh first|second|third|fourth"; exit 2 ;;
esac
