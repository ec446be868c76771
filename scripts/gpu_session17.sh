#!/usr/bin/env bash
# The next session's GPU call for item 000000000000000000000 of benchmarks/NEXT_GPU_RUN.md (chunk 64's prep and out):
#   warps:  gated_delta_net at 2x8192 at chunk 32, and at chunk 64 with the model's 8 warps and with 4 (compiles in
#           parallel first, timings one at a time)
#   peers:  fla beside gated_delta_net and delta_net at issue 21's three shapes (carry .device/tlbundle.tar.xz)
# usage (device machine, carrying .device/wheels-a and .device/wheels-c): bash scripts/gpu_session17.sh [PART]...
. "$(dirname "$0")/gpu_env.sh"
runs=("CHUNK=32" "CHUNK=64" "CHUNK=64 WARPS=4")
for part in ${@:-warps}; do
  case $part in
    warps)
      for r in "${runs[@]}"; do { env $r timeout 200 python3 scripts/kernel_profile.py gated_delta_net 2x8192 > /dev/null 2>&1 & }; done
      wait
      for r in "${runs[@]}"; do
        echo "== $r"; env $r timeout 90 python3 scripts/kernel_profile.py gated_delta_net 2x8192 2>&1 | grep -v Warn \
          | tee -a $OUT/warps.log | grep -v "^  -" | tail -17
      done ;;
    peers)
      BACKWARD=1 PEER_TIMEOUT=${PEER_TIMEOUT:-240} timeout ${LIMIT:-560} bash scripts/gpu.sh bench \
        gated_delta_net,delta_net ${SHAPES:-8x2048,2x8192,1x32768} 1 2>&1 | grep -v Warn | tail -40 ;;
  esac
done
true
