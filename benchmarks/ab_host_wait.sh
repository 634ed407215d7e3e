#!/usr/bin/env bash
# A/B of how the executor's threads wait for CUDA events (executor.schedule.HOST_WAIT): spin
# (CUDA's default) vs sleep (cudaEventBlockingSync), on one lease, alternating to see through the
# machine's drift: spin, sleep, spin, sleep, each a `hrm validate` of the same configurations
# (measured throughput and stage busy times; the predictions come from $PROFILE, not re-measured).
# CPU steal time (/proc/stat) and lscpu are logged, to tell the host's neighbours from the code.
#
#   PROFILE=h200-session.toml bash benchmarks/ab_host_wait.sh        # results in $W (/tmp/w)
#
# The validation grid pins every expert. STAGED=1 also runs, in each mode, the 1-layer mtbench
# benchmark of issue 7 (benchmarks/bench_continuous.py), whose weights partly go through the
# staging ring: the copy thread's threads run beside the waiting ones there.
set -u
W=${W:-/tmp/w}
ONLY=${ONLY:-"base attn=gpu schedule=cgopipe-serial schedule=layerwise n_ub=16 N=1024 N=1024,kernel=grouped prompt=512"}
mkdir -p "$W"
{ date -u; lscpu; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c 'import torch; print(torch.__version__, torch.version.cuda)'; } > "$W/machine.txt" 2>&1
args=(); for c in $ONLY; do args+=(--only "$c"); done
for run in spin.1 sleep.1 spin.2 sleep.2; do
  mode=${run%.*}
  echo "== $run $(date -u +%T) $(grep '^cpu ' /proc/stat)" | tee -a "$W/steal.log"
  COLUMNS=140 MOE_LIGHTNING_HOST_WAIT=$mode timeout "${T_RUN:-125}" python3 -m hrm.cli validate \
    --model mixtral-8x7b --num-layers 4 --full-model-gpu-mem 16 --hardware "$PROFILE" \
    --grid full --device cuda --no-spot-check --no-optimizer --no-drift-check --reruns 0 \
    "${args[@]}" -o "$W/$run" > "$W/$run.log" 2>&1
  echo "   exit $? $(date -u +%T) $(grep '^cpu ' /proc/stat)" | tee -a "$W/steal.log"
  if [ "${STAGED:-0}" = 1 ]; then
    echo "== $run staged $(date -u +%T) $(grep '^cpu ' /proc/stat)" | tee -a "$W/steal.log"
    MOE_LIGHTNING_HOST_WAIT=$mode timeout "${T_STAGED:-150}" python3 benchmarks/bench_continuous.py \
      --layers 1 --workloads mtbench --seqs-per-running 1.5 --hardware "$PROFILE" \
      --host-mem "${HOST_MEM:-120}" --out "$W/$run.staged" > "$W/$run.staged.log" 2>&1
    echo "   exit $? $(date -u +%T) $(grep '^cpu ' /proc/stat)" | tee -a "$W/steal.log"
  fi
done
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/$(basename "$W").tgz" -C "$(dirname "$W")" "$(basename "$W")"
fi
