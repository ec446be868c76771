#!/usr/bin/env bash
# The README's newest tested Triton on the GPU machine (which ships 3.6): Triton 3.7.1 for Python 3.12,
# stripped and packed on the CPU machine (libtriton.so without symbols; no AMD backend, profiler, cupti;
# 43 MiB as .device/triton37/t37.tar.xz), carried alone in a call. Where Triton >= 3.7.1 runs,
# policy.triton_faults lifts its Triton 3.6 holds (the 4-warp chain rule; mesanet's and log_linear_attn's
# refused backward), so this is where they are checked.
#   bash scripts/gpu_triton37.sh unpack|check|bench
set -uo pipefail
export OUT=${OUT:-/tmp/out} PYTHONUNBUFFERED=1 TRITON_SITE=/tmp/t37 EFFC_CACHE_DIR=/tmp/effc-cache-37
mkdir -p "$OUT" "$TRITON_SITE"
[ -d $TRITON_SITE/triton ] || tar xJf .device/triton37/t37.tar.xz -C $TRITON_SITE
sed -i '/amd/d' $TRITON_SITE/triton-3.7.1.dist-info/entry_points.txt  # the AMD backend is not packed
python3 -c "import lark" 2>/dev/null || bash scripts/gpu.sh setup 2>&1 | tail -1
PYTHONPATH=$TRITON_SITE:/tmp/site:$PWD python3 -c "import triton, torch; print('triton', triton.__version__, torch.__version__)"
case "${1:-check}" in
  unpack) ;;
  check)  # one spec a process: a fault loses the CUDA context
    for s in ${SPECS:-mesanet log_linear_attn gated_delta_net}; do
      timeout ${LIMIT:-150} bash scripts/gpu.sh test "tests/gpu/test_bf16_grads.py::test_bf16_gradients[$s]" 2>&1 \
        | tee $OUT/t37_$s.log | grep -E "passed|failed|FAIL|Error" | tail -4
    done ;;
  bench)
    OUT=$OUT/t37 BACKWARD=1 timeout ${LIMIT:-150} bash scripts/gpu.sh bench ${SPECS:-gated_delta_net} ${SHAPES:-2x8192} 0 \
      2>&1 | grep -v Warn | grep -v '^{' | tail -6 ;;
esac
true
