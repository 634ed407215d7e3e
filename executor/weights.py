"""Model weights for the executor: dense weights on the GPU, routed experts in paged CPU memory.

Placement (hrm/policy.py): attention, norms, routers, shared experts and embeddings stay on the
GPU. Of the routed experts, r_w = weights_gpu_fraction is realized in whole experts: R = round(r_w
* l * n_e) experts are GPU-resident, spread over the layers (layer i keeps the first R // l
experts, plus one for i < R mod l), so the realized fraction R / (l * n_e) is within 1 / (2 l n_e)
of r_w. The other experts of a layer live in one flat CPU buffer, [w13_e | w2_e] per expert, cut
into pages of `weight_page_bytes` that stream to the GPU. The buffers are page-locked in place
while the pinned budget lasts, in whole pages spread so that every layer leaves the same bytes
pageable (`pin_plan`): the bytes left pageable are what the cost model's pinned overflow
o = max(0, streamed bytes - pinnable) counts, o / l_moe of them in each layer where the layers
stream alike. Pageable pages go through the pinned staging ring of the link (executor/schedule.py).

Weights come from a local Hugging Face checkpoint (config.json + *.safetensors, read lazily
tensor by tensor straight into the pages) or are random at the real shapes: a random tile is
repeated (values do not matter for throughput, and 90 GB of normal_ on the CPU takes minutes).

With K GPUs every rank holds its `Shard` (executor/distributed.py): the spec above is then the
shard's, checkpoint tensors are read as slices (a rank never reads a whole tensor it only needs
part of), and random weights are drawn from the same seed on every rank, so the replicated
tensors (router, norms, embeddings, LM head) are equal across ranks.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from executor.distributed import Shard
from executor.layers import DenseLayer, ExpertFn, fused_qkv
from hrm.errors import ModelConfigError
from hrm.model import ModelSpec, from_hf_config, load_model_spec
from hrm.policy import resident_experts_by_layer, staged_experts

SUPPORTED = ("mixtral", "qwen2_moe")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: standard deviation of random weights (the models' initializer_range)
RANDOM_STD = 0.02
RANDOM_TILE_ELEMENTS = (1 << 22) + 7  # not a divisor of any expert size


class CheckpointError(ModelConfigError):
    """A checkpoint directory is incomplete or does not match its config."""


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype of a policy dtype name; int8/fp8 weights are not supported by the executor."""
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise ModelConfigError(f"the executor runs {sorted(TORCH_DTYPES)} weights and KV, not "
                               f"{name!r}; change weight_dtype/kv_dtype in the policy") from None


def read_model(name_or_path: str | Path) -> tuple[ModelSpec, dict[str, Any]]:
    """The spec and raw config.json of a shipped model name, config file or checkpoint dir."""
    spec = load_model_spec(name_or_path)
    path = Path(name_or_path)
    if not path.exists():
        path = Path(__file__).resolve().parent.parent / "hrm" / "model_configs" / \
            f"{name_or_path}.json"
    config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    check_supported(spec)
    return spec, config


def check_supported(spec: ModelSpec) -> None:
    if spec.model_type not in SUPPORTED:
        raise ModelConfigError(f"model {spec.name!r}: the executor runs {SUPPORTED} models, not "
                               f"model_type {spec.model_type!r}")
    if spec.num_dense_layers:
        raise ModelConfigError(f"model {spec.name!r}: layers with a dense MLP instead of experts "
                               "(mlp_only_layers / decoder_sparse_step) are not supported")


def renormalize_topk(spec: ModelSpec, config: dict[str, Any]) -> bool:
    """Mixtral renormalizes the top-k router weights; Qwen2-MoE only with norm_topk_prob."""
    return spec.model_type == "mixtral" or bool(config.get("norm_topk_prob", False))


def resident_experts_per_layer(spec: ModelSpec, weights_gpu_fraction: float) -> list[int]:
    """GPU-resident experts of each layer realizing r_w in whole experts (module docstring)."""
    return resident_experts_by_layer(weights_gpu_fraction, spec.num_layers, spec.num_experts)


