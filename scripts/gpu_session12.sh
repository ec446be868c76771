#!/usr/bin/env bash
# The 2026-12-06 (sixth session) first call: the serial kernels at two stages (Launcher._serial_options)
#   1. bf16 gradients of every linear spec and of the coarse walks (a miscompiled pipelined loop is O(1) off)
#   2. scripts/launch_probe.py for gated_delta_net at 2x8192 (each variant's distance from the default's values)
#   3. gated_delta_net's step at walk_chunk=64 (fla walks 64-token chunks), kernel by kernel
# usage (device machine): bash scripts/gpu_session12.sh
set -uo pipefail
export OUT=${OUT:-/tmp/out} PYTHONUNBUFFERED=1
python3 -c "import fla, lark" 2>/dev/null || bash scripts/gpu.sh setup 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD EFFC_CACHE_DIR=/tmp/effc-cache
mkdir -p "$OUT"
timeout ${LIMIT:-260} bash scripts/gpu.sh test tests/gpu/test_bf16_grads.py \
  -k "test_bf16_gradients and not every_partition" 2>&1 | tee $OUT/check.log \
  | grep -E "passed|failed|FAIL|Error" | tail -12
KERNELS="walk bwd_scan" timeout 130 python3 scripts/launch_probe.py 2>&1 | grep PROBE | tee $OUT/probe.log
WALK_CHUNK=64 timeout 100 python3 scripts/kernel_profile.py gated_delta_net 2x8192 2>&1 | grep -v Warn \
  | tee "$OUT/profile_gdn_walk64.log" | grep -A12 "PROFILE.*forward+backward"
true
