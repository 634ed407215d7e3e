#!/usr/bin/env bash
# The model at HEAD on this session's grids, each with the profile of its own lease. Calls 3 and
# 4 ran the executor as it is at HEAD; calls 1 and 2 ran it before 069f53e (6 more operations
# per expert), so the model's op counts (hrm.roofline OPS_*) no longer describe them and they are
# not re-predicted. Run from the repository root.
set -eu
G=benchmarks/results/h200_2026-12-01_s4
for c in call3 call4; do
  python benchmarks/repredict_grid.py --grid $G/$c/validate --hardware $G/$c/h200-session.toml \
    -o $G/repredict_$c.json
done
