#!/usr/bin/env bash
# Run on the lent GPU machine (see ../shared/device/README.md). Writes logs under $OUT.
#   scripts/gpu.sh setup          # once per machine: wheels carried in .device/wheels-{a,c} (TileLang: b and d, or
#                                 # .device/tlbundle.tar.xz from scripts/tilelang_bundle.sh beside a and c)
#   scripts/gpu.sh test [FILE] [PYTEST ARGS]  # GPU test suite (bf16 accuracy), or one file of it
#   scripts/gpu.sh bench [SPECS SHAPES PEERS]  # effc bench with the peers; env BACKWARD=1, BACKENDS=triton,tilelang, PLOT=path.png, KV_HEADS=1,
#                                               DIMS=64,96,128,192 (head dims: several add the time-per-FLOP table)
#   scripts/gpu.sh decode [SPECS SHAPES]   # decoding steps against a KV cache (effc bench --decode); env KV_HEADS, D
#   scripts/gpu.sh tune-check [ARGS]  # effc tune acceptance from cold caches (scripts/tune_check.py --help)
# env TRITON_SITE=DIR puts a Triton unpacked in DIR ahead of the machine's (scripts/gpu_triton.sh)
set -uo pipefail
export PYTHONPATH=${TRITON_SITE:+$TRITON_SITE:}/tmp/site:$PWD PYTHONUNBUFFERED=1 EFFC_CACHE_DIR=${EFFC_CACHE_DIR:-/tmp/effc-cache}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ "${1:-}" != setup ] && ! python3 -c "import lark, fla" 2>/dev/null && bash "$0" setup
case "${1:-}" in
  setup)
    for w in .device/wheels-a .device/wheels-c .device/wheels-b .device/wheels-d; do
      [ -d "$w" ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $w/*.whl
    done
    # TileLang with its native dependencies in one archive (scripts/tilelang_bundle.sh), carried instead of b and d
    [ -f .device/tlbundle.tar.xz ] && mkdir -p /tmp/site && tar xJf .device/tlbundle.tar.xz -C /tmp/site
    python3 -c "import torch, triton, fla, lark, typer; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" ;;
  test)
    shift; where=tests/gpu; [[ "${1:-}" == tests/* ]] && { where=$1; shift; }  # a file or test id: only it
    python3 -m pytest -q -s "$where" "$@" 2>&1 | tee "$OUT/gpu_tests.log" ;;
  bench)  # SPECS SHAPES PEERS(0/1); typer on the GPU machine would need pydantic, so call run_bench directly
    python3 -c "import sys; from effc.tools.bench import run_bench; run_bench(sys.argv[1].split(','),
      [tuple(map(int, s.split('x'))) for s in sys.argv[2].split(',')], 16, tuple(map(int, '${DIMS:-128}'.split(','))), sys.argv[3] == '1', float('${PEER_TIMEOUT:-300}'),
      '$OUT/bench.json', backward='${BACKWARD:-0}' == '1', backends=tuple('${BACKENDS:-triton}'.split(',')), plot='${PLOT:-}' or None,
      kv_heads=int('${KV_HEADS:-0}') or None)" "${2:-retention,simple_gla,gla}" "${3:-8x2048,2x8192,1x32768}" "${4:-1}" 2>&1 | tee -a "$OUT/bench.log" ;;
  decode)  # SPECS SHAPES (B requests x T cached tokens), 16 query heads; env KV_HEADS (default 2), NEW_TOKENS, D
    python3 -c "import sys; from effc.tools.bench_decode import run_decode_bench; run_decode_bench(sys.argv[1].split(','),
      [tuple(map(int, s.split('x'))) for s in sys.argv[2].split(',')], 16, int('${KV_HEADS:-2}'), int('${D:-128}'),
      int('${NEW_TOKENS:-1}'), '$OUT/decode.json')" "${2:-softmax_attn,moba}" "${3:-8x32768,64x4096}" 2>&1 | tee -a "$OUT/decode.log" ;;
  tune-check)
    shift; python3 scripts/tune_check.py "$@" 2>&1 | tee "$OUT/tune_check.log"; exit "${PIPESTATUS[0]}" ;;
  *) echo "usage: scripts/gpu.sh setup|test|bench|decode|tune-check"; exit 2 ;;
esac
