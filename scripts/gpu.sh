#!/usr/bin/env bash
# Run on the lent GPU machine (see ../shared/device/README.md). Writes logs under $OUT.
#   scripts/gpu.sh setup          # once per machine: wheels carried in .device/wheels-{a,c}
#   scripts/gpu.sh test           # GPU test suite (bf16 accuracy)
#   scripts/gpu.sh bench [ARGS]   # effc bench with the peers
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 EFFC_CACHE_DIR=/tmp/effc-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
case "${1:-}" in
  setup)
    for w in .device/wheels-a .device/wheels-c .device/wheels-b; do
      [ -d "$w" ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $w/*.whl
    done
    python3 -c "import torch, triton, fla, lark, typer; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" ;;
  test)
    shift; python3 -m pytest -q -s tests/gpu "$@" 2>&1 | tee "$OUT/gpu_tests.log" ;;
  bench)
    shift; python3 -m effc.cli bench --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log" ;;
  *) echo "usage: scripts/gpu.sh setup|test|bench"; exit 2 ;;
esac
