#!/usr/bin/env bash
# One device session on the GPU machine (device tool): profile the machine, then validate the
# model on it and benchmark the executor, each step under its own time limit so that one call
# (10 minutes at most) returns whatever finished. Results land in $W (default /tmp/w).
#
#   STEPS="profile validate attention" bash benchmarks/device_session.sh
#
# Steps (in the order given):
#   profile     hrm profile (full, pinned-memory probe up to $PIN_PROBE_GIB, default 72 GiB;
#               0 skips it) -> $W/<name>.toml
#   validate    hrm validate --grid full, Mixtral-8x7B shapes, first $LAYERS layers, GPU cap scaled
#               from 16 GiB for the full model, on $PROFILE (default: the one just measured);
#               $VALIDATE_ARGS, e.g. "--only base --only n_ub=16"
#   attention   benchmarks/bench_executor.py --attention (CPU decode attention kernels)
#   continuous  benchmarks/bench_continuous.py --layers 1 on $PROFILE ($CONT_ARGS)
#   executor    benchmarks/bench_executor.py --layers $LAYERS on $PROFILE ($BENCH_ARGS)
#   launch      benchmarks/diag_launch_blocks.py on Mixtral-8x7B shapes: the launching thread's
#               time per decode block, the executor's against transformers' form (about 20 s)
# Under the device tool ($OUT set) the results are packed into $OUT/$(basename $W).tgz at the end:
# the tool returns a limited number of files from $OUT, so $W must not be inside it (2026-12-02:
# a grid written straight into $OUT lost its CSVs).
# Measured 2026-12-01: a validation right after the profile's 72 GiB pinned-memory probe, in the
# same call, ran CPU attention 3x slower throughout. To validate on the lease just profiled (the
# user's flow; leases of one kind differ), skip the probe: PIN_PROBE_GIB=0 STEPS="profile
# validate" (about 85 s + 230 s, third session of 2026-12-01; 90-125 s + 195-256 s on
# 2026-12-02, before the per-configuration warm-up and the two grouped-kernel points).
set -u
W=${W:-/tmp/w}
if [ -n "${OUT:-}" ] && [[ "$(realpath -m "$W")" == "$(realpath -m "$OUT")"* ]]; then
  echo "W=$W is inside \$OUT=$OUT: the device tool returns only a few files from it" >&2; exit 2
fi
NAME=${NAME:-h200-machine}
LAYERS=${LAYERS:-4}
PROFILE=${PROFILE:-$W/$NAME.toml}
mkdir -p "$W"
{ date -u; lscpu; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc;
  free -g; git rev-parse HEAD; python3 -c 'import torch; print(torch.__version__, torch.version.cuda)'
} > "$W/machine.txt" 2>&1
for step in ${STEPS:-profile validate attention}; do
  echo "== $step $(date -u +%T)"
  grep '^cpu ' /proc/stat | sed "s/^/$step before: /" >> "$W/steal.log"  # steal: 8th number
  case $step in
    profile) timeout "${T_PROFILE:-220}" python3 -m hrm.cli profile -o "$W/$NAME.toml" \
               --name "$NAME" --pin-probe-gib "${PIN_PROBE_GIB:-72}" --raw-json "$W/profile_raw.json" \
               > "$W/profile.log" 2>&1 ;;
    validate) COLUMNS=140 timeout "${T_VALIDATE:-360}" python3 -m hrm.cli validate \
               --model mixtral-8x7b --num-layers "$LAYERS" --full-model-gpu-mem 16 \
               --hardware "$PROFILE" --grid full --device cuda ${VALIDATE_ARGS:-} -o "$W/validate" \
               > "$W/validate.log" 2>&1 ;;
    attention) timeout "${T_ATTENTION:-60}" python3 benchmarks/bench_executor.py --attention \
               --out "$W" > "$W/attention.log" 2>&1 ;;
    continuous) timeout "${T_CONTINUOUS:-300}" python3 benchmarks/bench_continuous.py --layers 1 \
               --hardware "$PROFILE" --host-mem "${HOST_MEM:-120}" \
               --deadline-s "${DEADLINE_CONTINUOUS:-200}" \
               --run-timeout-s "${RUN_TIMEOUT_CONTINUOUS:-120}" ${CONT_ARGS:-} --out "$W/continuous" \
               > "$W/continuous.log" 2>&1 ;;
    executor) timeout "${T_EXECUTOR:-300}" python3 benchmarks/bench_executor.py --layers "$LAYERS" \
               --hardware "$PROFILE" --host-mem "${HOST_MEM:-120}" ${BENCH_ARGS:-} \
               --out "$W/executor" > "$W/executor.log" 2>&1 ;;
    launch) timeout "${T_LAUNCH:-90}" python3 benchmarks/diag_launch_blocks.py \
               --model mixtral-8x7b --device cuda -o "$W/diag_launch_blocks.json" \
               > "$W/launch.log" 2>&1 ;;
    *) echo "unknown step $step" ;;
  esac
  echo "   exit $? $(date -u +%T)"
  grep '^cpu ' /proc/stat | sed "s/^/$step after: /" >> "$W/steal.log"
done
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/$(basename "$W").tgz" -C "$(dirname "$W")" "$(basename "$W")"
  echo "== packed $W into $OUT/$(basename "$W").tgz"
fi