@dataclass
class ExpertStore:
    """Routed experts: per layer a GPU flat buffer (resident experts 0..R_i-1) and a CPU flat
    buffer (streamed experts R_i..n_e-1), each expert laid out as [w13 (2 h2 x h1) | w2 (h1 x
    h2)]; plus the policy's GPU staging buffers (two: double buffering), each sized for the
    largest streamed layer, or for a whole layer with `whole_layers`, allocated by
    `configure_staging` (the Engine calls it). Indices are local: `local`
    maps a global expert id to its local index (the experts this rank holds; by default all n_e,
    in order)."""

    spec: ModelSpec
    dtype: torch.dtype
    device: torch.device
    resident: list[int]
    gpu: list[torch.Tensor]
    cpu: list[torch.Tensor]
    #: per layer, the leading elements of `cpu[layer]` that are page-locked
    pinned_elements: list[int]
    staging: list[torch.Tensor]
    page_elements: int
    local: dict[int, int] = field(default_factory=dict)
    #: the staging buffers hold a layer's every expert at its own index: the streamed ones from
    #: the host, the resident ones copied in on the GPU (WeightLink), for the grouped GEMMs
    #: (`configure_staging`)
    whole_layers: bool = False
    #: the views `stacked` hands out, made once per buffer
    _stacked: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.local = self.local or {e: e for e in range(self.spec.num_experts)}

    @property
    def expert_elements(self) -> int:
        return 3 * self.spec.hidden_size * self.spec.expert_intermediate_size

    @classmethod
    def one_resident_layer(cls, spec: ModelSpec, flat: torch.Tensor) -> ExpertStore:
        """One layer of `spec`'s n_e experts, all resident in `flat` on its device (nothing
        streamed, no staging): what the grouped-experts benchmarks time
        (hrm.profile.grouped_experts_series, benchmarks/diag_grouped_experts.py)."""
        return cls(replace(spec, num_layers=1), flat.dtype, flat.device, [spec.num_experts],
                   [flat], [flat[:0]], [0], [], 1)

    def configure_staging(self, buffers: int, expert_kernel: str) -> None:
        """The staging buffers a policy runs with: `buffers` of them (policy staging_buffers),
        each of hrm.policy.staged_experts experts, a whole layer (`whole_layers`) where the
        grouped kernel meets a layer split between resident and streamed experts, so that
        `stacked` finds every expert of every layer in one buffer."""
        e = self.spec.num_experts
        whole = expert_kernel == "grouped" and any(0 < r < e for r in self.resident)
        elements = staged_experts(self.resident, e, expert_kernel) * self.expert_elements
        count = buffers if elements else 0
        if whole == self.whole_layers and len(self.staging) == count and \
                all(t.numel() == elements for t in self.staging):
            return
        self.staging = []   # freed before the new ones
        self.staging = [torch.empty(elements, dtype=self.dtype, device=self.device)
                        for _ in range(count)]
        self._stacked.clear()
        self.whole_layers = whole

    def staged_offset(self, layer: int) -> int:
        """Elements of a staging buffer before the layer's first streamed expert: its resident
        experts' with `whole_layers`, else 0."""
        return self.resident[layer] * self.expert_elements if self.whole_layers else 0

    def views(self, flat: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13, w2) of the index-th expert stored in a flat buffer."""
        h1, h2 = self.spec.hidden_size, self.spec.expert_intermediate_size
        base = index * self.expert_elements
        w13 = flat[base:base + 2 * h1 * h2].view(2 * h2, h1)
        return w13, flat[base + 2 * h1 * h2:base + 3 * h1 * h2].view(h1, h2)

    def expert_fn(self, layer: int, staging_index: int,
                  ready: Callable[[], None] | None = None) -> ExpertFn:
        """Expert lookup for `layer` whose streamed experts sit in staging buffer
        `staging_index`; `ready()` is called before a streamed expert is handed out (it orders
        the GEMMs after the copy that fills the buffer)."""
        resident = self.resident[layer]

        def expert(e: int) -> tuple[torch.Tensor, torch.Tensor] | None:
            i = self.local.get(e)
            if i is None:
                return None
            if i < resident:
                return self.views(self.gpu[layer], i)
            if ready is not None:
                ready()
            return self.views(self.staging[staging_index],
                              i if self.whole_layers else i - resident)

        return expert

    def stacked(self, layer: int, staging_index: int, ready: Callable[[], None] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(w13t [E, h1, 2 h2], w2t [E, h2, h1]): every expert of `layer`, transposed, as strided
        views of the one buffer that holds them all in order (its resident copy when all are
        resident, else its staging buffer: all streamed, or `whole_layers`; `ready()` orders
        the GEMMs after the copy that fills it), for the grouped GEMMs
        (executor.layers.routed_experts_grouped). The views are made once per buffer, not per
        micro-batch (hrm.roofline OPS_MOE_GROUPED counts none). None where a layer's experts
        are split between the two buffers (without `whole_layers`), or over ranks."""
        e, h1, h2 = self.spec.num_experts, self.spec.hidden_size, self.spec.expert_intermediate_size
        if len(self.local) != e or (self.resident[layer] not in (0, e) and not self.whole_layers):
            return None
        if self.resident[layer] == e:
            key, flat = ("gpu", layer), self.gpu[layer]
        else:
            if ready is not None:
                ready()
            key, flat = ("staging", staging_index), self.staging[staging_index]
        if key not in self._stacked:
            step = self.expert_elements
            w13 = flat.as_strided((e, 2 * h2, h1), (step, h1, 1))
            w2 = flat.as_strided((e, h1, h2), (step, h2, 1), 2 * h1 * h2)
            self._stacked[key] = (w13.transpose(1, 2), w2.transpose(1, 2))
        return self._stacked[key]

    def streamed_bytes(self, layer: int) -> int:
        return self.cpu[layer].numel() * self.cpu[layer].element_size()

    def pinned_bytes(self, layer: int) -> int:
        return self.pinned_elements[layer] * self.cpu[layer].element_size()

    def fully_pinned(self, layer: int) -> bool:
        return self.pinned_elements[layer] >= self.cpu[layer].numel()

    def unpin(self) -> None:
        """Unregister the page-locked buffers (`_pin`), for a process that frees this store and
        builds another: its host buffers may reuse the same addresses, which the driver refuses
        to register twice (H200 machine, 2026-12-03: "part or all of the requested memory range
        is already mapped", the profile's second calibration). Not for the stores of
        hrm.validate.SharedModel.weights_for, whose buffers are views of a shared one."""
        for layer, pinned in enumerate(self.pinned_elements):
            if pinned and self.device.type == "cuda":
                torch.cuda.cudart().cudaHostUnregister(self.cpu[layer].data_ptr())
            self.pinned_elements[layer] = 0

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.gpu)

    def staging_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.staging)

    def realized_gpu_fraction(self) -> float:
        return sum(self.resident) / (self.spec.num_layers * self.spec.num_experts)


