"""`hrm validate`: error arithmetic and summary (pure), the grids, the GPU-cap scaling, the shared
model's expert split, and one quick grid end to end on the CPU stand-in (tiny Mixtral)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hrm.hardware import load_profile
from hrm.model import from_hf_config, load_model_spec
from hrm.units import GiB
from hrm.validate import (
    DRIFT_WARN_PCT,
    FULL,
    QUICK,
    ValidationError,
    drift,
    optimizer_gap_pct,
    optimizer_twin,
    pct_error,
    pooled_optimizer_gap,
    rerun_rows,
    scaled_gpu_cap_bytes,
    select_configs,
    stage_errors,
    steal_pct,
    steal_summary,
    summarize,
)


# ---- pure arithmetic -------------------------------------------------------------------------
def test_pct_error_sign_and_missing() -> None:
    assert pct_error(110.0, 100.0) == pytest.approx(10.0)     # optimistic model: positive
    assert pct_error(90.0, 100.0) == pytest.approx(-10.0)
    assert math.isnan(pct_error(1.0, 0.0))
    assert math.isnan(pct_error(None, 1.0))
    assert math.isnan(pct_error(1.0, math.nan))


def test_optimizer_gap() -> None:
    assert optimizer_gap_pct(97.0, [50.0, 100.0]) == pytest.approx(3.0)
    assert optimizer_gap_pct(120.0, [50.0, 100.0]) == pytest.approx(-20.0)


def _row(name: str, pred: float, meas: float, role: str = "grid", prompt: int = 128,
         gen: int = 16, gpu_err: float = 1.0, cpu_err: float = math.nan) -> dict:
    return {"config": name, "role": role, "ran": True, "batch_size": 8, "micro_batch_size": 4,
            "attn_decode_device": "cpu", "weights_gpu_fraction": 0.0, "schedule": "cgopipe",
            "expert_kernel": "loop",
            "prompt_len": prompt, "gen_len": gen, "predicted_tok_s": pred,
            "measured_tok_s": meas, "throughput_error_pct": pct_error(pred, meas),
            "bottleneck": "link", "gpu_mem_error_pct": gpu_err, "cpu_mem_error_pct": cpu_err}


def test_summary_mape_worst_gap_memory() -> None:
    rows = [_row("a", 105.0, 100.0), _row("b", 80.0, 100.0, gpu_err=-4.0, cpu_err=7.0),
            _row("c", 300.0, 200.0, prompt=512),              # other workload: not in the gap
            {**_row("d", 1.0, 1.0), "ran": False},            # did not run: not scored
            _row("optimizer", 95.0, 190.0, role="optimizer")]
    optimizer = {"ran": True, "prompt_len": 128, "gen_len": 16, "measured_tok_s": 90.0}
    s = summarize(rows, [], optimizer, {"model": "m"})
    assert s["n_configs"] == 3 and s["n_not_run"] == 1
    assert s["throughput_mape"] == pytest.approx((5 + 20 + 50) / 3)
    assert s["worst_config"]["config"] == "c" and s["worst_abs_pct_error"] == pytest.approx(50)
    assert s["optimizer_gap_pct"] == pytest.approx(10.0)     # best same-workload grid: 100
    assert s["mem_max_abs_pct_error"] == pytest.approx(7.0)
    assert s["meets_targets"]["mem_max_abs_pct_error"] is False
    assert s["model"] == "m"


def test_optimizer_twin_is_the_grid_point_with_the_same_policy() -> None:
    """Where the optimizer picked a grid point's policy and workload, the gap holds the two
    runs' spread, and the summary names the twin."""
    rows = [_row("a", 105.0, 100.0), _row("b", 80.0, 104.0, prompt=512),
            {**_row("optimizer", 105.0, 96.0, role="optimizer"), "weights_gpu_fraction": 1e-12}]
    twin = optimizer_twin(rows)
    assert twin["config"] == "a" and twin["spread_pct"] == pytest.approx(4.0)
    rows[-1]["micro_batch_size"] = 2                  # another policy: no twin
    assert optimizer_twin(rows) is None
    assert optimizer_twin(rows[:2]) is None           # no optimizer row


