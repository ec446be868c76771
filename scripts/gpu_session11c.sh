#!/usr/bin/env bash
# The fifth 2026-12-06 session's last call: the serial kernels at two stages (Launcher._serial_options) checked
# on linear specs (bf16 gradients: the gated delta rules, a gated and an ungated segmentable walk, mlstm)
# and gated_delta_net's step timed, effc alone
. "$(dirname "$0")/gpu_env.sh"
timeout ${LIMIT:-75} bash scripts/gpu.sh test tests/gpu/test_bf16_grads.py -k "test_bf16_gradients and not every_partition \
and (gated_delta_net or gla or retention or mlstm)" 2>&1 | grep -E "passed|failed|FAIL|Error|skipped" | tail -12
OUT=$OUT/bench BACKWARD=1 timeout 45 bash scripts/gpu.sh bench gated_delta_net 2x8192 0 \
  2>&1 | grep -v Warn | grep -v '^{' | tail -4
true