@dataclass
class ModelWeights:
    spec: ModelSpec
    config: dict[str, Any]
    embed: torch.Tensor
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    layers: list[DenseLayer]
    experts: ExpertStore
    source: str
    #: bytes of GPU tensors by role (dense, resident experts, staging)
    gpu_bytes: dict[str, int] = field(default_factory=dict)


def _allocate_store(spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                    resident: list[int], page_bytes: int, pin_budget_bytes: float,
                    held: list[int]) -> ExpertStore:
    """Buffers for the experts `held` (global ids; spec is the shard's, n_e = len(held))."""
    unit = 3 * spec.hidden_size * spec.expert_intermediate_size
    elem = torch.empty((), dtype=dtype).element_size()
    gpu = [torch.empty(r * unit, dtype=dtype, device=device) for r in resident]
    cpu = [torch.empty((spec.num_experts - r) * unit, dtype=dtype) for r in resident]
    page_elements = max(1, page_bytes // elem)
    budget = pin_budget_bytes if device.type == "cuda" else 0.0
    pinned = [0] * len(cpu)
    for layer, want in enumerate(pin_plan([t.numel() for t in cpu], elem, budget,
                                          page_elements)):
        if want and not _pin(cpu[layer][:want]):
            break  # the driver refused: the rest stays pageable
        pinned[layer] = want
    # no staging buffers yet: the Engine allocates the policy's (configure_staging)
    return ExpertStore(spec, dtype, device, resident, gpu, cpu, pinned, [], page_elements,
                       {e: i for i, e in enumerate(held)})


def pin_plan(layer_elements: list[int], element_bytes: int, budget_bytes: float,
             page_elements: int) -> list[int]:
    """Elements to page-lock at the start of each layer's streamed buffer under `budget_bytes`,
    in whole pages (a layer's last page may be short), so that every layer leaves the same
    pageable overflow to within a page (a layer streaming less than that stays wholly pageable):
    page by page, the layer with the most unpinned elements gets its next page while it fits.
    Balanced, every layer's weight stream overlaps its pinned DMA with its copy-thread staging,
    the per-layer o / l_moe of hrm.cost; pinning whole layers first would leave the overflow to
    the last layers, whose copies then stall the pipeline."""
    if budget_bytes >= element_bytes * sum(layer_elements):   # an infinite budget too
        return list(layer_elements)
    left = int(budget_bytes // element_bytes)
    plan = [0] * len(layer_elements)
    heap = [(-n, layer) for layer, n in enumerate(layer_elements) if n]
    heapq.heapify(heap)
    while heap:
        _, layer = heapq.heappop(heap)
        page = min(page_elements, layer_elements[layer] - plan[layer])
        if page > left:
            continue  # this layer's next page does not fit; a shorter last page may
        plan[layer] += page
        left -= page
        if plan[layer] < layer_elements[layer]:
            heapq.heappush(heap, (plan[layer] - layer_elements[layer], layer))
    return plan


def _pin(buffer: torch.Tensor) -> bool:
    """Page-lock a host buffer in place with cudaHostRegister (exactly its size: torch's pinned
    allocator would round each allocation up to a power of two). False if the driver refuses."""
    rc = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(),
                                              buffer.numel() * buffer.element_size(), 0)
    return int(rc) == 0


def _tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _dense_bytes(embed: torch.Tensor, final_norm: torch.Tensor, lm_head: torch.Tensor,
                 layers: list[DenseLayer]) -> int:
    per_layer = sum(_tensor_bytes(*vars(layer).values()) for layer in layers)
    head = 0 if lm_head.data_ptr() == embed.data_ptr() else _tensor_bytes(lm_head)
    return per_layer + _tensor_bytes(embed, final_norm) + head


def _finish(spec: ModelSpec, config: dict[str, Any], embed: torch.Tensor, final_norm: torch.Tensor,
            lm_head: torch.Tensor, layers: list[DenseLayer], store: ExpertStore,
            source: str) -> ModelWeights:
    gpu_bytes = {"dense": _dense_bytes(embed, final_norm, lm_head, layers),
                 "resident_experts": store.resident_bytes(), "staging": store.staging_bytes()}
    return ModelWeights(spec, config, embed, final_norm, lm_head, layers, store, source, gpu_bytes)


# ---- random weights ----------------------------------------------------------------------------
def random_weights(spec: ModelSpec, config: dict[str, Any], *, dtype: torch.dtype,
                   device: torch.device, resident: list[int], page_bytes: int,
                   pin_budget_bytes: float, seed: int = 0, shard: Shard = Shard()
                   ) -> ModelWeights:
    """Random weights at the real shapes of the shard of `spec`. Dense weights are drawn on the
    device; expert buffers are filled by repeating one random tile (a memcpy-speed fill)."""
    check_supported(spec)
    num_experts, spec = spec.num_experts, shard.spec(spec)
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)
                * RANDOM_STD).to(dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=dtype, device=device)

    h1, d = spec.hidden_size, spec.head_dim
    q_out, kv_out = spec.num_heads * d, spec.num_kv_heads * d
    shared = spec.shared_intermediate_size
    layers = [DenseLayer(
        input_norm=ones(h1), post_norm=ones(h1), wqkv=rand(q_out + 2 * kv_out, h1),
        wo=rand(h1, q_out), router=rand(num_experts, h1),
        bqkv=rand(q_out + 2 * kv_out) if spec.attention_bias else None,
        shared_w13=rand(2 * shared, h1) if shared else None,
        shared_w2=rand(h1, shared) if shared else None,
        shared_gate=rand(1, h1) if spec.shared_expert_gate else None,
    ) for _ in range(spec.num_layers)]
    embed = rand(spec.vocab_size, h1)
    lm_head = embed if spec.tie_word_embeddings else rand(spec.vocab_size, h1)
    store = _allocate_store(spec, dtype, device, resident, page_bytes, pin_budget_bytes,
                            shard.experts(num_experts))
    tile = rand(RANDOM_TILE_ELEMENTS)
    cpu_tile = tile.cpu()
    for flat in store.gpu:
        _fill_tiled(flat, tile)
    for flat in store.cpu:
        _fill_tiled(flat, cpu_tile)
    return _finish(spec, config, embed, ones(h1), lm_head, layers, store, "random")


