"""The executor against Hugging Face transformers on tiny random Mixtral and Qwen2-MoE checkpoints
(fp32, `--device cpu`): same logits at every generated step and the same greedy tokens for 16+
steps, for every schedule, several micro-batch sizes, part of the experts on the "GPU", and
decode's experts as grouped GEMMs.

Tolerance: both sides compute in fp32 from the same weights; they differ only in the order of
floating-point reductions (SDPA vs. grouped matmul attention, per-expert GEMMs over sorted vs.
masked tokens, fp32 accumulation order). Through 2 layers that is a few ulps of the O(1)
activations; 1e-4 absolute on logits of magnitude ~1 leaves margin over that (~1e-6 observed)
while any real error (a wrong position, a missing bias, a wrong expert weight) moves logits by
>1e-2."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from executor.engine import build_engine  # noqa: E402
from hrm.policy import Policy  # noqa: E402

GEN_LEN = 17
EOS = 2  # the configs' eos_token_id: both sides stop a sequence there
LOGIT_ATOL = 1e-4
PROMPTS = [[5, 9, 3, 7, 1, 22, 14], [8, 2, 2, 40, 11], [3, 1, 4, 1, 5],
           [60, 61, 62, 63, 64, 65, 66], [7, 7, 7], [100, 3, 19, 2, 33, 17]]

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, initializer_range=0.1,
              max_position_embeddings=64)


def _save(model: torch.nn.Module, path) -> str:
    model.eval()
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(intermediate_size=96, num_local_experts=4,
                                     rope_theta=1000.0, **COMMON)
    return _save(transformers.MixtralForCausalLM(cfg), tmp_path_factory.mktemp("mixtral"))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> str:
    torch.manual_seed(1)
    cfg = transformers.Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=80, num_experts=6,
                                      norm_topk_prob=False, **COMMON)
    return _save(transformers.Qwen2MoeForCausalLM(cfg), tmp_path_factory.mktemp("qwen"))


def hf_reference(path: str, outputs: list[list[int]]) -> tuple[list[list[int]], list]:
    """HF greedy tokens for every prompt (batch 1, no padding) and HF logits along the
    executor's own token sequence (teacher forcing)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    greedy, logits = [], []
    with torch.no_grad():
        for prompt, out in zip(PROMPTS, outputs, strict=True):
            ids = torch.tensor([prompt])
            gen = model.generate(ids, max_new_tokens=GEN_LEN, do_sample=False,
                                 attention_mask=torch.ones_like(ids), pad_token_id=0)
            greedy.append(gen[0, len(prompt):].tolist())
            full = torch.tensor([prompt + out[:-1]])
            logits.append(model(full).logits[0, len(prompt) - 1:])
    return greedy, logits


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run_executor(path: str, policy: Policy, device: str = "cpu", kv_block_tokens: int = 4
                 ) -> tuple[list[list[int]], list]:
    """Blocks of 4 tokens: contexts of 3..24 tokens span several blocks, ragged."""
    engine = build_engine(path, policy, device=torch.device(device), checkpoint=path,
                          prompt_lens=[len(p) for p in PROMPTS], gen_len=GEN_LEN,
                          gpu_mem_bytes=2**30, cpu_mem_bytes=2**30, keep_logits=True,
                          eos_token_id=EOS, kv_block_tokens=kv_block_tokens)
    gen = engine.generate(PROMPTS, GEN_LEN)
    return gen.outputs, gen.logits


POLICIES = {
    "cgopipe-mu2": Policy(batch_size=6, micro_batch_size=2, weight_dtype="fp32", kv_dtype="fp32"),
    "cgopipe-mu1-rw0.4": Policy(batch_size=6, micro_batch_size=1, weights_gpu_fraction=0.4,
                                weight_dtype="fp32", kv_dtype="fp32", weight_page_bytes=4096),
    "cgopipe-mu3-two-rounds": Policy(batch_size=3, micro_batch_size=3, weight_dtype="fp32",
                                     kv_dtype="fp32"),
    "cgopipe-serial-mu6": Policy(batch_size=6, micro_batch_size=6, schedule="cgopipe-serial",
                                 weights_gpu_fraction=1.0, weight_dtype="fp32", kv_dtype="fp32"),
    "layerwise-kv-half-gpu": Policy(batch_size=6, micro_batch_size=3, schedule="layerwise",
                                    attn_decode_device="gpu", kv_gpu_fraction=0.5,
                                    weight_dtype="fp32", kv_dtype="fp32"),
    # decode's routed experts as one grouped GEMM pair: from the staging buffer (none resident),
    # from the resident copy (all resident), and the per-expert loop where a layer's experts
    # are split between the two (r_w = 0.4)
    "cgopipe-mu2-grouped": Policy(batch_size=6, micro_batch_size=2, weight_dtype="fp32",
                                  kv_dtype="fp32", expert_kernel="grouped"),
    "cgopipe-serial-mu6-grouped-resident": Policy(
        batch_size=6, micro_batch_size=6, schedule="cgopipe-serial", weights_gpu_fraction=1.0,
        weight_dtype="fp32", kv_dtype="fp32", expert_kernel="grouped"),
    "cgopipe-mu1-rw0.4-grouped-split": Policy(
        batch_size=6, micro_batch_size=1, weights_gpu_fraction=0.4, weight_dtype="fp32",
        kv_dtype="fp32", weight_page_bytes=4096, expert_kernel="grouped"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["mixtral", "qwen"])
def test_matches_transformers(arch: str, device: str, mixtral_dir: str, qwen_dir: str) -> None:
    path = mixtral_dir if arch == "mixtral" else qwen_dir
    reference = None
    for name, policy in POLICIES.items():
        outputs, logits = run_executor(path, policy, device)
        if reference is None:
            reference = hf_reference(path, outputs)
        greedy, hf_logits = reference
        assert outputs == greedy, f"{arch}/{name}: greedy tokens differ from transformers"
        assert sum(len(o) for o in outputs) >= len(PROMPTS) * 12  # EOS ends few sequences early
        for ours, theirs in zip(logits, hf_logits, strict=True):
            torch.testing.assert_close(ours[:len(theirs)], theirs, atol=LOGIT_ATOL, rtol=0,
                                       msg=lambda m, n=name: f"{arch}/{n}: {m}")


def test_a_checkpoint_missing_one_attention_bias_is_an_error(qwen_dir: str, tmp_path) -> None:
    """Q, K and V load as one fused projection: a checkpoint with some of their biases but not
    all is refused, naming the missing one (not loaded without any bias)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from executor.weights import CheckpointError, load_checkpoint

    path = shutil.copytree(qwen_dir, tmp_path / "qwen")
    shard = path / "model.safetensors"
    tensors = load_file(shard)
    missing = "model.layers.1.self_attn.k_proj.bias"
    del tensors[missing]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=missing):
        load_checkpoint(path, dtype=torch.float32, device=torch.device("cpu"),
                        resident=[0, 0], page_bytes=4096, pin_budget_bytes=0)
