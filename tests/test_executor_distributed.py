"""Multi-GPU execution on the CPU stand-in: 2 gloo ranks (tp and ep) against 1 process (cgopipe)
on a tiny random Mixtral checkpoint (fp32): the same greedy tokens for 16 steps and close logits.

Tolerance: the ranks compute the same fp32 math with the O projection and the MoE block split
into two partial sums added by all_reduce, so only the order of the fp32 reductions differs from
one process: a few ulps of the O(1) activations through 2 layers; 1e-4 absolute on logits of
magnitude ~1 leaves margin over that, while a wrong shard (a head, expert or h2 slice off by one
rank) moves logits by >1e-2."""

from __future__ import annotations

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from executor.distributed import Shard, spawn  # noqa: E402
from executor.engine import generate_on_rank  # noqa: E402
from hrm.errors import HRMError, PolicyError  # noqa: E402
from hrm.model import load_model_spec  # noqa: E402
from hrm.policy import Policy  # noqa: E402

GEN_LEN = 16
LOGIT_ATOL = 1e-4
RANK_TIMEOUT_S = 120
PROMPTS = [[5, 9, 3, 7, 1, 22, 14], [8, 2, 2, 40, 11], [3, 1, 4, 1, 5], [7, 7, 7]]
POLICY = Policy(batch_size=4, micro_batch_size=2, weights_gpu_fraction=0.25, weight_dtype="fp32",
                kv_dtype="fp32")


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     num_experts_per_tok=2, intermediate_size=96,
                                     num_local_experts=4, initializer_range=0.1,
                                     max_position_embeddings=64, rope_theta=1000.0)
    path = tmp_path_factory.mktemp("mixtral")
    transformers.MixtralForCausalLM(cfg).eval().save_pretrained(path)
    return str(path)


def _build(path: str) -> dict:
    return dict(device=torch.device("cpu"), checkpoint=path, gpu_mem_bytes=2**30,
                cpu_mem_bytes=2**30, eos_token_id=None, keep_logits=True, kv_block_tokens=4)


@pytest.fixture(scope="module")
def single(mixtral_dir) -> dict:
    return generate_on_rank(Shard(), mixtral_dir, POLICY, PROMPTS, GEN_LEN, _build(mixtral_dir))


#: both parallelisms and both attention placements (CPU attention over the rank's KV heads;
#: GPU attention with half the micro-batches' KV on the "GPU")
CASES = [("tp", dict(schedule="cgopipe")),
         ("ep", dict(schedule="layerwise", attn_decode_device="gpu", kv_gpu_fraction=0.5))]


@pytest.mark.parametrize(("parallelism", "schedule"), CASES, ids=["tp-cgopipe", "ep-layerwise"])
def test_two_ranks_match_one_process(mixtral_dir, single, parallelism, schedule) -> None:
    policy = replace(POLICY, num_gpus=2, parallelism=parallelism, **schedule)
    ranks = spawn(generate_on_rank, 2, parallelism, "cpu", mixtral_dir, policy, PROMPTS,
                  GEN_LEN, _build(mixtral_dir), timeout_s=RANK_TIMEOUT_S)
    one, two = single["generation"], ranks["generation"]
    assert two.outputs == one.outputs
    assert all(len(o) == GEN_LEN for o in two.outputs)
    for a, b in zip(one.logits, two.logits, strict=True):
        torch.testing.assert_close(b, a, atol=LOGIT_ATOL, rtol=0)
    assert len(ranks["peak_gpu_mem_bytes_per_rank"]) == 2
    # each rank holds half the attention weights and experts: less "GPU" memory than one process
    assert max(ranks["peak_gpu_mem_bytes_per_rank"]) < single["peak_gpu_mem_bytes_per_rank"][0]


def test_shard_errors() -> None:
    spec = load_model_spec("mixtral-8x7b")  # 32 heads, 8 KV heads, 8 experts of h2 14336
    with pytest.raises(PolicyError, match="num_heads=32, num_kv_heads=8, .* not divisible by 3"):
        Shard(0, 3, "tp").spec(spec)
    with pytest.raises(PolicyError, match="at least top_k=2 experts per GPU"):
        Shard(0, 8, "ep").spec(spec)
    with pytest.raises(HRMError, match="GPUs requested"):
        spawn(generate_on_rank, torch.cuda.device_count() + 1, "tp", "cuda")


def test_ep_shard_holds_round_robin_experts() -> None:
    spec = load_model_spec("mixtral-8x7b")
    shard = Shard(1, 2, "ep")
    assert shard.experts(spec.num_experts) == [1, 3, 5, 7]
    local = shard.spec(spec)
    assert (local.num_experts, local.num_heads, local.num_kv_heads,
            local.expert_intermediate_size) == (4, 16, 4, spec.expert_intermediate_size)
