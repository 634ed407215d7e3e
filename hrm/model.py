"""ModelSpec: the shape of a decoder-only MoE model, built from a Hugging Face ``config.json``.

`from_hf_config` is the one place that maps the architectures' config keys (Mixtral, DBRX,
Qwen2-MoE, DeepSeek-V2/V3, OLMoE) onto one spec. Everything else (parameter and byte counts,
FLOPs per token, KV-cache bytes) is derived from the spec by small pure methods.

Notation (MoE-Lightning, Tab. 1): l = num_layers, h1 = hidden_size, h2 =
expert_intermediate_size, n_q / n_kv = attention / KV heads, n_e = num_experts, k = top_k.
FLOPs count a multiply-add as 2.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hrm.errors import ModelConfigError
from hrm.units import dtype_bytes

CONFIG_DIR = Path(__file__).parent / "model_configs"


@dataclass(frozen=True)
class ModelSpec:
    """Shape of an MoE decoder. All sizes are element counts, not bytes."""

    name: str
    model_type: str
    num_layers: int
    hidden_size: int
    expert_intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    vocab_size: int
    #: total width of the always-active shared experts of one layer (0 = none)
    shared_intermediate_size: int = 0
    #: a sigmoid gate (h1 -> 1) scales the shared experts' output (Qwen2-MoE)
    shared_expert_gate: bool = False
    #: leading layers whose FFN is one dense MLP instead of experts (DeepSeek first_k_dense_replace)
    num_dense_layers: int = 0
    dense_intermediate_size: int = 0
    attention_bias: bool = False
    #: per-head RMSNorm of q and k over the whole projection (OLMoE)
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    #: Multi-head Latent Attention (DeepSeek-V2): KV is cached as one latent of this rank
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for field in ("num_layers", "hidden_size", "expert_intermediate_size", "num_heads",
                      "num_kv_heads", "head_dim", "num_experts", "top_k", "vocab_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"model {self.name!r}: {field} must be a positive integer, "
                                       f"got {value!r}")
        if self.top_k > self.num_experts:
            raise ModelConfigError(f"model {self.name!r}: top_k={self.top_k} exceeds "
                                   f"num_experts={self.num_experts}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(f"model {self.name!r}: num_heads={self.num_heads} is not a "
                                   f"multiple of num_kv_heads={self.num_kv_heads}")
        if not 0 <= self.num_dense_layers < self.num_layers:
            raise ModelConfigError(f"model {self.name!r}: num_dense_layers={self.num_dense_layers}"
                                   f" must be in [0, num_layers={self.num_layers})")

    # ---- structure -----------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        """True for Multi-head Latent Attention (compressed KV cache)."""
        return self.kv_lora_rank > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    @property
    def gqa_group_size(self) -> int:
        """Query heads sharing one KV head (s in MoE-Lens Eq. 1)."""
        return self.num_heads // self.num_kv_heads

    @property
    def qk_head_dim(self) -> int:
        return self.head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def v_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    # ---- parameters per component (elements) --------------------------------------------------
    def attention_params(self) -> int:
        """Projection weights (and biases) of one layer's attention: Q, K, V (or MLA's), O."""
        h, nq = self.hidden_size, self.num_heads
        if self.is_mla:
            q = (h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * nq * self.qk_head_dim
                 if self.q_lora_rank else h * nq * self.qk_head_dim)
            kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
            kv_b = self.kv_lora_rank * nq * (self.head_dim + self.v_dim)
            return q + kv_a + kv_b + nq * self.v_dim * h
        q_out, kv_out = nq * self.head_dim, self.num_kv_heads * self.head_dim
        params = h * q_out + 2 * h * kv_out + q_out * h
        if self.attention_bias:
            params += q_out + 2 * kv_out
        if self.qk_norm:
            params += q_out + kv_out
        return params

    def router_params(self) -> int:
        """Router (gate) of one MoE layer, plus the shared-expert gate if any."""
        return self.hidden_size * self.num_experts + (self.hidden_size if self.shared_expert_gate
                                                      else 0)

    def expert_params(self) -> int:
        """One routed expert: gate (w1), up (w3) and down (w2) projections, 3 * h1 * h2."""
        return 3 * self.hidden_size * self.expert_intermediate_size

    def shared_expert_params(self) -> int:
        """All shared experts of one MoE layer together."""
        return 3 * self.hidden_size * self.shared_intermediate_size

    def dense_mlp_params(self) -> int:
        """The dense MLP of one of the leading dense layers."""
        return 3 * self.hidden_size * self.dense_intermediate_size

    def norm_params(self) -> int:
        """The two per-layer norms."""
        return 2 * self.hidden_size

    def embedding_params(self) -> int:
        """Input embedding plus the LM head (once if tied) and the final norm."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2) + \
            self.hidden_size

    def routed_expert_params_per_layer(self) -> int:
        return self.num_experts * self.expert_params()

    def dense_params(self) -> int:
        """Every parameter that is not a routed expert (attention, routers, shared experts, dense
        MLPs, norms, embeddings): the part an offloading policy keeps on the GPU."""
        per_moe = self.attention_params() + self.router_params() + self.shared_expert_params()
        per_dense = self.attention_params() + self.dense_mlp_params()
        return (self.num_moe_layers * per_moe + self.num_dense_layers * per_dense
                + self.num_layers * self.norm_params() + self.embedding_params())

    def total_params(self) -> int:
        return self.dense_params() + self.num_moe_layers * self.routed_expert_params_per_layer()

    def active_params_per_token(self) -> int:
        return self.dense_params() + self.num_moe_layers * self.top_k * self.expert_params()

    # ---- bytes -----------------------------------------------------------------------------
    def expert_bytes(self, weight_dtype: str = "bf16") -> float:
        """Bytes of one routed expert (scales of int8/fp8 weights are not counted)."""
        return self.expert_params() * dtype_bytes(weight_dtype)

    def routed_expert_bytes_per_layer(self, weight_dtype: str = "bf16") -> float:
        return self.routed_expert_params_per_layer() * dtype_bytes(weight_dtype)

    def routed_expert_bytes(self, weight_dtype: str = "bf16") -> float:
        """All routed experts of all MoE layers: the bytes a policy may offload."""
        return self.num_moe_layers * self.routed_expert_bytes_per_layer(weight_dtype)

    def dense_bytes(self, weight_dtype: str = "bf16") -> float:
        return self.dense_params() * dtype_bytes(weight_dtype)

    def total_bytes(self, weight_dtype: str = "bf16") -> float:
        return self.total_params() * dtype_bytes(weight_dtype)

    def kv_elements_per_token_per_layer(self) -> int:
        """K and V (or MLA's latent + rope key) cached for one token in one layer."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, kv_dtype: str = "bf16") -> float:
        """KV-cache bytes of one token across all layers (Mixtral-8x7B bf16: 128 KiB)."""
        return self.num_layers * self.kv_elements_per_token_per_layer() * dtype_bytes(kv_dtype)

    # ---- FLOPs per token per operator ------------------------------------------------------
    def attention_proj_flops_per_token(self) -> float:
        """QKV and O projections of one layer, 2 FLOPs per weight."""
        return 2.0 * self.attention_params()

    def attention_core_flops_per_token(self, context_len: float) -> float:
        """Scores (q.k) and weighted sum (p.v) against `context_len` cached tokens, one layer."""
        return 2.0 * self.num_heads * (self.qk_head_dim + self.v_dim) * context_len

    def router_flops_per_token(self) -> float:
        return 2.0 * self.router_params()

    def expert_flops_per_token(self) -> float:
        """The k routed experts one token visits in one MoE layer."""
        return 2.0 * self.top_k * self.expert_params()

    def shared_expert_flops_per_token(self) -> float:
        return 2.0 * self.shared_expert_params()

    def lm_head_flops_per_token(self) -> float:
        return 2.0 * self.vocab_size * self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _get(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def _require(config: dict[str, Any], name: str, *keys: str) -> Any:
    value = _get(config, *keys)
    if value is None:
        raise ModelConfigError(f"model {name!r}: config.json lacks {' or '.join(keys)}")
    return value


def from_hf_config(config: dict[str, Any], name: str | None = None) -> ModelSpec:
    """Build a ModelSpec from a Hugging Face config dict (Mixtral, DBRX, Qwen2-MoE, DeepSeek-V2/V3,
    OLMoE, and configs that use the same keys)."""
    if not isinstance(config, dict):
        raise ModelConfigError("config.json must hold a JSON object")
    model_type = str(config.get("model_type", ""))
    name = name or str(config.get("_name_or_path") or model_type or "model")
    if model_type == "dbrx":
        attn, ffn = config.get("attn_config") or {}, config.get("ffn_config") or {}
        d_model, n_heads = _require(config, name, "d_model"), _require(config, name, "n_heads")
        return ModelSpec(
            name=name, model_type=model_type, num_layers=_require(config, name, "n_layers"),
            hidden_size=d_model, expert_intermediate_size=_require(ffn, name, "ffn_hidden_size"),
            num_heads=n_heads, num_kv_heads=_get(attn, "kv_n_heads", default=n_heads),
            head_dim=d_model // n_heads, num_experts=_require(ffn, name, "moe_num_experts"),
            top_k=_require(ffn, name, "moe_top_k"), vocab_size=_require(config, name, "vocab_size"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            rope_theta=float(_get(attn, "rope_theta", default=10000.0)),
        )

    hidden = _require(config, name, "hidden_size")
    num_heads = _require(config, name, "num_attention_heads")
    num_experts = _get(config, "num_local_experts", "n_routed_experts", "num_experts")
    if num_experts is None:
        raise ModelConfigError(
            f"model {name!r}: model_type {model_type!r} has no experts (no num_local_experts, "
            f"n_routed_experts or num_experts in config.json); only MoE models are supported")
    moe_intermediate = _get(config, "moe_intermediate_size", "intermediate_size")
    num_layers = _require(config, name, "num_hidden_layers")
    shared, dense_layers, dense_intermediate = 0, 0, 0
    if model_type.startswith("deepseek"):
        shared = int(_get(config, "n_shared_experts", default=0) or 0) * moe_intermediate
        dense_layers = int(_get(config, "first_k_dense_replace", default=0) or 0)
        dense_intermediate = _get(config, "intermediate_size", default=0) if dense_layers else 0
    elif model_type == "qwen2_moe":
        shared = int(_get(config, "shared_expert_intermediate_size", default=0) or 0)
        step = int(_get(config, "decoder_sparse_step", default=1) or 1)
        mlp_only = set(_get(config, "mlp_only_layers", default=[]) or [])
        dense_layers = sum(1 for i in range(num_layers)
                           if i in mlp_only or (i + 1) % step != 0)
        dense_intermediate = _get(config, "intermediate_size", default=0) if dense_layers else 0
    kv_lora = int(_get(config, "kv_lora_rank", default=0) or 0)
    head_dim = (_get(config, "qk_nope_head_dim") if kv_lora
                else _get(config, "head_dim", default=hidden // num_heads))
    return ModelSpec(
        name=name, model_type=model_type, num_layers=num_layers, hidden_size=hidden,
        expert_intermediate_size=moe_intermediate, num_heads=num_heads,
        num_kv_heads=_get(config, "num_key_value_heads", default=num_heads),
        head_dim=head_dim, num_experts=num_experts,
        top_k=_require(config, name, "num_experts_per_tok", "moe_top_k"),
        vocab_size=_require(config, name, "vocab_size"),
        shared_intermediate_size=shared,
        shared_expert_gate=model_type == "qwen2_moe" and shared > 0,
        num_dense_layers=dense_layers, dense_intermediate_size=dense_intermediate,
        attention_bias=bool(_get(config, "attention_bias", "qkv_bias",
                                 default=model_type == "qwen2_moe")),
        qk_norm=model_type == "olmoe",
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        kv_lora_rank=kv_lora, q_lora_rank=int(_get(config, "q_lora_rank", default=0) or 0),
        qk_rope_head_dim=int(_get(config, "qk_rope_head_dim", default=0) or 0) if kv_lora else 0,
        v_head_dim=int(_get(config, "v_head_dim", default=0) or 0) if kv_lora else 0,
        # transformers >= 5 nests rope_theta under rope_parameters
        rope_theta=float(_get(config, "rope_theta", default=None)
                         or _get(config.get("rope_parameters") or {}, "rope_theta", default=1e4)),
        rms_norm_eps=float(_get(config, "rms_norm_eps", default=1e-5)),
    )


def shipped_models() -> list[str]:
    """Names of the configs shipped in hrm/model_configs/."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_model_spec(name_or_path: str | Path) -> ModelSpec:
    """A ModelSpec from a shipped name ('mixtral-8x7b'), a config.json path, or a checkpoint
    directory holding config.json."""
    path = Path(name_or_path)
    if not path.exists():
        shipped = CONFIG_DIR / f"{name_or_path}.json"
        if not shipped.exists():
            raise ModelConfigError(f"unknown model {str(name_or_path)!r}: not a file and not a "
                                   f"shipped config (shipped: {', '.join(shipped_models())})")
        path = shipped
    if path.is_dir():
        path = path / "config.json"
        if not path.exists():
            raise ModelConfigError(f"{path.parent}: directory has no config.json")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelConfigError(f"{path}: cannot read model config: {exc}") from None
    default_name = path.stem if path.parent == CONFIG_DIR else None
    return from_hf_config(config, name=default_name)
