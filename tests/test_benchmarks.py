"""The GPU benchmark scripts stay runnable: their CPU paths (bench_multigpu on a tiny model with
gloo, bench_continuous's dry run) on the CI machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)


def test_bench_multigpu_runs_one_and_two_processes_on_the_cpu(tmp_path) -> None:
    proc = _run("bench_multigpu.py", "--device", "cpu", "--model", "tiny-mixtral", "--layers",
                "2", "--num-seqs", "8", "--batch-size", "8", "--micro-batch-size", "4",
                "--gen-len", "3", "--parallelisms", "tp", "--hardware", "h200x2-quick",
                "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "multigpu_tiny-mixtral_2layers_gen3.json").read_text())
    runs = {r["name"]: r for r in doc["runs"]}
    assert set(runs) == {"gpus1", "gpus2_tp"} and not any("error" in r for r in runs.values())
    assert runs["gpus2_tp"]["num_gpus"] == 2 and runs["gpus2_tp"]["predicted_throughput_tok_s"]
    assert {"machine", "command", "date"} <= set(doc) and "gpus2_tp" in doc["scaling"]


def test_bench_continuous_dry_run_plans_both_schedulers(tmp_path) -> None:
    proc = _run("bench_continuous.py", "--layers", "1", "--workloads", "mtbench", "--dry-run",
                "--host-mem", "125", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--scheduler static" in proc.stdout and "--scheduler continuous" in proc.stdout
