#!/usr/bin/env bash
# The second call after scripts/gpu_session6.sh (same machine, warm), carrying .device/wheels-b (TileLang,
# which fla's parallel_nsa needs on Triton 3.6): issue 22's row beside fla's NSA, issue 24's fla peers
# (rwkv7, log_linear_attn, mesanet: forward, their backwards are refused on sm_90 with Triton 3.6), then
# issue 20's head-dim table with D=60 for the linear family.
# usage (device machine): bash scripts/gpu_session7.sh
set -uo pipefail
export OUT=${OUT:-/tmp/out} PYTHONUNBUFFERED=1
python3 -c "import fla" 2>/dev/null || bash scripts/gpu.sh setup 2>&1 | tail -1
python3 -c "import tilelang" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels-b/*.whl
export PYTHONPATH=/tmp/site:$PWD EFFC_CACHE_DIR=/tmp/effc-cache
OUT=$OUT/nsa BACKWARD=1 KV_HEADS=1 PEER_TIMEOUT=240 timeout 280 bash scripts/gpu.sh bench nsa 2x8192,1x32768 1 2>&1 | grep -v Warn | tail -8
OUT=$OUT/lib24 PEER_TIMEOUT=100 timeout 150 bash scripts/gpu.sh bench rwkv7,log_linear_attn,mesanet 2x8192 1 2>&1 | grep -v Warn | tail -6
OUT=$OUT/dims DIMS=60,64,96,128,192 BACKWARD=1 timeout 150 bash scripts/gpu.sh bench gla,delta_net_l2 8x4096 0 2>&1 | grep -v Warn | tail -14
