#!/usr/bin/env bash
# The 2026-12-06 (fifth session) call: one machine, everything in one call (machines were scarce).
#   1. bf16 gradients of every partition of the delta rules and of the zeros spec, with the backward's
#      buffers made at their first writer and freed after their last reader (runtime/backward_buffers.py)
#   2. the delta rules' training step at 2x8192, effc alone: time and peak memory (fla's peaks: 932, 1062,
#      1058 MiB in the earlier runs on this GPU kind)
#   3. bwd_inject, the walk and the adjoint scan under other warps / stages (scripts/launch_probe.py)
#   4. mesanet and log_linear_attn forward beside fla at 8x2048 (gpu_session10.sh fwd24), as time allows
# usage (device machine): bash scripts/gpu_session11.sh
set -uo pipefail
export OUT=${OUT:-/tmp/out} PYTHONUNBUFFERED=1
bash scripts/gpu.sh setup 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD EFFC_CACHE_DIR=/tmp/effc-cache
mkdir -p "$OUT"
CHECK="every_partition and (delta_net or zeros)" LIMIT=120 bash scripts/gpu_session10.sh check 2>&1 | tee $OUT/check.log
OUT=$OUT/delta BACKWARD=1 timeout 130 bash scripts/gpu.sh bench gated_delta_net,gated_delta_net_l2,delta_net 2x8192 0 \
  2>&1 | grep -v Warn | grep -v '^{' | tail -8
timeout 150 python3 scripts/launch_probe.py 2>&1 | grep PROBE | tee $OUT/probe.log
LIMIT=100 PEER_TIMEOUT=90 timeout 140 bash scripts/gpu_session10.sh fwd24 2>&1 | tail -12
true
