#!/usr/bin/env bash
# The 2026-12-07f session's GPU calls (benchmarks/NEXT_GPU_RUN.md, its first item); each part of
# scripts/gpu_session19.sh runs as there, plus:
#   probe:  mesanet's and log_linear_attn's backwards, refused on sm_90 since they faulted (policy.triton_faults),
#           run past the refusal in each gradient partition made since (scripts/fault_probe.py refused=run), each in
#           its own process in the background of the parts after it (a fault loses only that process's context)
#   branches: as there, with a third tree, `_serial/` (branch serial-tokens: the walk's tokens plus the adjoint
#           scan writing `k dS` for the gradient kernels): `git archive serial-tokens effc | tar x -C _serial`
# usage (device machine; carry .device/wheels-a, wheels-c, tlbundle.tar.xz): bash scripts/gpu_session20.sh [PART]...
. "$(dirname "$0")/gpu_env.sh"
export BRANCHES=${BRANCHES:-_tokens _scale _serial}
for part in "$@"; do
  case $part in
    probe)
      for s in mesanet log_linear_attn; do for p in cut cut_common loop; do
        { timeout 240 python3 scripts/fault_probe.py $s 2x2048x16 refused=run partition=$p 2>&1 | grep -v Warn \
            | tail -3 | sed "s/^/$s $p: /" >> $OUT/refused_probe.log; } &
      done; done ;;
    *) bash "$(dirname "$0")/gpu_session19.sh" $part ;;
  esac
done
wait
echo "== refused backwards run past the policy"; cat $OUT/refused_probe.log 2>/dev/null
true
