#!/usr/bin/env bash
# One device call of the session of 2026-12-02 (run from the repository root on the GPU
# machine, device tool; results in $W):
#   main: hrm profile (no pin probe) and hrm validate --grid full on it (device_session.sh), with
#      N=1024's trace kept (the launcher track: the main thread's host time)
#   omp: CPU attention with idle OpenMP threads kept spinning: diag_cpu_attention_threads.py
#      --kv-only under the default wait policy, OMP_WAIT_POLICY=ACTIVE and GOMP_SPINCOUNT=10M
#      (set before torch loads)
#   variants: N=1024 alone under the same profile with Python's switch interval at 5 ms (the default)
#      instead of the executor's 0.5 ms, and with OMP_WAIT_POLICY=ACTIVE
#   spin: N=1024 alone with GOMP_SPINCOUNT=10M
# STEPS selects (default: "main omp variants"). Calls are listed in README.md.
set -u
W=${W:-/tmp/w}
mkdir -p "$W"
git rev-parse HEAD > "$W/commit.txt"; git status --short >> "$W/commit.txt"
lscpu > "$W/lscpu.txt"
P=$W/h200-session.toml
one() {  # one() NAME ENV... -- validate N=1024 alone into $W/NAME
  local name=$1; shift
  env "$@" COLUMNS=140 timeout 90 python3 -c "import sys, executor.schedule as s
if len(sys.argv) > 1 and sys.argv[1] == 'switch5': s.SWITCH_INTERVAL_S = 0.005
from hrm.cli import app
sys.argv = ['hrm', 'validate', '--model', 'mixtral-8x7b', '--num-layers', '4',
            '--full-model-gpu-mem', '16', '--hardware', '$P', '--grid', 'full', '--device',
            'cuda', '--only', 'N=1024', '--trace-config', 'N=1024', '--no-optimizer',
            '--no-spot-check', '-o', '$W/$name']
app()" "$name" > "$W/$name.log" 2>&1
  echo "   $name exit $?"
}
for step in ${STEPS:-main omp variants}; do
  echo "== $step $(date -u +%T)"
  case $step in
    main) W=$W NAME=h200-session PIN_PROBE_GIB=0 STEPS="profile validate" T_PROFILE=150 \
            T_VALIDATE=${T_VALIDATE:-290} VALIDATE_ARGS="${VALIDATE_ARGS:---trace-config N=1024}" \
            bash benchmarks/device_session.sh ;;
    omp) for v in default OMP_WAIT_POLICY=ACTIVE GOMP_SPINCOUNT=10000000; do
           d=$W/omp_${v%%=*}; e=(); [ "$v" != default ] && e=("$v")
           env "${e[@]}" timeout 40 python3 benchmarks/diag_cpu_attention_threads.py --kv-only \
             --out "$d" > "$d.log" 2>&1; echo "   $v exit $?"
         done ;;
    variants) one switch5 ; one omp_active OMP_WAIT_POLICY=ACTIVE ;;
    spin) one spin GOMP_SPINCOUNT=10000000 ;;
  esac
done
echo "== done $(date -u +%T)"
