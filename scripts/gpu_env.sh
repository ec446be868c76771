# Sourced by the GPU session scripts (device machine, repository root): the wheels carried in .device/ installed
# once per machine (scripts/gpu.sh setup), and the paths and logs folder every call uses.
set -uo pipefail
export OUT=${OUT:-/tmp/out} PYTHONUNBUFFERED=1
python3 -c "import fla, lark" 2>/dev/null || bash scripts/gpu.sh setup 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD EFFC_CACHE_DIR=/tmp/effc-cache
mkdir -p "$OUT"
