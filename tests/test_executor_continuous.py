"""Continuous scheduling in the executor (`--device cpu`, fp32, tiny Mixtral with random
weights): greedy tokens equal the static scheduler's, with and without preemptions, and with
per-sequence generation lengths (a greedy output is the prefix of the longer one)."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from executor.continuous import BlockPool, build_continuous_engine  # noqa: E402
from executor.engine import build_engine  # noqa: E402
from hrm.errors import InfeasibleError  # noqa: E402
from hrm.model import load_model_spec  # noqa: E402
from hrm.policy import Policy  # noqa: E402

GEN_LEN = 12
BLOCK = 8
_rng = random.Random(0)
PROMPTS = [[_rng.randrange(3, 2048) for _ in range(_rng.randint(3, 40))] for _ in range(13)]
MAX_SEQ = max(len(p) for p in PROMPTS) + GEN_LEN
CPU = torch.device("cpu")
FP32 = dict(weight_dtype="fp32", kv_dtype="fp32", weights_gpu_fraction=0.25)


@pytest.fixture(scope="module")
def static_outputs() -> list[list[int]]:
    policy = Policy(batch_size=8, micro_batch_size=4, **FP32)
    engine = build_engine("tiny-mixtral", policy, device=CPU,
                          prompt_lens=[len(p) for p in PROMPTS], gen_len=GEN_LEN,
                          gpu_mem_bytes=2**32, cpu_mem_bytes=2**32, kv_block_tokens=BLOCK)
    return engine.generate(PROMPTS, GEN_LEN).outputs


def continuous(num_blocks: int, gen_lens: list[int], **kwargs):
    policy = Policy(batch_size=64, micro_batch_size=4, **FP32)
    engine, blocks = build_continuous_engine(
        "tiny-mixtral", policy, device=CPU, max_seq_len=MAX_SEQ, gpu_mem_bytes=2**32,
        cpu_mem_bytes=2**32, kv_block_tokens=BLOCK, num_blocks=num_blocks)
    return engine.generate_continuous(PROMPTS, gen_lens, num_blocks=blocks, **kwargs)


@pytest.mark.parametrize("num_blocks,kwargs", [
    (400, {}),                                   # everything fits: a few passes
    (14, {}),                                    # KV-bound, paced, no preemption
    (14, {"lookahead": 0, "pace": False}),       # greedy admission: preemptions, re-prefills
])
def test_continuous_tokens_equal_static(static_outputs, num_blocks, kwargs):
    gen, stats = continuous(num_blocks, [GEN_LEN] * len(PROMPTS), **kwargs)
    assert gen.outputs == static_outputs
    assert stats.peak_kv_blocks <= num_blocks
    assert len(stats.shapes) == stats.passes
    assert sum(s.decode_seqs + s.prefill_seqs for s in stats.shapes) == \
        sum(len(o) for o in static_outputs)
    if kwargs.get("lookahead") == 0:
        assert stats.preemptions > 0 and stats.recomputed_tokens > 0
    else:
        assert stats.preemptions == 0


def test_per_sequence_generation_lengths(static_outputs):
    gen_lens = [1 + i % GEN_LEN for i in range(len(PROMPTS))]
    gen, _ = continuous(20, gen_lens)
    assert gen.outputs == [out[:g] for out, g in zip(static_outputs, gen_lens, strict=True)]


def test_block_pool_returns_every_block():
    pool = BlockPool(load_model_spec("tiny-mixtral"), 10, 4, torch.float32)
    pool.resize(0, 9)
    pool.resize(1, 4)
    pool.resize(0, 13)
    assert len(pool.tables[0]) == 4 and len(pool.tables[1]) == 1 and len(pool.free) == 5
    pool.release(0)
    pool.release(1)
    assert sorted(pool.free) == list(range(10))


def test_cache_too_small_for_the_longest_sequence():
    with pytest.raises(InfeasibleError, match="longest sequence"):
        continuous(2, [GEN_LEN] * len(PROMPTS))


def test_hrm_run_scheduler_continuous(tmp_path, hrm_cli):
    """`hrm run --scheduler continuous` writes the same greedy outputs as `--scheduler static`,
    what the scheduler did, and the cost model's time for the same passes."""
    import json

    for name, n_tok in (("static", 16), ("continuous", 64)):
        Policy(batch_size=n_tok, micro_batch_size=8, **FP32).save(tmp_path / f"{name}.json")
        code, _, err = hrm_cli("run", "--model", "tiny-mixtral", "--dummy-weights",
                               "--device", "cpu",
                               "--policy", tmp_path / f"{name}.json", "--hardware", "h100-machine",
                               "--synthetic", "mtbench", "--num-seqs", 16, "--gen-len", 6,
                               "--cpu-mem", 1, "--ignore-eos", "--scheduler", name,
                               "-o", tmp_path / f"{name}_result.json")
        assert code == 0, err
    result = json.loads((tmp_path / "continuous_result.json").read_text())
    assert result["scheduler"] == "continuous" and result["generated_tokens"] == 16 * 6
    assert result["continuous"]["passes"] == result["prediction"]["passes"]
    assert result["predicted_throughput_tok_s"] > 0
    steady = result["steady"]   # the passes between ramp-up and drain, measured and predicted
    first, last = steady["passes"]
    assert 0 <= first <= last < result["continuous"]["passes"]
    assert 0 < steady["generated_tokens"] <= result["generated_tokens"]
    assert steady["throughput_tok_s"] == pytest.approx(steady["generated_tokens"]
                                                       / steady["seconds"])
    assert steady["predicted_throughput_tok_s"] > 0
    outputs = {name: (tmp_path / f"{name}_result.outputs.jsonl").read_text()
               for name in ("static", "continuous")}
    assert outputs["static"] == outputs["continuous"]
    code, _, err = hrm_cli("run", "--model", "tiny-mixtral", "--dummy-weights",
                               "--device", "cpu",
                    "--policy", tmp_path / "continuous.json", "--num-seqs", 2, "--prompt-len",
                    4, "--gen-len", 2, "--scheduler", "rolling", "-o", tmp_path / "x.json")
    assert code == 2 and "--scheduler must be static or continuous" in err


