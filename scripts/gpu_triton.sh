#!/usr/bin/env bash
# A Triton other than the GPU machine's 3.6, for the README's range (3.6 to 3.9): packed on the CPU machine by
# scripts/pack_triton.sh as .device/triton-<VERSION>.tar.xz (under 64 MiB) and carried alone in a call. Where
# Triton >= 3.7.1 runs, policy.triton_faults lifts its Triton 3.6 holds (the 4-warp chain rule; the 32-wide
# blocks of long dot chains), so this is where they are checked; Triton 3.7.1 ran here on 2026-12-06.
#   TRITON_VERSION=3.9.0 bash scripts/gpu_triton.sh unpack|check|bench
set -uo pipefail
v=${TRITON_VERSION:-3.9.0}
export OUT=${OUT:-/tmp/out} PYTHONUNBUFFERED=1 TRITON_SITE=/tmp/triton-$v EFFC_CACHE_DIR=/tmp/effc-cache-$v
mkdir -p "$OUT" "$TRITON_SITE"
[ -d "$TRITON_SITE/triton" ] || tar xJf ".device/triton-$v.tar.xz" -C "$TRITON_SITE"
python3 -c "import lark" 2>/dev/null || bash scripts/gpu.sh setup 2>&1 | tail -1
PYTHONPATH=$TRITON_SITE:/tmp/site:$PWD python3 -c "import triton, torch; print('triton', triton.__version__, torch.__version__)"
case "${1:-check}" in
  unpack) ;;
  check)  # one spec a process: a fault loses the CUDA context
    for t in ${LINEAR:-gated_delta_net mlstm_sig}; do echo "test_bf16_grads.py::test_bf16_gradients[$t]"; done > /tmp/ids
    for t in ${SOFTMAX:-softmax_attn moba}; do echo "test_softmax_bf16.py::test_bf16_gradients[$t]"; done >> /tmp/ids
    while read -r id; do
      timeout ${LIMIT:-150} bash scripts/gpu.sh test "tests/gpu/$id" 2>&1 \
        | tee "$OUT/t${v}_${id//[^a-z_]/_}.log" | grep -E "passed|failed|FAIL|Error" | tail -4
    done < /tmp/ids ;;
  bench)
    OUT=$OUT/t$v BACKWARD=1 timeout ${LIMIT:-150} bash scripts/gpu.sh bench ${SPECS:-gated_delta_net} ${SHAPES:-2x8192} 0 \
      2>&1 | grep -v Warn | grep -v '^{' | tail -6 ;;
esac
true
