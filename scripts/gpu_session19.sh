#!/usr/bin/env bash
# The 2026-12-07e session's GPU calls (benchmarks/NEXT_GPU_RUN.md, its first item):
#   gap:    delta_net's and gated_delta_net's training step as the bench times it against the sum of its kernels,
#           the host time to issue it and the compiled forms chosen per step (scripts/step_gap.py)
#   peers:  the peers beside the specs that now run their forward at 4 warps, at 2x8192 (SPECS, SHAPES override)
# usage (device machine; carry .device/wheels-a, wheels-c, tlbundle.tar.xz): bash scripts/gpu_session19.sh [PART]...
. "$(dirname "$0")/gpu_env.sh"
for part in ${@:-gap}; do
  case $part in
    gap)
      for s in delta_net gated_delta_net; do
        timeout 200 python3 scripts/step_gap.py $s 2x8192 2>&1 | grep -v Warn | tee -a $OUT/step_gap.log
      done ;;
    peers)
      BACKWARD=1 PEER_TIMEOUT=${PEER_TIMEOUT:-240} timeout ${LIMIT:-500} bash scripts/gpu.sh bench \
        ${SPECS:-retention,simple_gla,mlstm_sig} ${SHAPES:-2x8192} 1 2>&1 | grep -v Warn | tail -30 ;;
  esac
done
true
