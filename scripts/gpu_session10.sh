#!/usr/bin/env bash
# The 2026-12-06 (fourth session) calls. Each carries .device/wheels-a and wheels-c.
#   check:  bf16 gradients of every partition (the cut now covers dg: a scalar sum crosses kernels at the
#           chunk's last token) and of the long-chain plans (backward warps now per kernel)
#   parts:  gated_delta_net and gated_delta_net_l2 at 2x8192, kernel by kernel, per gradient partition
#   gated:  the gated delta rules' training beside fla's chunk_gated_delta_rule (whose backward needs TileLang
#           on Triton 3.6: carry .device/wheels-b alone, in a call right after one that ran setup)
#   mlstm:  the cut for every cut-able kernel (mlstm, mlstm_sig, lion_s): bf16 gradients of every partition,
#           loop against cut kernel by kernel, mlstm_sig beside mlstm_kernels
#   fwd24:  mesanet and log_linear_attn at the model's block (their refused backward no longer narrows it): the
#           bf16 forward check, then beside fla at 8x2048
# usage (device machine): bash scripts/gpu_session10.sh check|parts|gated|mlstm|fwd24
. "$(dirname "$0")/gpu_env.sh"
case "${1:-}" in
  check)
    timeout ${LIMIT:-200} bash scripts/gpu.sh test tests/gpu/test_bf16_grads.py \
      -k "${CHECK:-every_partition or rwkv7 or hdla or zeros}" 2>&1 | grep -E "passed|failed|FAIL|Error" | tail -8 ;;
  parts)
    for spec in ${SPECS:-gated_delta_net gated_delta_net_l2}; do
      for p in ${PARTS:-loop cut cut_each}; do
        PARTITION=$p timeout 120 python3 scripts/kernel_profile.py $spec ${SHAPE:-2x8192} 2>&1 | grep -v Warn \
          | tee "$OUT/profile_${spec}_$p.log" | grep -A9 "PROFILE.*forward+backward"
      done
    done ;;
  gated)
    python3 -c "import tilelang" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
      --target /tmp/site .device/wheels-b/*.whl
    for spec in ${SPECS:-gated_delta_net gated_delta_net_l2}; do
      OUT=$OUT/$spec BACKWARD=1 PEER_TIMEOUT=${PEER_TIMEOUT:-240} timeout ${LIMIT:-280} bash scripts/gpu.sh bench \
        $spec ${SHAPES:-2x8192,8x2048} 1 2>&1 | grep -v Warn | grep -v '^{' | tail -8
    done ;;
  mlstm)
    CHECK="every_partition and (gated_delta_net or mlstm or lion_s)" LIMIT=270 bash "$0" check
    SPECS="mlstm_sig mlstm" PARTS="loop cut" bash "$0" parts
    OUT=$OUT/mlstm_sig BACKWARD=1 PEER_TIMEOUT=120 timeout 150 bash scripts/gpu.sh bench mlstm_sig 2x8192 1 2>&1 \
      | grep -v Warn | grep -v '^{' | tail -6 ;;
  fwd24)
    timeout 150 bash scripts/gpu.sh test tests/gpu/test_bf16_accuracy.py -k "mesanet or log_linear" 2>&1 \
      | grep -E "passed|failed|FAIL|Error" | tail -5
    for s in mesanet log_linear_attn; do
      OUT=$OUT/lib24-$s PEER_TIMEOUT=${PEER_TIMEOUT:-150} timeout ${LIMIT:-170} bash scripts/gpu.sh bench $s \
        ${SHAPES:-8x2048} 1 2>&1 | grep -v Warn | grep -v '^{' | tail -4
    done ;;
  *) echo "usage: scripts/gpu_session10.sh check|parts|gated|mlstm|fwd24"; exit 2 ;;
esac
