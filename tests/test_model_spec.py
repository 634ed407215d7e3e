"""ModelSpec: shipped configs load, and sizes match hand-computed Mixtral-8x7B numbers."""

import json

import pytest

from hrm.errors import ModelConfigError
from hrm.model import from_hf_config, load_model_spec, shipped_models
from hrm.units import KiB


@pytest.mark.parametrize("name", shipped_models())
def test_every_shipped_config_loads(name):
    spec = load_model_spec(name)
    assert spec.num_moe_layers > 0
    assert spec.total_params() == spec.dense_params() + spec.num_moe_layers * \
        spec.routed_expert_params_per_layer()
    assert spec.active_params_per_token() < spec.total_params()
    assert spec.kv_bytes_per_token("bf16") == 2 * spec.kv_bytes_per_token("fp8")


def test_mixtral_8x7b_sizes_by_hand():
    spec = load_model_spec("mixtral-8x7b")
    h1, h2, layers, vocab = 4096, 14336, 32, 32000
    expert = 3 * h1 * h2                                     # w1, w3, w2
    attention = h1 * 4096 + 2 * h1 * 1024 + 4096 * h1        # q, k, v (8 kv heads x 128), o
    dense = layers * (attention + h1 * 8 + 2 * h1) + 2 * vocab * h1 + h1
    assert spec.expert_params() == expert
    assert spec.attention_params() == attention
    assert spec.dense_params() == dense
    assert spec.total_params() == dense + layers * 8 * expert
    assert spec.total_params() / 1e9 == pytest.approx(46.70, abs=0.01)
    assert spec.dense_bytes("bf16") / 1e9 == pytest.approx(3.21, abs=0.01)
    assert spec.routed_expert_bytes_per_layer("bf16") == 8 * expert * 2
    assert spec.kv_bytes_per_token("bf16") == 128 * KiB     # 32 x 8 x 128 x 2 (K, V) x 2 B
    assert spec.active_params_per_token() / 1e9 == pytest.approx(12.88, abs=0.01)


def test_mixtral_8x22b_and_deepseek_shapes():
    assert load_model_spec("mixtral-8x22b").total_params() / 1e9 == pytest.approx(140.6, abs=0.1)
    ds = load_model_spec("deepseek-v2-lite")
    assert ds.is_mla and ds.num_dense_layers == 1
    # MLA caches one latent (512) + the rope key (64) per token and layer
    assert ds.kv_elements_per_token_per_layer() == 576


def test_dense_model_is_rejected():
    with pytest.raises(ModelConfigError, match="no experts"):
        from_hf_config({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2,
                        "num_hidden_layers": 2, "vocab_size": 10, "intermediate_size": 16})


def test_unknown_model_and_bad_file(tmp_path):
    with pytest.raises(ModelConfigError, match="unknown model"):
        load_model_spec("mixtral-9x9b")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ModelConfigError, match="cannot read"):
        load_model_spec(bad)
    bad.write_text(json.dumps({"model_type": "mixtral", "hidden_size": -4}))
    with pytest.raises(ModelConfigError):
        load_model_spec(tmp_path)
