#!/usr/bin/env bash
# The first 2026-12-07b session's GPU calls:
#   solve:  the in-chunk inverse alone (generated: one batch per block size, against one block at a time and
#           the squaring), then gated_delta_net's kernels at chunk 32 (the spec's) and 64
#   peers:  `effc bench --backward` beside fla at 2x8192 for SPECS (env; fla's gated delta rule wants TileLang:
#           carry .device/wheels-b in this call if an earlier one carried wheels-a, c and d)
# usage (device machine): bash scripts/gpu_session15.sh [PART]...; heads, mesa and t37 are gpu_session14.sh's
. "$(dirname "$0")/gpu_env.sh"
for part in ${@:-solve}; do
  case $part in
    solve)
      timeout 120 python3 scripts/inverse_ab.py 2>&1 | grep -v Warn | tee $OUT/inverse_ab.log
      for c in 32 64; do
        CHUNK=$c timeout ${PROFILE_LIMIT:-110} python3 scripts/kernel_profile.py gated_delta_net 2x8192 2>&1 \
          | tee $OUT/gdn_profile_c$c.log | grep -v Warn | grep -v "^  -" | tail -18
      done ;;
    peers)
      test -d /tmp/site/tilelang || { ls .device/wheels-b >/dev/null 2>&1 && python3 -m pip install -q --no-index \
        --no-deps --no-compile --target /tmp/site .device/wheels-b/*.whl; }
      BACKWARD=1 PEER_TIMEOUT=${PEER_TIMEOUT:-240} timeout ${LIMIT:-560} bash scripts/gpu.sh bench \
        ${SPECS:-gated_delta_net,gated_delta_net_l2} 2x8192 1 2>&1 | grep -v Warn | tail -30 ;;
  esac
done
true