def _fill_tiled(flat: torch.Tensor, tile: torch.Tensor) -> None:
    """flat[i] = tile[i mod len(tile)], as one broadcast copy plus a tail."""
    n, t = flat.numel(), tile.numel()
    full = n // t
    if full:
        flat[:full * t].view(full, t).copy_(tile.expand(full, t))
    flat[full * t:].copy_(tile[:n - full * t])


# ---- Hugging Face checkpoints -----------------------------------------------------------------
class _Checkpoint:
    """Lazy access to the tensors of a safetensors checkpoint directory."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (directory / f).exists()]
            if missing:
                raise CheckpointError(f"{directory}: shard(s) {', '.join(missing)} listed in "
                                      "model.safetensors.index.json are missing")
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{directory}: no *.safetensors files (only safetensors "
                                      "checkpoints are supported)")
        self.handles = [safe_open(str(directory / f), framework="pt") for f in files]
        self.where = {k: h for h in self.handles for k in h.keys()}  # noqa: SIM118
        self.directory = directory

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
            index: tuple[int | slice, ...] = ()) -> torch.Tensor:
        """The tensor `name` of full shape `shape`, or only its part `index` (read as a slice)."""
        if name not in self.where:
            raise CheckpointError(f"{self.directory}: checkpoint lacks tensor {name!r}")
        part = self.where[name].get_slice(name)
        if tuple(part.get_shape()) != shape:
            raise CheckpointError(f"{self.directory}: tensor {name!r} has shape "
                                  f"{tuple(part.get_shape())}, config.json implies {shape}")
        return (part[index] if index else part[:]).to(dtype)


def _expert_tensors(ckpt: _Checkpoint, spec: ModelSpec, layer: int, e: int, dtype: torch.dtype,
                    shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13, w2) of the shard's part of expert e (spec: the whole model's) in any of the layouts
    transformers writes: Mixtral's per-expert w1/w3/w2, Qwen2-MoE's gate_proj/up_proj/down_proj,
    or fused gate_up_proj/down_proj [n_e, ...]."""
    h1, h2 = spec.hidden_size, spec.expert_intermediate_size
    cut = shard.expert_rows(h2)
    cols = (slice(None), cut)
    for prefix, (n1, n3, n2) in ((f"model.layers.{layer}.block_sparse_moe.experts",
                                  ("w1", "w3", "w2")),
                                 (f"model.layers.{layer}.mlp.experts",
                                  ("gate_proj", "up_proj", "down_proj"))):
        if ckpt.has(f"{prefix}.{e}.{n1}.weight"):
            w1 = ckpt.get(f"{prefix}.{e}.{n1}.weight", (h2, h1), dtype, (cut,))
            w3 = ckpt.get(f"{prefix}.{e}.{n3}.weight", (h2, h1), dtype, (cut,))
            return torch.cat((w1, w3)), ckpt.get(f"{prefix}.{e}.{n2}.weight", (h1, h2), dtype,
                                                 cols)
        if ckpt.has(f"{prefix}.gate_up_proj"):
            name, shape = f"{prefix}.gate_up_proj", (spec.num_experts, 2 * h2, h1)
            w13 = torch.cat((ckpt.get(name, shape, dtype, (e, cut)),
                             ckpt.get(name, shape, dtype,
                                      (e, slice(h2 + cut.start, h2 + cut.stop)))))
            return w13, ckpt.get(f"{prefix}.down_proj", (spec.num_experts, h1, h2), dtype,
                                 (e, *cols))
    raise CheckpointError(f"{ckpt.directory}: no weights for expert {e} of layer {layer}")


