#!/usr/bin/env bash
# The 2026-12-07e session's GPU calls (benchmarks/NEXT_GPU_RUN.md, its first item):
#   gap:    delta_net's and gated_delta_net's training step as the bench times it against the sum of its kernels,
#           the host time to issue it and the compiled forms chosen per step (scripts/step_gap.py)
#   common: the cut_common partition (passes.partition) against cut: bf16 gradients of every partition, then the
#           kernel tables of the delta rules and the mLSTMs at 2x8192 with each
#   fla:    fla's kernels for the gated delta rule and the delta rule at 2x8192 (scripts/peer_profile.py)
#   parts:  the delta rules' kernels with K=128 as two parts of 64 against one tile (scripts/parts_experiment.py)
#   final:  the bf16 gradients of the mLSTMs' partitions, fla and mlstm_kernels beside the delta rules and mlstm_sig
#           at 2x8192 (the default partition now cut_common), then the parts experiment
#   backward: the backward's structure changed from outside (scripts/backward_experiments.py: whole_scan,
#           bwd_warps4) against the tree's, the delta rules at 2x8192
#   branches: the experiment branches against the tree, the delta rules' kernels at 2x8192: walk-tokens (the walk
#           writing u - w S for out) and scale-placement (a row scale moved to the smaller matmul tile); first
#           `for b in walk-tokens:_tokens scale-placement:_scale; do mkdir -p ${b#*:} && git archive ${b%:*} effc |
#           tar x -C ${b#*:}; done` (untracked folders, carried with the tree)
#   peers:  the peers beside the specs that now run their forward at 4 warps, at 2x8192 (SPECS, SHAPES override)
# usage (device machine; carry .device/wheels-a, wheels-c, tlbundle.tar.xz): bash scripts/gpu_session19.sh [PART]...
. "$(dirname "$0")/gpu_env.sh"
for part in ${@:-gap}; do
  case $part in
    gap)
      for s in ${GAP_SPECS:-delta_net gated_delta_net}; do
        timeout 200 python3 scripts/step_gap.py $s 2x8192 2>&1 | grep -v Warn | tee -a $OUT/step_gap.log
      done ;;
    common)
      specs=${SPECS:-"gated_delta_net delta_net mlstm_sig"}
      for s in $specs; do for p in cut cut_common; do
        { PARTITION=$p timeout 200 python3 scripts/kernel_profile.py $s 2x8192 > /dev/null 2>&1 & }; done; done
      timeout 300 bash scripts/gpu.sh test tests/gpu/test_bf16_grads.py -k "every_partition and (gated_delta_net \
or delta_net_l2 or mlstm_sig)" > $OUT/common_check.log 2>&1
      grep -E "cut_common|passed|failed|Error" $OUT/common_check.log | cut -c1-160 | tail -24
      wait
      for s in $specs; do for p in cut cut_common; do
        echo "== $s $p"; PARTITION=$p timeout 120 python3 scripts/kernel_profile.py $s 2x8192 2>&1 | grep -v Warn \
          | tee -a $OUT/common_profiles.log | grep -v "^  -" | sed -n '/forward+backward/,$p' | head -14
      done; done ;;
    fla)
      for s in gated_delta_net delta_net; do
        timeout 280 python3 scripts/peer_profile.py $s 2x8192 2>&1 | grep -v Warn | tee -a $OUT/fla_profiles.log
      done ;;
    parts)
      for s in gated_delta_net delta_net; do
        { timeout 200 python3 scripts/parts_experiment.py $s 2x8192 > /dev/null 2>&1 & }; done; wait
      for s in gated_delta_net delta_net; do
        echo "== $s K as 64 + 64"; timeout 100 python3 scripts/parts_experiment.py $s 2x8192 2>&1 | grep -v Warn \
          | tee -a $OUT/parts.log | grep -v "^  -"
      done ;;
    final)
      for s in gated_delta_net delta_net; do
        { timeout 200 python3 scripts/parts_experiment.py $s 2x8192 > /dev/null 2>&1 & }; done
      timeout 170 bash scripts/gpu.sh test tests/gpu/test_bf16_grads.py -k "every_partition and mlstm" \
        > $OUT/mlstm_check.log 2>&1
      grep -E "cut_common|passed|failed|Error" $OUT/mlstm_check.log | cut -c1-160 | tail -12
      wait
      BACKWARD=1 PEER_TIMEOUT=200 timeout 290 bash scripts/gpu.sh bench gated_delta_net,delta_net,mlstm_sig 2x8192 1 \
        2>&1 | grep -v Warn | tail -12
      bash "$0" parts ;;
    backward)
      runs=(". gated_delta_net" ". delta_net" "whole_scan gated_delta_net" "whole_scan delta_net"
            "bwd_warps4 gated_delta_net" "bwd_warps4 delta_net")
      profile() {  # EXPERIMENT SPEC: "." is the tree as it is
        if [ "$1" = . ]; then timeout 150 python3 scripts/kernel_profile.py $2 2x8192
        else timeout 150 python3 scripts/backward_experiments.py $1 $2 2x8192; fi 2>&1 | grep -v Warn; }
      for r in "${runs[@]}"; do { profile $r > /dev/null & }; done; wait
      for r in "${runs[@]}"; do
        echo "== $r"; profile $r | tee -a $OUT/backward.log | grep -v "^  -" | sed -n '/forward+backward/,$p' | head -16
      done ;;
    branches)  # each experiment branch's tree (BRANCHES, default: the two this session left) against this one
      for b in ${BRANCHES:-_tokens _scale}; do [ -d $b ] || echo "no $b/: make it first (see the usage)"; done
      trees=(. $(for b in ${BRANCHES:-_tokens _scale}; do [ -d $b ] && echo $b; done))
      for t in "${trees[@]}"; do for s in gated_delta_net delta_net; do
        { (cd $t && PYTHONPATH=/tmp/site:$PWD EFFC_CACHE_DIR=/tmp/effc-cache-$(basename $t) timeout 150 \
            python3 $OLDPWD/scripts/kernel_profile.py $s 2x8192 > /dev/null 2>&1) & }; done; done; wait
      for t in "${trees[@]}"; do for s in gated_delta_net delta_net; do
        echo "== $t $s"; (cd $t && PYTHONPATH=/tmp/site:$PWD EFFC_CACHE_DIR=/tmp/effc-cache-$(basename $t) timeout 100 \
          python3 $OLDPWD/scripts/kernel_profile.py $s 2x8192 2>&1 | grep -v Warn | tee -a $OUT/branches.log \
          | grep -v "^  -" | head -20)
      done; done ;;
    peers)
      BACKWARD=1 PEER_TIMEOUT=${PEER_TIMEOUT:-240} timeout ${LIMIT:-500} bash scripts/gpu.sh bench \
        ${SPECS:-retention,simple_gla,mlstm_sig} ${SHAPES:-2x8192} 1 2>&1 | grep -v Warn | tail -30 ;;
  esac
done
true
