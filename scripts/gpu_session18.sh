#!/usr/bin/env bash
# The 2026-12-07d session's GPU calls (benchmarks/NEXT_GPU_RUN.md, its first item):
#   solve:  the in-chunk inverse in exact fp32 (CUDA cores) against tf32x3 (_ab/ = the tree before): bf16
#           gradients of the specs with a solve, the inverse alone, gated_delta_net's kernels at chunk 32 and 64
#   check:  the delta rules' bf16 gradients at their chunk 64 (4 forward warps), and retention's kernels at 4
#           forward warps (the model's now) against 8
#   bench:  fla beside gated_delta_net and delta_net (SHAPES, default 2x8192; carry tlbundle)
#   warps:  gpu_session17.sh's (chunk 64 at 4 warps against 8)
#   peers:  gpu_session17.sh's (fla beside gated_delta_net and delta_net at issue 21's shapes; carry tlbundle)
# usage (device machine; carry .device/wheels-a, wheels-c and the _ab tree): bash scripts/gpu_session18.sh [PART]...
. "$(dirname "$0")/gpu_env.sh"
profile() {  # TREE SPEC [CHUNK]: the kernel table of SPEC at 2x8192 from TREE's effc, with TREE's own cache
  (cd $1 && PYTHONPATH=/tmp/site:$PWD EFFC_CACHE_DIR=/tmp/effc-cache-$(basename $1) \
    env ${3:+CHUNK=$3} timeout ${PROFILE_LIMIT:-150} python3 $OLDPWD/scripts/kernel_profile.py $2 2x8192 2>&1 | grep -v Warn)
}
runs=(". gated_delta_net 32" "_ab gated_delta_net 32" ". gated_delta_net 64" "_ab gated_delta_net 64")
for part in ${@:-solve}; do
  case $part in
    solve)
      for r in "${runs[@]}"; do { profile $r > /dev/null & }; done
      timeout 240 bash scripts/gpu.sh test tests/gpu/test_bf16_grads.py -k "test_bf16_gradients and not \
every_partition and (gated_delta_net or delta_net or hdla or rwkv7)" > $OUT/solve_check.log 2>&1
      grep -E "relative error|passed|failed|Error" $OUT/solve_check.log | cut -c1-160 | tail -12
      wait
      for t in . _ab; do echo "== $t inverse"; (cd $t && PYTHONPATH=/tmp/site:$PWD EFFC_CACHE_DIR=/tmp/effc-cache-$(basename $t) \
        timeout 60 python3 $OLDPWD/scripts/inverse_ab.py 4096 32 64 2>&1 | grep -v Warn | tee -a $OUT/inverse_ab.log); done
      for r in "${runs[@]}"; do
        echo "== $r"; profile $r | tee -a "$OUT/solve_profiles.log" | grep -v "^  -" | tail -17
      done ;;
    check)
      for w in "" 8; do { env ${w:+WARPS=$w} timeout 150 python3 scripts/kernel_profile.py retention 2x8192 > /dev/null 2>&1 & }; done
      timeout 240 bash scripts/gpu.sh test tests/gpu/test_bf16_grads.py -k "test_bf16_gradients and not \
every_partition and (delta_net or gated_delta_net or retention or mlstm or simple_gla)" > $OUT/chunk64_check.log 2>&1
      grep -E "passed|failed|FAIL|Error" $OUT/chunk64_check.log | cut -c1-160 | tail -8
      wait
      for w in "" 8; do echo "== retention WARPS=${w:-model}"; env ${w:+WARPS=$w} timeout 90 python3 scripts/kernel_profile.py \
        retention 2x8192 2>&1 | grep -v Warn | tee -a $OUT/retention_warps.log | grep -v "^  -" | tail -14; done ;;
    bench)
      BACKWARD=1 PEER_TIMEOUT=${PEER_TIMEOUT:-240} timeout ${LIMIT:-400} bash scripts/gpu.sh bench \
        gated_delta_net,delta_net ${SHAPES:-2x8192} 1 2>&1 | grep -v Warn | tail -30 ;;
    warps|peers) bash scripts/gpu_session17.sh $part ;;
  esac
done
true