@pytest.mark.parametrize("r_w", [0.0, 0.4])
def test_continuous_tokens_equal_static_with_grouped_experts(r_w):
    """The continuous engine's decode runs the policy's grouped expert GEMMs too (every expert
    streamed, or some resident and the layer staged whole: ExpertStore.stage_whole_layers): its
    greedy tokens equal the static engine's per-expert loop on the same placement (random
    weights depend on it)."""
    fp32 = dict(weight_dtype="fp32", kv_dtype="fp32", weights_gpu_fraction=r_w)
    static = build_engine("tiny-mixtral", Policy(batch_size=8, micro_batch_size=4, **fp32),
                          device=CPU, prompt_lens=[len(p) for p in PROMPTS], gen_len=GEN_LEN,
                          gpu_mem_bytes=2**32, cpu_mem_bytes=2**32, kv_block_tokens=BLOCK)
    policy = Policy(batch_size=64, micro_batch_size=4, expert_kernel="grouped", **fp32)
    engine, blocks = build_continuous_engine(
        "tiny-mixtral", policy, device=CPU, max_seq_len=MAX_SEQ, gpu_mem_bytes=2**32,
        cpu_mem_bytes=2**32, kv_block_tokens=BLOCK, num_blocks=400)
    assert engine.w.experts.whole_layers == (r_w > 0)
    gen, _ = engine.generate_continuous(PROMPTS, [GEN_LEN] * len(PROMPTS), num_blocks=blocks)
    assert gen.outputs == static.generate(PROMPTS, GEN_LEN).outputs
