"""`hrm run` end to end on the CPU (random weights and a tiny checkpoint), and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
            num_experts_per_tok=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("run")
    config = dict(json.loads((Path(__file__).parent.parent / "hrm" / "model_configs" /
                              "mixtral-8x7b.json").read_text()), **TINY)
    (d / "tiny.json").write_text(json.dumps(config))
    (d / "policy.json").write_text(json.dumps({"batch_size": 4, "micro_batch_size": 2,
                                               "weights_gpu_fraction": 0.25}))
    (d / "policy32.json").write_text(json.dumps({"batch_size": 4, "micro_batch_size": 2,
                                                 "weight_dtype": "fp32", "kv_dtype": "fp32"}))
    (d / "prompts.jsonl").write_text('[5, 6, 7]\n{"tokens": [1, 2, 3, 4, 5, 6]}\n[9]\n'
                                     '[3, 3, 3, 3]\n[8, 8]\n')
    torch.manual_seed(0)
    ckpt = d / "ckpt"
    transformers.MixtralForCausalLM(transformers.MixtralConfig(**TINY)).save_pretrained(ckpt)
    return {"dir": d, "model": d / "tiny.json", "policy": d / "policy.json",
            "policy32": d / "policy32.json",
            "prompts": d / "prompts.jsonl", "ckpt": ckpt}


def test_run_writes_result_outputs_and_trace(files, hrm_cli) -> None:
    d = files["dir"]
    code, _, err = hrm_cli("run", "--model", files["model"], "--dummy-weights",
                    "--policy", files["policy"], "--prompts", files["prompts"], "--gen-len", 5,
                    "--device", "cpu", "--hardware", "h100", "--ignore-eos", "--trace",
                    d / "trace.json", "-o", d / "result.json")
    assert code == 0, err
    result = json.loads((d / "result.json").read_text())
    for key in ("schedule", "model", "policy", "workload", "throughput_tok_s",
                "predicted_throughput_tok_s", "prefill_s", "decode_s", "peak_gpu_mem_bytes",
                "peak_cpu_mem_bytes", "machine", "command", "date"):
        assert key in result, key
    assert result["generated_tokens"] == 5 * 5  # 5 prompts (two rounds of N=4), --ignore-eos
    assert result["throughput_tok_s"] == pytest.approx(
        25 / (result["prefill_s"] + result["decode_s"]))
    # r_w = 0.25 of 2 layers x 4 experts: one whole expert per layer stays on the "GPU"
    assert result["realized"]["resident_experts_per_layer"] == [1, 1]
    # the other 3 experts of each layer stream every layer visit (on the CPU through the ring)
    expert_bytes = 3 * 64 * 96 * 2
    visits = 2 * 2 * 5  # rounds x layers x (prefill + 4 decode steps)
    assert result["bytes_moved"]["weights_h2d_staged"] == visits * 3 * expert_bytes
    assert result["predicted_throughput_tok_s"] > 0
    outputs = [json.loads(line) for line in (d / "result.outputs.jsonl").read_text().splitlines()]
    assert [o["index"] for o in outputs] == list(range(5))
    assert all(len(o["tokens"]) == 5 for o in outputs)
    events = json.loads((d / "trace.json").read_text())["traceEvents"]
    tracks = {e["tid"] for e in events if e["ph"] == "X"}
    assert {"gpu", "cpu_attention", "h2d"} <= tracks


def test_schedules_give_the_same_greedy_tokens(files, hrm_cli) -> None:
    """fp32: in bf16 the schedules' different attention paths (CPU blocks vs. SDPA) round
    differently and may flip near-tied greedy choices."""
    d, outputs = files["dir"], {}
    for schedule in ("cgopipe", "cgopipe-serial", "layerwise"):
        out = d / f"{schedule}.json"
        code, _, err = hrm_cli("run", "--checkpoint", files["ckpt"], "--policy",
                        files["policy32"], "--prompts", files["prompts"], "--gen-len", 4,
                        "--device", "cpu", "--schedule", schedule, "-o", out)
        assert code == 0, err
        outputs[schedule] = (d / f"{schedule}.outputs.jsonl").read_text()
        assert json.loads(out.read_text())["schedule"] == schedule
    assert len(set(outputs.values())) == 1


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(files, hrm_cli) -> None:
    d = files["dir"]

    def tokens(*extra) -> str:
        out = d / "s.json"
        code, _, err = hrm_cli("run", "--checkpoint", files["ckpt"], "--policy",
                        files["policy"], "--prompts", files["prompts"], "--gen-len", 6,
                        "--device", "cpu", "--ignore-eos", "-o", out, *extra)
        assert code == 0, err
        return (d / "s.outputs.jsonl").read_text()

    sampled = tokens("--temperature", 1.5, "--seed", 3)
    assert sampled == tokens("--temperature", 1.5, "--seed", 3)
    assert sampled != tokens("--temperature", 1.5, "--seed", 4)
    assert tokens("--temperature", 1.0, "--top-p", 1e-6) == tokens()


def _broken_checkpoint(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    edit(dst)
    return dst


@pytest.mark.parametrize("case, message", [
    ("missing shard", "missing"),
    ("shape mismatch", "has shape"),
    ("no safetensors", "no *.safetensors"),
])
def test_bad_checkpoints(case, message, files, tmp_path, hrm_cli) -> None:
    def edit(d: Path) -> None:
        if case == "missing shard":
            (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
            (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
                "lm_head.weight": "model-00001-of-00001.safetensors",
                "model.norm.weight": "model-00002-of-00002.safetensors"}}))
        elif case == "shape mismatch":
            config = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps(dict(config, intermediate_size=80)))
        else:
            (d / "model.safetensors").unlink()

    ckpt = _broken_checkpoint(files["ckpt"], tmp_path / "ckpt", edit)
    code, _, err = hrm_cli("run", "--checkpoint", ckpt, "--policy",
                    files["policy"], "--num-seqs", 2, "--prompt-len", 3, "--gen-len", 2,
                    "--device", "cpu", "-o", tmp_path / "r.json")
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--gpu-mem", "0.0001"], "does not fit GPU memory"),
    (["--cpu-mem", "0.0001"], "does not fit CPU memory"),
    (["--prompts", "BAD"], "not JSON"),
    (["--prompts", "EMPTYLIST"], "non-empty list of token ids"),
    (["--prompts", "TEXT"], "needs --tokenizer"),
    (["--checkpoint", "CKPT"], "exactly one of --dummy-weights and --checkpoint"),
    (["--prompts", "TOOBIG"], "outside the vocabulary"),
])
def test_bad_inputs(args, message, files, tmp_path, hrm_cli) -> None:
    bad = {"BAD": '[1, 2]\n{"tokens": [1,\n', "EMPTYLIST": "[]\n", "TEXT": '{"text": "hi"}\n',
           "TOOBIG": "[1, 500]\n"}
    args = [str(files["ckpt"]) if a == "CKPT" else a for a in args]
    for name, text in bad.items():
        if name in args:
            (tmp_path / name).write_text(text)
            args[args.index(name)] = str(tmp_path / name)
    if "--prompts" not in args:
        args += ["--num-seqs", "4", "--prompt-len", "3"]
    code, _, err = hrm_cli("run", "--model", files["model"], "--dummy-weights",
                    "--policy", files["policy"], "--gen-len", 2, "--device", "cpu",
                    "-o", tmp_path / "r.json", *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


def test_text_prompts_with_a_local_tokenizer(files, tmp_path, hrm_cli) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(TINY["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path / "tok")
    (tmp_path / "p.jsonl").write_text('{"text": "w5 w6 w7"}\n[5, 6, 7]\n')
    code, _, err = hrm_cli("run", "--checkpoint", files["ckpt"], "--policy",
                    files["policy"], "--prompts", tmp_path / "p.jsonl", "--tokenizer",
                    tmp_path / "tok", "--gen-len", 3, "--device", "cpu", "--ignore-eos",
                    "-o", tmp_path / "r.json")
    assert code == 0, err
    text, ids = [json.loads(line) for line in (tmp_path / "r.outputs.jsonl").read_text()
                 .splitlines()]
    assert text["tokens"] == ids["tokens"]  # same prompt as text and as ids
    assert text["text"] == " ".join(f"w{t}" for t in text["tokens"])
