#!/usr/bin/env bash
# Two calls on one warm machine. `first` carries .device/wheels-a and wheels-c: RoPE with the generated
# prefix backward (bwd_prefix; scripts/gpu_rope.sh: the three forms timed, softmax_rope's bf16 check), then
# issue 22's rows at 8x2048 (InfLLM-V2 and MoBA beside SDPA, FlexAttention and fla's parallel_moba).
# `second` carries .device/wheels-b (TileLang, for fla's parallel_nsa): NSA at 8x2048 beside fla.
# usage (device machine): bash scripts/gpu_session9.sh first|second
set -uo pipefail
export OUT=${OUT:-/tmp/out} PYTHONUNBUFFERED=1
python3 -c "import fla, lark" 2>/dev/null || bash scripts/gpu.sh setup 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD EFFC_CACHE_DIR=/tmp/effc-cache
case "${1:-}" in
  first)
    bash scripts/gpu_rope.sh
    OUT=$OUT/sparse BACKWARD=1 KV_HEADS=1 PEER_TIMEOUT=120 timeout 220 bash scripts/gpu.sh bench infllm_v2,moba 8x2048 1 2>&1 | grep -v Warn | grep -v '^{' | tail -14 ;;
  second)
    python3 -c "import tilelang" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels-b/*.whl
    OUT=$OUT/nsa BACKWARD=1 KV_HEADS=1 PEER_TIMEOUT=200 timeout 260 bash scripts/gpu.sh bench nsa 8x2048 1 2>&1 | grep -v Warn | grep -v '^{' | tail -8 ;;
  *) echo "usage: scripts/gpu_session9.sh first|second"; exit 2 ;;
esac
