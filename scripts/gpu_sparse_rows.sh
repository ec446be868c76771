#!/usr/bin/env bash
# Issue 22's speed rows in one 10-minute call: InfLLM-V2 (one key head for 16 query heads) forward and
# training beside dense SDPA and FlexAttention walking effc's own choice (the training mask in 128-key
# blocks: softmax_peers.select_block_mask), at 2x8192 and 1x32768, then effc alone at 1x131072 (cost against
# T.k). Compiles warm first in parallel processes (outputs dropped), timings one process at a time.
# usage (device machine, carrying .device/wheels-a and .device/wheels-c): bash scripts/gpu_sparse_rows.sh [SPEC]
set -uo pipefail
export OUT=${OUT:-/tmp/out} PYTHONUNBUFFERED=1
spec=${1:-infllm_v2}
python3 -c "import fla" 2>/dev/null || bash scripts/gpu.sh setup 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD EFFC_CACHE_DIR=/tmp/effc-cache
for s in 2x8192 1x131072; do KV_HEADS=1 timeout 150 python3 scripts/kernel_profile.py $spec $s > /dev/null 2>&1 & done
wait
KV_HEADS=1 timeout 120 python3 scripts/kernel_profile.py $spec 1x131072 2>&1 | grep -v Warn | tee -a $OUT/profile.log | head -12
BACKWARD=1 KV_HEADS=1 PEER_TIMEOUT=200 timeout 420 bash scripts/gpu.sh bench $spec 2x8192,1x32768 1 2>&1 | grep -v Warn | tail -14
OUT=$OUT/long BACKWARD=1 KV_HEADS=1 timeout 120 bash scripts/gpu.sh bench $spec 1x131072 0 2>&1 | grep -v Warn | tail -4