def test_reruns_are_the_optimizer_and_the_best_other_policies_of_its_workload() -> None:
    rows = [_row("a", 1.0, 100.0), {**_row("a2", 1.0, 99.0), "config": "a2"},
            _row("b", 1.0, 98.0), _row("c", 1.0, 300.0, prompt=512),     # another workload
            {**_row("d", 1.0, 500.0), "ran": False}, _row("e", 1.0, 90.0),
            {**_row("optimizer", 1.0, 95.0, role="optimizer"), "micro_batch_size": 2}]
    rows[2]["micro_batch_size"] = 8        # b: another policy; a2 is a's policy
    rows[5]["micro_batch_size"] = 1
    picked = rerun_rows(rows, 2)
    assert [r["config"] for r in picked] == ["optimizer", "a", "b"]
    assert [r["config"] for r in rerun_rows(rows, 5)] == ["optimizer", "a", "b", "e"]
    assert rerun_rows(rows[:-1], 2) == []                                # no optimizer run


def test_pooled_gap_takes_each_policys_mean() -> None:
    """Single runs: the optimizer 4% behind a; with one rerun each, their means are 1.5% apart,
    and a policy measured once (b) competes with its one run."""
    opt = {**_row("optimizer", 1.0, 96.0, role="optimizer"), "micro_batch_size": 2}
    rows = [_row("a", 1.0, 100.0), {**_row("b", 1.0, 97.0), "micro_batch_size": 8}, opt]
    assert pooled_optimizer_gap(rows) is None                            # no rerun yet
    rows += [{**opt, "role": "rerun", "measured_tok_s": 101.0}, _row("a", 1.0, 99.0, "rerun")]
    pooled = pooled_optimizer_gap(rows)
    assert pooled["optimizer_mean_tok_s"] == pytest.approx(98.5)
    assert pooled["best_config"] == "a" and pooled["best_mean_tok_s"] == pytest.approx(99.5)
    assert pooled["gap_pct"] == pytest.approx(100 * (99.5 - 98.5) / 99.5)
    assert pooled["best_other_config"] == "a"
    assert pooled["margin_pct"] == pytest.approx(100 * (98.5 - 99.5) / 99.5)
    assert pooled["runs_per_policy"] == {"a": [100.0, 99.0], "b": [97.0],
                                         "optimizer": [96.0, 101.0]}
    s = summarize(rows, [], {"ran": True, "prompt_len": 128, "gen_len": 16,
                             "measured_tok_s": 96.0}, {})
    assert s["optimizer_gap_pct"] == pytest.approx(pooled["gap_pct"])
    assert s["optimizer_gap_single_run_pct"] == pytest.approx(4.0)
    assert s["n_configs"] == 2                                           # reruns not scored


def test_steal_is_the_share_of_cpu_time_the_hypervisor_took() -> None:
    from hrm.validate import cpu_jiffies, cpu_jiffies_of

    assert steal_pct((10, 1000), (30, 2000)) == pytest.approx(2.0)
    # a logged line (device_session.sh): user nice system idle iowait irq softirq steal guest..
    assert cpu_jiffies_of("validate before: cpu  1 2 3 4 5 6 7 8 9 10") == (8, 36)
    assert cpu_jiffies_of("cpu  1 2 3") is None
    assert math.isnan(steal_pct(None, (30, 2000))) and math.isnan(steal_pct((1, 5), (1, 5)))
    first = cpu_jiffies()
    if first is not None:                       # Linux: /proc/stat
        assert 0 <= first[0] <= first[1]
        sum(range(3_000_000))                   # a few ticks of CPU time
        assert 0.0 <= steal_pct(first, cpu_jiffies()) <= 100.0


def test_steal_summary_names_configurations_on_a_shared_machine() -> None:
    rows = [{**_row("a", 110.0, 100.0), "cpu_steal_pct": 0.1},
            {**_row("b", 150.0, 100.0), "cpu_steal_pct": 2.0},
            {**_row("c", 96.0, 100.0), "cpu_steal_pct": 0.0}]
    s = steal_summary(rows)
    assert s["configs_over_warn"] == ["b"] and s["max_pct"] == pytest.approx(2.0)
    assert s["throughput_mape_without_them"] == pytest.approx(7.0)
    assert summarize(rows, [], None, {})["cpu_steal"] == s
    assert steal_summary([_row("a", 1.0, 1.0)]) is None            # not measured


def test_summary_without_runs_is_an_error() -> None:
    with pytest.raises(ValidationError, match="no configuration"):
        summarize([{**_row("a", 1.0, 1.0), "ran": False}], [], None, {})


