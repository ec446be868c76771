#!/usr/bin/env bash
# The fifth 2026-12-06 session's second call (after gpu_session11.sh, same machine): gated_delta_net's serial
# kernels at other chunks (the walk and the adjoint scan take 256 serial steps of C=32 at 2x8192; fla's 128 of 64)
. "$(dirname "$0")/gpu_env.sh"
for v in "WALK_CHUNK=64" "CHUNK=64"; do
  env $v timeout 100 python3 scripts/kernel_profile.py gated_delta_net 2x8192 2>&1 | grep -v Warn \
    | tee "$OUT/profile_gdn_$v.log" | grep -A12 "PROFILE.*forward+backward"
done
