#!/usr/bin/env bash
# The 2026-12-07f session's GPU calls (benchmarks/NEXT_GPU_RUN.md, its first item); each part of
# scripts/gpu_session19.sh runs as there, plus:
#   probe:  mesanet's and log_linear_attn's backwards, refused on sm_90 since they faulted (policy.triton_faults),
#           run past the refusal in each gradient partition made since (scripts/fault_probe.py refused=run), each in
#           its own process in the background of the parts after it (a fault loses only that process's context);
#           and the _l2 delta rules' gradients at 2x8192, where their serial kernels run 32 wide at chunk 64 (the
#           model's since the sixth 2026-12-07 session; delta_net_l2 faulted there on 2026-11-23's codegen)
#   backward: as there (whole_scan, bwd_warps4 beside the tree), plus whole_scan in `_serial/`: with the scan
#           keeping the cotangents' terms, what it writes is `k dS + A^T dO` (fla's dv2), not `k dS` alone
#   trees:  the tree, `_combo/` (branch combo: serial-tokens on scale-placement), `_serial/`, `_scale/` and
#           `_scalars/` (serial-scalars: the gates' cumsum from prep, `last` of it one load) (each
#           made by `git archive BRANCH effc | tar x -C DIR`), the delta rules' kernel tables at 2x8192, and
#           `_combo/` with whole_scan: the one call of a short budget
#   branches: as there, with a third tree, `_serial/` (branch serial-tokens: the walk's tokens plus the adjoint
#           scan writing `k dS` for the gradient kernels): `git archive serial-tokens effc | tar x -C _serial`
# usage (device machine; carry .device/wheels-a, wheels-c, tlbundle.tar.xz): bash scripts/gpu_session20.sh [PART]...
. "$(dirname "$0")/gpu_env.sh"
export BRANCHES=${BRANCHES:-_tokens _scale _serial}
for part in "$@"; do
  case $part in
    probe)
      for s in mesanet log_linear_attn; do for p in cut_common loop; do
        { timeout 240 python3 scripts/fault_probe.py $s 2x2048x16 refused=run partition=$p 2>&1 | grep -v Warn \
            | tail -3 | sed "s/^/$s $p: /" >> $OUT/refused_probe.log; } &
      done; done
      for s in gated_delta_net_l2 delta_net_l2; do  # the serial kernels 32 wide at chunk 64, the model's at 2x8192
        { timeout 240 python3 scripts/grad_probe.py $s 2x8192x16 2>&1 | grep -v Warn | tail -8 \
            | sed "s/^/$s: /" >> $OUT/refused_probe.log; } &
      done ;;
    backward|trees|short)  # TREE EXPERIMENT SPEC per run: "." is the tree as it is / no experiment
      if [ -n "${RUNS:-}" ]; then IFS=';' read -ra runs <<< "$RUNS"  # e.g. RUNS=". . gated_delta_net;_scalars . gated_delta_net"
      elif [ $part = short ]; then  # trees' gated_delta_net rows alone, for a budget of one short call
        runs=(". . gated_delta_net" "_combo . gated_delta_net" "_serial . gated_delta_net" "_scale . gated_delta_net"
              "_scalars . gated_delta_net")
      elif [ $part = backward ]; then
        runs=(". . gated_delta_net" ". . delta_net" ". whole_scan gated_delta_net" ". whole_scan delta_net"
              ". bwd_warps4 gated_delta_net" ". bwd_warps4 delta_net" "_serial whole_scan gated_delta_net"
              "_serial whole_scan delta_net")
      else  # the experiment trees beside this one, and serial-tokens with the whole scan: one call
        # (_serial holds walk-tokens' change too: its forward table is walk-tokens'; _combo is both branches)
        runs=(". . gated_delta_net" ". . delta_net" "_combo . gated_delta_net" "_combo . delta_net"
              "_scale . gated_delta_net" "_serial . gated_delta_net" "_combo whole_scan gated_delta_net"
              "_scalars . gated_delta_net")
      fi
      profile() {
        (cd $1 && export PYTHONPATH=/tmp/site:$PWD && if [ "$2" = . ]; then
          EFFC_CACHE_DIR=/tmp/effc-cache-$(basename $PWD) timeout 150 python3 $OLDPWD/scripts/kernel_profile.py $3 2x8192
        else timeout 150 python3 $OLDPWD/scripts/backward_experiments.py $2 $3 2x8192; fi 2>&1 | grep -v Warn); }
      for r in "${runs[@]}"; do { profile $r > /dev/null & }; done; wait
      for r in "${runs[@]}"; do
        echo "== $r"; profile $r | tee -a $OUT/$part.log | grep -v "^  -\|^  from" | sed 's/ (config.*//' | cut -c1-90 | head -24
      done ;;
    *) bash "$(dirname "$0")/gpu_session19.sh" $part ;;
  esac
done
wait
echo "== refused backwards run past the policy"; cat $OUT/refused_probe.log 2>/dev/null
true