@given(st.lists(st.tuples(st.floats(0.1, 1e4), st.floats(0.1, 1e4)), min_size=1, max_size=30))
def test_mape_is_the_mean_and_bounded_by_the_worst(pairs: list[tuple[float, float]]) -> None:
    rows = [_row(str(i), p, m) for i, (p, m) in enumerate(pairs)]
    s = summarize(rows, [], None, {})
    errors = [abs(pct_error(p, m)) for p, m in pairs]
    assert s["throughput_mape"] == pytest.approx(sum(errors) / len(errors))
    assert s["throughput_mape"] <= s["worst_abs_pct_error"] + 1e-9
    assert s["worst_abs_pct_error"] == pytest.approx(max(errors))


def test_drift_compares_the_repeat_with_the_first_measurement() -> None:
    """The first configuration measured again at the end: throughput and the busy time of each
    stage that is not noise against the first run; the repeat is not scored in the MAPE."""
    def stages(role: str, cpu_s: float) -> list[dict]:
        return [{"config": "a", "role": role, "stage": stage, "measured_s": t}
                for stage, t in (("layer (overlap)", 0.05), ("gpu", 0.02), ("cpu_attn", cpu_s),
                                 ("d2h", 0.0004 if role == "grid" else 0.004))]
    rows = [_row("a", 100.0, 100.0), _row("b", 90.0, 100.0),
            _row("a", 100.0, 95.0, role="repeat")]
    out = drift(rows, stages("grid", 0.01) + stages("repeat", 0.025))
    assert out["config"] == "a" and out["worst"] == "cpu_attn"
    assert out["ratios"]["cpu_attn"] == pytest.approx(2.5)
    assert out["ratios"]["throughput"] == pytest.approx(0.95)
    assert out["max_pct"] == pytest.approx(150.0) and out["max_pct"] > DRIFT_WARN_PCT
    assert "d2h" not in out["ratios"]              # under 5% of the layer: noise
    s = summarize(rows, [], None, {})
    assert s["n_configs"] == 2 and s["throughput_mape"] == pytest.approx(5.0)
    assert drift(rows[:2], []) is None                # no repeat, no drift
    first_failed = [{**rows[0], "ran": False}, *rows[1:]]
    assert drift(first_failed, []) is None            # nothing to compare the repeat with


def test_stage_errors_skip_unscored() -> None:
    rows = [{"stage": "gpu", "error_pct": 10.0}, {"stage": "gpu", "error_pct": -30.0},
            {"stage": "d2h", "error_pct": math.nan}]
    out = stage_errors(rows)
    assert out == {"gpu": {"mape": 20.0, "mean_signed_pct": -10.0, "n": 2}}


# ---- grids -----------------------------------------------------------------------------------
def test_full_grid_covers_the_axes() -> None:
    configs = FULL.configs()
    assert len(configs) >= 20
    assert len({c.name for c in configs}) == len(configs)
    keys = {(c.policy, c.workload.prompt_len, c.workload.gen_len) for c in configs}
    assert len(keys) == len(configs), "two grid points are the same configuration"
    for axis in (lambda c: c.policy.batch_size, lambda c: c.policy.num_micro_batches,
                 lambda c: c.policy.weights_gpu_fraction, lambda c: c.policy.attn_decode_device,
                 lambda c: c.policy.schedule, lambda c: c.workload.prompt_len,
                 lambda c: c.workload.gen_len):
        assert len({axis(c) for c in configs}) >= 2
    assert all(c.workload.num_seqs == c.policy.batch_size for c in configs)


def test_quick_grid_is_small() -> None:
    configs = QUICK.configs()
    assert 4 <= len(configs) <= 8
    assert max(c.policy.batch_size * c.workload.gen_len for c in configs) <= 256


