#!/usr/bin/env bash
# The next session's GPU calls (benchmarks/NEXT_GPU_RUN.md, its first item); other parts run as in
# scripts/gpu_session21.sh, 20 and 19.
#   trees:  the delta rules' kernel tables at 2x8192 for the tree (prep's values kept for the backward, the walk's
#           narrow loads: both untimed) and `_nscan/` (branch narrow-scan: the adjoint scan's token and prep loads
#           narrow too; `git archive narrow-scan effc | tar x -C _nscan`), and the tree's whole scan (no bwd_inject:
#           scripts/backward_experiments.py; right under the interpreter on the CPU, never timed: combo's faulted)
#   host:   where gated_delta_net's host time goes at 2x8192 (its forward took 0.84 ms of host time a call for
#           0.67 ms of kernels on 2026-12-07; delta_net's was not launch bound): step_gap.py --cprofile
# usage (device machine; carry .device/wheels-a, wheels-c, tlbundle.tar.xz): bash scripts/gpu_session22.sh [PART]...
. "$(dirname "$0")/gpu_env.sh"
for part in "$@"; do
  case $part in
    trees)
      RUNS=". . gated_delta_net;. . delta_net;_nscan . gated_delta_net;_nscan . delta_net;. whole_scan gated_delta_net" \
        bash "$(dirname "$0")/gpu_session20.sh" trees ;;
    host)
      (cd scripts && timeout 200 python3 step_gap.py gated_delta_net 2x8192 --cprofile 2>&1 | grep -v Warn \
        | head -90 | tee $OUT/host.log) ;;
    *) bash "$(dirname "$0")/gpu_session21.sh" $part ;;
  esac
done
true
