#!/usr/bin/env bash
# The parts a GPU call is made of (benchmarks/NEXT_GPU_RUN.md names the parts and settings of the next call);
# run on the device machine from the repository root, carrying .device/wheels-a and wheels-c (and
# tlbundle.tar.xz where fla's gated delta rule runs its backward). Logs go under $OUT.
#   trees   RUNS="TREE EXPERIMENT SPEC;...": each run's kernel table at ${SHAPE:-2x8192} (scripts/kernel_profile.py),
#           compiles first in parallel, then the timings one process at a time. TREE: "." or a folder holding
#           another tree's package (`git archive BRANCH effc | tar x -C DIR`, untracked: it travels with the
#           working tree); EXPERIMENT: "." or one of scripts/backward_experiments.py. Knobs pass through the
#           environment (BLOCK=, PARTITION=, ...: kernel_profile.py's docstring).
#   peers   effc bench --backward beside the peers: SPECS, SHAPES, PEER_TIMEOUT, LIMIT (the bench's time limit)
#   gap     a training step's time against its kernels' and the host's issue time (scripts/step_gap.py), GAP_SPECS
#   host    where gated_delta_net's host time goes (step_gap.py --cprofile), HOST_SPEC
#   fla     fla's own kernel table for the delta rules (scripts/peer_profile.py)
#   probe   PROBES="TREE SPEC BxTxH knob=value ...;...": each a forward and backward synchronizing after every launch
#           (scripts/fault_probe.py: names a faulting kernel), all in parallel, one process each; TREE as in trees
#   ncu     NCU_RUN="SPEC BxTxH knob=value ..." under ncu (speed of light, occupancy, warp stalls) for the kernels
#           matching NCU_KERNELS (a regex, default bwd_sums), one launch each after a warm-up step
# usage: bash scripts/gpu_parts.sh PART...
. "$(dirname "$0")/gpu_env.sh"
here=$PWD
profile() {  # TREE EXPERIMENT SPEC
  (cd "$1" && export PYTHONPATH=/tmp/site:$PWD EFFC_CACHE_DIR=/tmp/effc-cache-$(basename "$PWD")-$2 && if [ "$2" = . ]; then
    timeout 150 python3 "$here/scripts/kernel_profile.py" "$3" "${SHAPE:-2x8192}"
  else timeout 150 python3 "$here/scripts/backward_experiments.py" "$2" "$3" "${SHAPE:-2x8192}"; fi 2>&1 | grep -v Warn)
}
for part in "$@"; do
  case $part in
    trees)
      IFS=';' read -ra runs <<< "${RUNS:-. . gated_delta_net;. . delta_net}"
      for r in "${runs[@]}"; do { profile $r > /dev/null & }; done; wait
      for r in "${runs[@]}"; do
        echo "== $r"; profile $r | tee -a "$OUT/trees.log" | grep -v "^  -" | sed 's/ (config.*//' | cut -c1-110 | head -24
      done ;;
    peers)
      BACKWARD=1 PEER_TIMEOUT=${PEER_TIMEOUT:-240} timeout "${LIMIT:-500}" bash scripts/gpu.sh bench \
        "${SPECS:-gated_delta_net,delta_net}" "${SHAPES:-2x8192}" 1 2>&1 | grep -v Warn | tail -30 ;;
    gap)
      for s in ${GAP_SPECS:-delta_net gated_delta_net}; do
        (cd scripts && timeout 200 python3 step_gap.py "$s" 2x8192 2>&1 | grep -v Warn | tee -a "$OUT/step_gap.log")
      done ;;
    host)
      (cd scripts && timeout 200 python3 step_gap.py "${HOST_SPEC:-gated_delta_net}" 2x8192 --cprofile 2>&1 \
        | grep -v Warn | head -90 | tee "$OUT/host.log") ;;
    fla)
      for s in gated_delta_net delta_net; do
        timeout 280 python3 scripts/peer_profile.py "$s" 2x8192 2>&1 | grep -v Warn | tee -a "$OUT/fla_profiles.log"
      done ;;
    probe)
      IFS=';' read -ra probes <<< "${PROBES:?PROBES=\"SPEC BxTxH knob=value ...;...\"}"
      for p in "${probes[@]}"; do
        read -r tree args <<< "$p"
        { (cd "$tree" && PYTHONPATH=/tmp/site:$PWD EFFC_CACHE_DIR=/tmp/effc-cache-probe-$(basename "$PWD") timeout 300 \
            python3 "$here/scripts/fault_probe.py" $args 2>&1 | grep -v Warn | grep -v "^  -" | tail -4 \
            | sed "s/^/[$p] /" >> "$OUT/probe.log"); } &
      done; wait; echo "== probes"; cat "$OUT/probe.log" ;;
    ncu)
      timeout 300 ncu --kernel-name regex:"${NCU_KERNELS:-bwd_sums}" --launch-skip 0 --launch-count 2 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        python3 scripts/fault_probe.py ${NCU_RUN:-delta_net 2x8192x16} 2>&1 | grep -v "Warn\|^==PROF==" \
        | tee -a "$OUT/ncu.log" | grep -E "_kernel|Duration|Registers|Occupancy|Throughput|Spilling|Stall|Block Limit" ;;
    *) echo "unknown part $part: trees peers gap host fla probe ncu"; exit 2 ;;
  esac
done
true