# ---- GPU cap for a truncated model -----------------------------------------------------------
def test_scaled_gpu_cap() -> None:
    from hrm.cost import cost_terms

    full = load_model_spec("mixtral-8x7b")
    eight = from_hf_config({**_mixtral_config(), "num_hidden_layers": 8}, name="m8")
    hw = load_profile("h100")
    base = FULL.configs()[0]
    # the full model itself gets its own cap back
    assert scaled_gpu_cap_bytes(full, full, hw, 16 * GiB, base) == pytest.approx(16 * GiB,
                                                                                 rel=1e-6)
    cap = scaled_gpu_cap_bytes(full, eight, hw, 16 * GiB, base)
    assert 2 * GiB < cap < 16 * GiB

    def max_r_w(spec, cap_bytes: float) -> float:
        terms = cost_terms(spec, hw.with_memory(gpu_memory_bytes=cap_bytes), base.workload,
                           base.policy)
        return max(r / 1000 for r in range(1001)
                   if terms.gpu_need_bytes(r / 1000, 0.0) <= terms.gpu_capacity_bytes)

    assert max_r_w(eight, cap) == pytest.approx(max_r_w(full, 16 * GiB), abs=2e-3)
    with pytest.raises(ValidationError, match="does not fit"):
        scaled_gpu_cap_bytes(full, eight, hw, 1 * GiB, base)


def _mixtral_config() -> dict:
    from executor.weights import read_model

    return read_model("mixtral-8x7b")[1]


# ---- the shared model and the end-to-end run (torch) -----------------------------------------
@pytest.fixture(scope="module")
def shared():
    torch = pytest.importorskip("torch")
    from hrm.validate import SharedModel

    return SharedModel("tiny-mixtral", torch.device("cpu"), pin_budget_bytes=0.0, seed=0)


