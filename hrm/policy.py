"""Policy: how an offloaded MoE model is run (MoE-Lightning's (N, mu, A_g, F_g, r_w, r_c), plus
page size, dtypes and the schedule). Saved as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from hrm.errors import PolicyError
from hrm.io import write_json_atomic
from hrm.units import DTYPE_BYTES, MiB

DEVICES = ("cpu", "gpu")
#: cgopipe: CPU attention, GPU FFN and paged weight H2D overlap (MoE-Lightning S1);
#: cgopipe-serial: the same placement with every stage run one after another (S3);
#: layerwise: attention on the GPU, weights moved layer by layer, no overlap (FlexGen/accelerate)
SCHEDULES = ("cgopipe", "cgopipe-serial", "layerwise")
#: how the layers are split over `num_gpus` GPUs. tp: attention heads and every expert's
#: intermediate dimension are sharded (all-reduce after attention and after the MoE block);
#: ep: attention heads sharded as in tp, whole experts dealt out round-robin (all-reduce of the
#: partial MoE sums)
PARALLELISMS = ("tp", "ep")
#: how a decode micro-batch's routed experts run (executor.layers). loop: a GEMM pair per touched
#: expert, after the routing's per-expert row counts are read on the host (a sync per
#: micro-batch); grouped: one grouped GEMM pair over all experts (torch._grouped_mm) with the
#: group boundaries computed on the device, so the launching thread neither waits for the routing
#: nor issues per-expert work; where a layer keeps some of its experts on the GPU, the staging
#: buffer holds the whole layer, the resident experts copied in on the GPU (`staged_experts`).
#: Prefill always loops (its chunks bound the intermediates)
EXPERT_KERNELS = ("loop", "grouped")


def resident_experts(weights_gpu_fraction: float, num_layers: int, num_experts: int) -> int:
    """R = round(r_w l n_e): the routed experts the executor keeps on the GPU, whole experts
    spread over the layers (executor/weights.py)."""
    return round(weights_gpu_fraction * num_layers * num_experts)


def resident_experts_by_layer(weights_gpu_fraction: float, num_layers: int, num_experts: int
                              ) -> list[int]:
    """The R = `resident_experts` spread over the layers: floor(R / l) each, one more in the
    first R mod l layers (executor/weights.py keeps them so)."""
    base, extra = divmod(resident_experts(weights_gpu_fraction, num_layers, num_experts),
                         num_layers)
    return [base + (1 if i < extra else 0) for i in range(num_layers)]


def staged_experts(resident_by_layer: list[int], num_experts: int, expert_kernel: str) -> int:
    """Experts each GPU staging buffer holds (executor/weights.py): the largest
    streamed layer, n_e - min_i R_i; with expert_kernel='grouped' and a layer split between
    resident and streamed experts, all n_e of a layer, so that one grouped GEMM pair reads
    every expert from one buffer (the link copies the resident ones in on the GPU:
    executor.schedule.WeightLink)."""
    if expert_kernel == "grouped" and any(0 < r < num_experts for r in resident_by_layer):
        return num_experts
    return num_experts - min(resident_by_layer, default=num_experts)


@dataclass(frozen=True)
class Policy:
    """Expert FFNs always run on the GPU; the dense weights (attention, routers, shared experts,
    embeddings) are always GPU-resident. `weights_gpu_fraction` (r_w) is the fraction of the
    routed-expert bytes of every layer kept on the GPU; the rest streams over the link."""

    batch_size: int                    # N: sequences that share one pass over the weights
    micro_batch_size: int              # mu: sequences per GPU kernel launch
    attn_prefill_device: str = "gpu"
    attn_decode_device: str = "cpu"    # A_g = (attn_decode_device == "gpu")
    weights_gpu_fraction: float = 0.0  # r_w
    kv_gpu_fraction: float = 0.0       # r_c, only with GPU decode attention
    weight_page_bytes: int = 16 * MiB
    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    schedule: str = "cgopipe"
    num_gpus: int = 1                  # G: GPUs, each with its own process and weight shard
    parallelism: str = "tp"            # tp | ep, only meaningful with num_gpus > 1
    expert_kernel: str = "loop"        # loop | grouped: decode's routed experts (EXPERT_KERNELS)
    #: b: GPU staging buffers of streamed expert layers; visit g fills buffer g mod b once visit
    #: g - b's compute is done (2: double buffering). Not searched by hrm optimize: the cost
    #: model's max() of the stages has no term that a third buffer shortens, only its memory
    staging_buffers: int = 2

    def __post_init__(self) -> None:
        for name in ("batch_size", "micro_batch_size", "weight_page_bytes", "num_gpus",
                     "staging_buffers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise PolicyError(f"policy {name} must be a positive integer, got {value!r}")
        if self.batch_size % self.micro_batch_size:
            raise PolicyError(f"policy batch_size={self.batch_size} is not a multiple of "
                              f"micro_batch_size={self.micro_batch_size}")
        for name in ("attn_prefill_device", "attn_decode_device"):
            if getattr(self, name) not in DEVICES:
                raise PolicyError(f"policy {name} must be one of {DEVICES}, "
                                  f"got {getattr(self, name)!r}")
        for name in ("weights_gpu_fraction", "kv_gpu_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or \
                    not 0.0 <= value <= 1.0:
                raise PolicyError(f"policy {name} must be in [0, 1], got {value!r}")
        if self.attn_decode_device == "cpu" and self.kv_gpu_fraction > 0:
            raise PolicyError("policy kv_gpu_fraction > 0 needs attn_decode_device='gpu' "
                              "(CPU attention reads the KV cache from CPU memory)")
        for name in ("weight_dtype", "kv_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise PolicyError(f"policy {name} must be one of {sorted(DTYPE_BYTES)}, "
                                  f"got {getattr(self, name)!r}")
        if self.schedule not in SCHEDULES:
            raise PolicyError(f"policy schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.parallelism not in PARALLELISMS:
            raise PolicyError(f"policy parallelism must be one of {PARALLELISMS}, "
                              f"got {self.parallelism!r}")
        if self.expert_kernel not in EXPERT_KERNELS:
            raise PolicyError(f"policy expert_kernel must be one of {EXPERT_KERNELS}, "
                              f"got {self.expert_kernel!r}")
        if self.staging_buffers < 2:
            raise PolicyError(f"policy staging_buffers must be >= 2 (the next layer's weights "
                              f"stream while this one computes), got {self.staging_buffers}")
        if self.expert_kernel == "grouped" and self.num_gpus > 1:
            raise PolicyError("expert_kernel='grouped' runs on one GPU (num_gpus=1)")
        if self.schedule == "layerwise" and self.attn_decode_device != "gpu":
            raise PolicyError("the layerwise schedule runs attention on the GPU: "
                              "set attn_decode_device='gpu'")

    @property
    def num_micro_batches(self) -> int:
        """n_ub = N / mu."""
        return self.batch_size // self.micro_batch_size

    def in_whole_experts(self, num_layers: int, num_experts: int) -> Policy:
        """The policy as the executor runs it: r_w = R / (l n_e) (`resident_experts`), within
        1 / (2 l n_e) of the requested r_w (a 1-layer Mixtral at r_w = 0.05 keeps no expert)."""
        resident = resident_experts(self.weights_gpu_fraction, num_layers, num_experts)
        return replace(self, weights_gpu_fraction=resident / (num_layers * num_experts))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        if not isinstance(data, dict):
            raise PolicyError("a policy must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PolicyError(f"policy has unknown keys {unknown}; known: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise PolicyError(f"policy is incomplete: {exc}") from None

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PolicyError(f"{path}: cannot read policy: {exc}") from None
        # a `hrm optimize --json` document holds the policy under "policy"
        if isinstance(data, dict) and isinstance(data.get("policy"), dict):
            data = data["policy"]
        return cls.from_dict(data)