def load_checkpoint(directory: str | Path, *, dtype: torch.dtype, device: torch.device,
                    resident: list[int], page_bytes: int, pin_budget_bytes: float,
                    shard: Shard = Shard()) -> ModelWeights:
    """Load the shard of a local HF checkpoint: dense tensors to `device`, experts into their
    pages."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} is not a directory")
    spec, config = read_model(directory)
    spec = from_hf_config(config, name=directory.name)
    ckpt = _Checkpoint(directory)
    h1, d, shared = spec.hidden_size, spec.head_dim, spec.shared_intermediate_size
    q_out, kv_out = spec.num_heads * d, spec.num_kv_heads * d
    q_rows, kv_rows, s_rows = shard.rows(q_out), shard.rows(kv_out), shard.rows(shared)

    def get(name: str, *shape: int, index: tuple[slice, ...] = ()) -> torch.Tensor:
        return ckpt.get(name, tuple(shape), dtype, index).to(device)

    def qkv_bias(p: str) -> torch.Tensor | None:
        """b_qkv of layer prefix `p`; None where the architecture or the checkpoint has none."""
        names = [f"{p}.self_attn.{x}_proj.bias" for x in "qkv"]
        present = [ckpt.has(n) for n in names] if spec.attention_bias else [False]
        if not any(present):
            return None
        if not all(present):
            raise CheckpointError(f"{directory}: {names[present.index(False)]} is missing "
                                  "(the other attention biases are there)")
        return fused_qkv(*(get(n, size, index=(rows,)) for n, size, rows in
                           zip(names, (q_out, kv_out, kv_out), (q_rows, kv_rows, kv_rows),
                               strict=True)))

    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        moe = f"{p}.block_sparse_moe" if spec.model_type == "mixtral" else f"{p}.mlp"
        sp = f"{p}.mlp.shared_expert"
        layers.append(DenseLayer(
            input_norm=get(f"{p}.input_layernorm.weight", h1),
            post_norm=get(f"{p}.post_attention_layernorm.weight", h1),
            wqkv=fused_qkv(get(f"{p}.self_attn.q_proj.weight", q_out, h1, index=(q_rows,)),
                           get(f"{p}.self_attn.k_proj.weight", kv_out, h1, index=(kv_rows,)),
                           get(f"{p}.self_attn.v_proj.weight", kv_out, h1, index=(kv_rows,))),
            wo=get(f"{p}.self_attn.o_proj.weight", h1, q_out, index=(slice(None), q_rows)),
            router=get(f"{moe}.gate.weight", spec.num_experts, h1),
            bqkv=qkv_bias(p),
            shared_w13=torch.cat((get(f"{sp}.gate_proj.weight", shared, h1, index=(s_rows,)),
                                  get(f"{sp}.up_proj.weight", shared, h1, index=(s_rows,))))
            if shared else None,
            shared_w2=get(f"{sp}.down_proj.weight", h1, shared, index=(slice(None), s_rows))
            if shared else None,
            shared_gate=get(f"{p}.mlp.shared_expert_gate.weight", 1, h1)
            if spec.shared_expert_gate else None,
        ))
    embed = get("model.embed_tokens.weight", spec.vocab_size, h1)
    lm_head = embed if spec.tie_word_embeddings else get("lm_head.weight", spec.vocab_size, h1)
    local = shard.spec(spec)
    store = _allocate_store(local, dtype, device, resident, page_bytes, pin_budget_bytes,
                            shard.experts(spec.num_experts))
    for i in range(spec.num_layers):
        for e, j in store.local.items():
            r = store.resident[i]
            w13, w2 = store.views(store.gpu[i], j) if j < r else store.views(store.cpu[i], j - r)
            src13, src2 = _expert_tensors(ckpt, spec, i, e, dtype, shard)
            w13.copy_(src13)
            w2.copy_(src2)
    return _finish(local, config, embed, get("model.norm.weight", h1), lm_head, layers, store,
                   str(directory))
