#!/usr/bin/env bash
# The first 2026-12-07g session's GPU calls (after scale_placement merged); parts of scripts/gpu_session20.sh and
# gpu_session19.sh run as there, plus:
#   probe2: the refused backwards at the tiles that fit: log_linear_attn's cut_common partition at block 32 (its
#           kernels need at most 168 KB of shared memory there, compiled for sm_90 on the CPU; at 64, 287 KB), and
#           mesanet's other partitions (cut, cut_each, block; loop faulted on 2026-12-07), each a gradient check
#           against the oracle in its own process (a fault loses only that process's context)
#   scalars: gated_delta_net's kernel table at 2x8192, the tree and `_scalars/` (branch serial-scalars rebased
#           on main: `git archive serial-scalars effc | tar x -C _scalars`), and both delta rules' in `_narrow/`
#           (tiles only tl.dot reads loaded in their storage dtype: TritonPrinter.dot_operands)
#   rerun: gated_delta_net's bench row beside fla with prep's cumsum merged, then scripts/step_gap.py and
#           scripts/host_overhead.py on it
# usage (device machine; carry .device/wheels-a, wheels-c, tlbundle.tar.xz): bash scripts/gpu_session21.sh [PART]...
. "$(dirname "$0")/gpu_env.sh"
for part in "$@"; do
  case $part in
    probe2)
      probe() { timeout 300 python3 scripts/grad_probe.py "$@" refused=run 2>&1 | grep -v Warn | tail -9 | sed "s/^/$1 $3: /"; }
      { probe log_linear_attn 2x2048x16 partition=cut_common block=32 >> $OUT/probe2.log; } &
      for p in cut cut_each block; do { probe mesanet 2x2048x16 partition=$p >> $OUT/probe2.log; } & done
      wait; echo "== refused backwards at the tiles that fit"; cat $OUT/probe2.log ;;
    scalars)
      RUNS=". . gated_delta_net;_scalars . gated_delta_net;_narrow . gated_delta_net;. . delta_net;_narrow . delta_net" bash "$(dirname "$0")/gpu_session20.sh" trees ;;
    rerun)  # gated_delta_net beside fla again (the 15:47 call's step was 0.8 ms above its kernels, its forward
            # 0.33 ms above, fla's forward 2x the fifth session's), then where the step's time goes
      SPECS=gated_delta_net SHAPES=2x8192 PEER_TIMEOUT=200 LIMIT=300 bash "$(dirname "$0")/gpu_session19.sh" peers
      (cd scripts && timeout 120 python3 step_gap.py gated_delta_net 2x8192 2>&1 | grep -v Warn | head -16 | tee $OUT/gap.log)
      (cd scripts && timeout 60 python3 host_overhead.py gated_delta_net 2x8192 2>&1 | grep HOST | tee -a $OUT/gap.log) ;;
    *) bash "$(dirname "$0")/gpu_session20.sh" $part ;;
  esac
done
true
