#!/usr/bin/env bash
# The 2026-12-07c session's GPU calls (item 0000000000000000000 of benchmarks/NEXT_GPU_RUN.md):
#   check:   bf16 gradients after the solve's 3D products, the serial loops' loads a chunk ahead and the shared
#            select lists (compiles for the A/B warm in parallel, outputs dropped)
#   ab:      the inverse alone, then gated_delta_net's (and mlstm_sig's) kernels from the tree, _ab2/ (before the
#            loads at their first reader) and _ab/ (before the session's four changes)
#   peers:   gpu_session15.sh's (fla beside the gated delta rules, forward and backward)
#   spill:   loads at their first reader only in kernels that spill (runtime.launch.spill_free): gated_delta_net
#            from the tree and _ab2/ (MLSTM=1: mlstm_sig too), at chunk 64, then fla beside it (PEERS_LIMIT)
# usage (device machine; carry .device/wheels-a, wheels-c, tlbundle.tar.xz and the _ab, _ab2 trees):
#   bash scripts/gpu_session16.sh [PART]...
. "$(dirname "$0")/gpu_env.sh"
profile() {  # TREE SPEC: the kernel table of SPEC at 2x8192 from TREE's effc, with TREE's own cache
  (cd $1 && PYTHONPATH=/tmp/site:$PWD EFFC_CACHE_DIR=/tmp/effc-cache-$(basename $1) \
    timeout ${PROFILE_LIMIT:-150} python3 $OLDPWD/scripts/kernel_profile.py $2 2x8192 2>&1 | grep -v Warn)
}
trees=". _ab2 _ab"
for part in ${@:-check ab}; do
  case $part in
    check)
      for t in $trees; do [ -d $t/effc ] && { profile $t gated_delta_net > /dev/null & }; done
      { profile . mlstm_sig > /dev/null & }
      timeout 290 bash scripts/gpu.sh test tests/gpu/test_bf16_grads.py -k "test_bf16_gradients and not \
every_partition and (gated_delta_net or delta_net or rwkv7 or hdla or simple_gla)" > $OUT/linear_check.log 2>&1
      grep -E "passed|failed|FAIL|Error" $OUT/linear_check.log | tail -12
      timeout 150 bash scripts/gpu.sh test tests/gpu/test_softmax_bf16.py -k "selection or sparse or row_partitions \
or key_heads_walked or (gradients and (moba or nsa or infllm or topp or dsa))" > $OUT/select_check.log 2>&1
      grep -E "passed|failed|FAIL|Error" $OUT/select_check.log | tail -12
      wait ;;
    ab)
      timeout 90 python3 scripts/inverse_ab.py 4096 32 64 2>&1 | grep -v Warn | tee $OUT/inverse_ab.log
      for t in $trees; do
        [ -d $t/effc ] && { echo "== $t gated_delta_net"; profile $t gated_delta_net | tee $OUT/gdn_profile_$(basename $t).log \
          | grep -v "^  -" | tail -24; }
      done
      for t in . _ab2; do echo "== $t mlstm_sig"; profile $t mlstm_sig | grep -v "^  -" | tail -20; done ;;
    peers) bash scripts/gpu_session15.sh peers ;;
    spill)
      timeout 150 bash scripts/gpu.sh test tests/gpu/test_bf16_grads.py -k "test_bf16_gradients and not \
every_partition and (gated_delta_net or mlstm_sig)" > $OUT/spill_check.log 2>&1 &
      for r in ". gated_delta_net" "_ab2 gated_delta_net" ${MLSTM:+". mlstm_sig"}; do { profile $r > /dev/null & }; done
      (CHUNK=64 profile . gated_delta_net > /dev/null) & wait
      grep -E "relative error|passed|failed|Error" $OUT/spill_check.log | cut -c1-160
      for r in ". gated_delta_net" "_ab2 gated_delta_net" ${MLSTM:+". mlstm_sig"}; do
        echo "== $r"; profile $r | tee "$OUT/spill_${r/ /_}.log" | grep -v "^  -" | tail -17
      done
      echo "== . gated_delta_net chunk 64"; CHUNK=64 profile . gated_delta_net | tee $OUT/gdn_c64.log | tail -17
      [ "${PEERS_LIMIT:-170}" = 0 ] || SPECS=gated_delta_net PEER_TIMEOUT=90 LIMIT=${PEERS_LIMIT:-170} bash scripts/gpu_session15.sh peers ;;
  esac
done
true
