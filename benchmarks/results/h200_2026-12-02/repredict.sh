#!/usr/bin/env bash
# The model at HEAD on this session's grids that came back with their CSVs (calls 1 and 2), each
# with the profile of its own lease (call 4's grid is re-predicted from its log by analyze.py).
# Run from the repository root.
set -eu
G=benchmarks/results/h200_2026-12-02
for c in call1 call2; do
  python benchmarks/repredict_grid.py --grid $G/$c/validate --hardware $G/$c/h200-session.toml \
    -o $G/repredict_$c.json
done
