#!/usr/bin/env bash
# The CPU suite on each Triton the README supports, one venv each (CI runs 3.6.0 alone: a second install
# and run would double its time). Generated code must run on all of them: the interpreter, the sm_90 AOT
# path (PTX-only compiles hook Triton's stages, whose protocol changed in 3.8) and TileLang's lowering.
#   bash scripts/triton_range.sh [VERSIONS] [PYTEST ARGS]   # default: 3.6.0 3.7.1 3.8.0 3.9.0, the fast tier
#   bash scripts/triton_range.sh "3.9.0" tests/test_aot.py   # one version, one file (the AOT checks are slow)
# Logs: /tmp/triton-range/<version>.log; the last line of each is pytest's summary.
set -uo pipefail
cd "$(dirname "$0")/.."
versions=${1:-3.6.0 3.7.1 3.8.0 3.9.0}
shift || true
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(-m "not slow")
mkdir -p /tmp/triton-range
for v in $versions; do
  venv=/tmp/triton-range/venv-$v
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    { "$venv/bin/pip" install -q torch==2.13.0
      "$venv/bin/pip" install -q -e ".[test,tilelang,bench]" "triton==$v" --config-settings editable_mode=compat
    } 2>&1 | grep -v "^WARNING: Location"  # a local index's notices
  fi
  EFFC_CACHE_DIR=/tmp/triton-range/cache-$v "$venv/bin/python" -m pytest -q -n auto -p no:cacheprovider "${args[@]}" \
    > "/tmp/triton-range/$v.log" 2>&1
  echo "triton $v: $(tail -1 "/tmp/triton-range/$v.log")"
done
