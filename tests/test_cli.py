"""The modeling commands: models, hardware, predict, optimize, roofline, and their errors."""

import json
import subprocess
import sys

import pytest

from hrm.policy import Policy

WORK = ["--prompt-len", "100", "--gen-len", "64"]


def test_models_and_hardware(hrm_cli):
    code, out, _ = hrm_cli("models", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and rows["mixtral-8x7b"]["params"] == pytest.approx(46.7e9, rel=1e-3)
    assert rows["mixtral-8x7b"]["kv_bytes_per_token_bf16"] == 128 * 1024
    code, out, _ = hrm_cli("hardware", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and rows["t4"]["h2d_pinned_bps"] == 12.89e9
    assert rows["h200x2-quick"]["gpus"] == 2 and rows["t4"]["gpus"] == 1
    for command, name in (("models", "olmoe"), ("hardware", "t4")):
        code, out, _ = hrm_cli(command)
        assert code == 0 and name in out


def test_optimize_then_predict_the_saved_policy(tmp_path, hrm_cli):
    policy_path = tmp_path / "policy.json"
    code, out, _ = hrm_cli("optimize", "-m", "mixtral-8x7b", "-H", "t4",
                           *WORK, "-o", str(policy_path), "--json")
    assert code == 0
    doc = json.loads(out)
    for key in ("policy", "throughput_tok_s", "prefill_s", "decode_s", "bottleneck",
                "gpu_mem_bytes", "cpu_mem_bytes", "solve_s", "schedules"):
        assert key in doc
    assert set(doc["schedules"]) == {"cgopipe", "cgopipe-serial", "layerwise"}
    assert doc["gpu_mem_bytes"] <= doc["gpu_mem_capacity_bytes"] * (1 + 1e-6)
    assert Policy.load(policy_path).to_dict() == doc["policy"]
    trace = tmp_path / "trace.json"
    code, out, _ = hrm_cli("predict", "-m", "mixtral-8x7b", "-H", "t4",
                           *WORK, "--policy", str(policy_path), "--json", "--trace", str(trace))
    assert code == 0
    assert json.loads(out)["throughput_tok_s"] == pytest.approx(doc["throughput_tok_s"])
    events = json.loads(trace.read_text())["traceEvents"]
    assert {"gpu", "cpu_attention", "h2d", "d2h"} <= {e["tid"] for e in events}


def test_human_output(hrm_cli):
    code, out, _ = hrm_cli("optimize", "-m", "olmoe-1b-7b", "-H", "l4",
                           *WORK, "--gpu-mem", "4", "--cpu-mem", "32")
    assert code == 0
    for text in ("throughput", "bottleneck", "GPU memory", "CPU memory", "layerwise"):
        assert text in out
    code, out, _ = hrm_cli("predict", "-m", "olmoe-1b-7b", "-H", "l4",
                           *WORK, "--num-seqs", "64")
    assert code == 0 and "N=" in out


def test_roofline_plot(tmp_path, hrm_cli):
    png = tmp_path / "roof.png"
    code, out, _ = hrm_cli("roofline", "-m", "mixtral-8x7b", "-H", "t4",
                           "-o", str(png), "--json")
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(out)
    assert doc["turning_batch_sizes"]["compute"] > doc["turning_batch_sizes"]["hbm"] > 0
    assert {op["name"] for op in doc["operators"]} >= {"expert_ffn", "attention_decode"}


@pytest.mark.parametrize("args, message", [
    (["predict", "-m", "mixtral-9x9b", "-H", "t4", *WORK], "unknown model"),
    (["optimize", "-m", "mixtral-8x7b", "-H", "BAD_TOML", *WORK], "malformed TOML"),
    (["optimize", "-m", "mixtral-8x7b", "-H", "t4", "--prompt-len", "-5", "--gen-len", "8"],
     "prompt_len must be a positive integer"),
    (["optimize", "-m", "mixtral-8x7b", "-H", "t4", *WORK, "--gpu-mem", "-1"],
     "gpu memory must be a positive number"),
    (["optimize", "-m", "mixtral-8x7b", "-H", "t4", *WORK, "--cpu-mem", "10"],
     "GiB CPU memory"),
    (["optimize", "-m", "mixtral-8x7b", "-H", "t4", *WORK, "--schedule", "magic"],
     "--schedule must be one of"),
    (["predict", "-m", "mixtral-8x7b", "-H", "t4", *WORK, "--policy", "BAD_POLICY"],
     "cannot read policy"),
    (["predict", "-m", "mixtral-8x7b", "-H", "t4", *WORK, "--policy", "HUGE_POLICY"],
     "GiB CPU memory"),
    (["roofline", "-m", "mixtral-8x7b", "-H", "t4", "-o", "x.png", "--batch-size", "0"],
     "must be > 0"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message, hrm_cli):
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[gpu\nname = 1")
    bad_policy = tmp_path / "bad.json"
    bad_policy.write_text("{")
    huge = tmp_path / "huge.json"
    Policy(batch_size=65536, micro_batch_size=64).save(huge)
    subst = {"BAD_TOML": str(bad_toml), "BAD_POLICY": str(bad_policy), "HUGE_POLICY": str(huge),
             "x.png": str(tmp_path / "x.png")}
    code, out, err = hrm_cli(*[subst.get(a, a) for a in args])
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_real_process_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "hrm.cli", "optimize", "-m", "nope", "-H", "t4",
                           *WORK], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown model" in proc.stderr and "Traceback" not in proc.stderr