def test_shared_model_split_is_a_placement_not_new_weights(shared) -> None:
    """Experts 0..R-1 of a layer copied to the 'GPU', R.. streamed as a view of the shared
    buffer; generation is identical whatever the split."""
    import torch

    from executor.engine import Engine, plan_memory
    from hrm.policy import Policy

    spec = shared.spec
    unit = shared.weights.experts.expert_elements
    resident = [3, 0, 8, 1]
    w = shared.weights_for(resident, page_bytes=64 * 1024)
    for i, r in enumerate(resident):
        assert torch.equal(w.experts.gpu[i], shared.weights.experts.cpu[i][:r * unit])
        assert w.experts.cpu[i].data_ptr() == shared.weights.experts.cpu[i][r * unit:].data_ptr()
    assert w.experts.realized_gpu_fraction() == pytest.approx(12 / 32)

    prompts = [[5, 9, 3, 7], [8, 2, 2, 40], [3, 1, 4, 1], [60, 61, 62, 63]]
    outputs = []
    for r_w, schedule in ((0.0, "cgopipe"), (0.375, "cgopipe"), (0.375, "cgopipe-serial")):
        policy = Policy(batch_size=4, micro_batch_size=2, weights_gpu_fraction=r_w,
                        schedule=schedule)
        from executor.weights import resident_experts_per_layer

        res = resident_experts_per_layer(spec, r_w)
        engine = Engine(shared.weights_for(res, policy.weight_page_bytes), policy,
                        torch.device("cpu"), plan_memory(spec, policy, res, [4] * 4, 8))
        outputs.append(engine.generate(prompts, 8).outputs)
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("torch")
    from typer.testing import CliRunner

    from hrm.cli import app

    out = tmp_path_factory.mktemp("validate")
    result = CliRunner().invoke(app, ["validate", "--model", "tiny-mixtral", "--hardware", "t4",
                                      "--grid", "quick", "--device", "cpu",
                                      "--trace-config", "attn=gpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_spot_check_flags_a_profile_this_machine_does_not_match() -> None:
    """A profile whose DRAM is 1000x faster than any host's is called off for this machine, in
    the rows and in the warning; every row compares a measured time with the profile's."""
    pytest.importorskip("torch")
    from dataclasses import replace

    from rich.console import Console

    from hrm.hardware import load_profile
    from hrm.model import load_model_spec
    from hrm.validate import check_profile

    t4 = load_profile("t4")
    fast = replace(t4, cpu=replace(t4.cpu, dram_bandwidth_bps=1e15))
    console = Console(record=True, width=400)
    rows = check_profile(fast, load_model_spec("tiny-mixtral"), "cpu", console)
    by_name = {r["benchmark"].split(" (")[0]: r for r in rows}
    # no link on the CPU stand-in, and the datasheet profile has no op cost to check
    assert {"DRAM read", "CPU attention"} <= set(by_name) <= {"GPU op launch", "DRAM read",
                                                           "CPU attention"}
    assert by_name["DRAM read"]["ratio"] > 100 and not by_name["DRAM read"]["ok"]
    assert all(r["measured_s"] > 0 and r["profile_s"] > 0 for r in rows)
    warning = console.export_text()
    assert "DRAM read" in warning and "hrm profile" in warning


def test_quick_run_writes_consistent_results(quick_run) -> None:
    import pandas as pd

    summary = json.loads((quick_run / "validation_summary.json").read_text())
    assert {r["benchmark"].split(" (")[0] for r in summary["profile_spot_check"]} >= {
        "DRAM read", "CPU attention"}
    for key in ("n_configs", "throughput_mape", "worst_abs_pct_error", "optimizer_gap_pct",
                "mem_max_abs_pct_error", "machine", "date", "stage_errors", "worst_config"):
        assert key in summary
    configs = pd.read_csv(quick_run / "validation_configs.csv")
    grid = configs[configs["role"] == "grid"]
    assert len(grid) == len(QUICK.configs())
    assert summary["n_configs"] + summary["n_not_run"] == len(grid)
    assert (configs["role"] == "optimizer").sum() == 1
    # the optimizer's policy and the two best others measured again (default --reruns 2)
    reruns = configs[configs["role"] == "rerun"]
    assert reruns["config"].iloc[0] == "optimizer" and 2 <= len(reruns) <= 3
    pooled = summary["optimizer_gap_pooled"]
    assert summary["optimizer_gap_pct"] == pytest.approx(pooled["gap_pct"])
    assert len(pooled["runs_per_policy"][pooled["best_config"]]) >= 1
    # the first configuration again at the end, for the drift check, not scored
    repeat = configs[configs["role"] == "repeat"]
    assert list(repeat["config"]) == [grid["config"].iloc[0]]
    assert summary["drift"]["config"] == grid["config"].iloc[0]
    assert summary["drift"]["ratios"]["throughput"] > 0
    ran = grid[grid["ran"]]
    assert summary["n_configs"] == len(ran) >= 1
    if Path("/proc/stat").exists():              # the hypervisor's share, per configuration
        assert ran["cpu_steal_pct"].between(0, 100).all()
        assert summary["cpu_steal"]["max_pct"] == pytest.approx(ran["cpu_steal_pct"].max())
    recomputed = 100 * (ran["predicted_tok_s"] - ran["measured_tok_s"]) / ran["measured_tok_s"]
    assert recomputed.to_numpy() == pytest.approx(ran["throughput_error_pct"].to_numpy())
    assert summary["throughput_mape"] == pytest.approx(ran["throughput_error_pct"].abs().mean())
    # tokens/s measured = N * gen_len / (prefill + decode)
    tok_s = ran["batch_size"] * ran["gen_len"] / (ran["measured_prefill_s"]
                                                  + ran["measured_decode_s"])
    assert tok_s.to_numpy() == pytest.approx(ran["measured_tok_s"].to_numpy())

    stages = pd.read_csv(quick_run / "validation_stages.csv")
    layer = stages[stages["stage"] == "layer (overlap)"].set_index(["config", "role"])
    for _, row in stages.iterrows():  # a track cannot be busy longer than the layer took
        assert row["measured_s"] <= layer.loc[(row["config"], row["role"]), "measured_s"] * 1.001
    assert (stages.loc[stages["stage"] == "gpu", "measured_s"] > 0).all()

    trace = json.loads((quick_run / "validation_trace.json").read_text())
    tracks = {e["tid"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert {"gpu", "cpu_attention"} <= tracks
    # --trace-config keeps another configuration's timeline: GPU attention, no CPU attention
    gpu_attn = json.loads((quick_run / "validation_trace_attn=gpu.json").read_text())
    names = {e["name"] for e in gpu_attn["traceEvents"] if e["ph"] == "X"}
    assert "cpu_attn" not in names and "cpu_attn" in {e["name"] for e in trace["traceEvents"]}
    assert (quick_run / "validation_predicted_vs_measured.png").stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [
    (["--grid", "huge"], "--grid must be one of"),
    (["--full-model-gpu-mem", "16"], "--full-model-gpu-mem needs --num-layers"),
    (["--gpu-mem", "-1"], "--gpu-mem must be > 0"),
    (["--num-layers", "9"], "--num-layers must be in [1, 4]"),
    (["--only", "base", "--only", "N=3"], "--only N=3: not in the grid"),
    (["--trace-config", "N=3"], "--trace-config N=3: not in the grid"),
])
def test_bad_arguments_exit_2(args: list[str], message: str, tmp_path, capsys) -> None:
    pytest.importorskip("torch")
    import sys

    from hrm import cli

    argv = ["hrm", "validate", "--model", "tiny-mixtral", "--hardware", "t4", "--device", "cpu",
            "-o", str(tmp_path), *args]
    old = sys.argv
    sys.argv = argv
    try:
        with pytest.raises(SystemExit) as exc:
            cli.main()
    finally:
        sys.argv = old
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_only_selects_configurations_in_grid_order() -> None:
    configs = QUICK.configs()
    assert select_configs(configs, None) == configs
    chosen = select_configs(configs, ["N=32", "base"])
    assert [c.name for c in chosen] == ["base", "N=32"]


def test_config_of_row_reads_back_grid_points_and_the_optimizers_policy() -> None:
    from hrm.validate import GRIDS, config_of_row

    base = GRIDS["full"].configs()[0]
    assert config_of_row({"config": base.name}) == base
    row = {"config": "optimizer", "batch_size": "1024", "micro_batch_size": "64",
           "attn_decode_device": "cpu", "weights_gpu_fraction": "0.067", "schedule": "cgopipe",
           "prompt_len": "128", "gen_len": "16"}
    config = config_of_row(row)
    assert (config.policy.batch_size, config.policy.num_micro_batches) == (1024, 16)
    assert config.policy.weights_gpu_fraction == pytest.approx(0.067)
    assert (config.workload.num_seqs, config.workload.prompt_len) == (1024, 128)


def test_each_configuration_is_warmed_up_before_it_is_timed(shared, monkeypatch) -> None:
    """measure() runs Engine.warm_up (an untimed 2-token generate of a micro-batch) on the
    configuration's own engine and prompts before the timed generate, as `hrm run` does."""
    from executor.engine import Engine
    from hrm.policy import Policy
    from hrm.validate import Config, measure
    from hrm.workload import Workload

    calls = []
    warm_up = Engine.warm_up

    def recording(engine, prompts):
        calls.append((engine.policy.micro_batch_size, len(prompts)))
        return warm_up(engine, prompts)

    monkeypatch.setattr(Engine, "warm_up", recording)
    config = Config("tiny", Policy(batch_size=4, micro_batch_size=2),
                    Workload(num_seqs=4, prompt_len=6, gen_len=3))
    result = measure(shared, config, gpu_limit_bytes=2**32, cpu_limit_bytes=2**34, seed=0)
    assert calls == [(2, 4)]
    assert result["measured_tok_s"] > 0


def test_run_grid_order_reruns_and_the_repeat_of_the_first_that_ran(monkeypatch) -> None:
    """The grid, the optimizer, then the reruns (the optimizer's policy, the best others) and
    the repeat of the first configuration that ran (here the second: the first did not)."""
    import hrm.validate as V

    configs = QUICK.configs()[:4]
    tok_s = {c.name: 100.0 + 10 * i for i, c in enumerate(configs)}
    optimizer = V.Config("optimizer", configs[3].policy, configs[3].workload)

    def run_one(shared, setup, config, role):
        ran = config.name != configs[0].name
        row = {**V.config_row(config, role), "ran": ran, "error": "" if ran else "refused",
               "measured_tok_s": tok_s.get(config.name, 130.0), "predicted_tok_s": 1.0,
               "throughput_error_pct": 0.0}
        return row, [], None

    monkeypatch.setattr(V, "SharedModel", lambda *args: None)
    monkeypatch.setattr(V, "_warm_up_process", lambda *args: None)
    monkeypatch.setattr(V, "optimizer_config", lambda setup, space: optimizer)
    monkeypatch.setattr(V, "_run_one", run_one)
    setup = V.Setup("m", None, None, None, 0.0, 0.0, 0.0, 0)
    rows, _, _ = V.run_grid(setup, configs, with_optimizer=True, reruns=1)
    order = [(r["config"], r["role"]) for r in rows]
    assert order[:5] == [(c.name, "grid") for c in configs] + [("optimizer", "optimizer")]
    # one workload; the optimizer's policy is r_w=0.5's, so the best other policy is n_ub=4's
    assert [c.name for c in configs] == ["base", "N=32", "n_ub=4", "r_w=0.5"]
    assert order[5:] == [("optimizer", "rerun"), ("n_ub=4", "rerun"), ("N=32", "repeat")]
