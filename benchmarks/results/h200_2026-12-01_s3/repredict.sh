#!/usr/bin/env bash
# The model at HEAD on this session's and the second session's measured grids, each grid with
# the profile measured in its own lease (call 1's refitted from its samples with the robust fit).
# Writes repredict_<grid>.json here. Run from the repository root.
set -eu
G=benchmarks/results/h200_2026-12-01_s3
S2=benchmarks/results/h200_2026-12-01_s2
python benchmarks/repredict_grid.py --grid $G/call1_profile_validate/validate \
  --hardware $G/call1_profile_validate/h200-session-refit.toml -o $G/repredict_call1.json
python benchmarks/repredict_grid.py --grid $G/call3_cold_kv/validate \
  --hardware $G/call3_cold_kv/h200-session.toml -o $G/repredict_call3.json
python benchmarks/repredict_grid.py --grid $G/call4_cold_gap/validate \
  --hardware $G/call4_cold_gap/h200-session.toml -o $G/repredict_call4.json
python benchmarks/repredict_grid.py --grid $S2/call4_profile_validate/validate \
  --hardware $S2/call4_profile_validate/h200-session.toml -o $G/repredict_s2_call4.json
