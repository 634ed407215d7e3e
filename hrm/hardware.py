"""HardwareProfile: the tiers of the Hierarchical Roofline Model, loaded from / saved to TOML.

Three tiers (MoE-Lightning §3): the GPU (compute P^g_peak, HBM bandwidth B^g_peak, capacity), the
CPU (P^c_peak, DRAM bandwidth B^c_peak, capacity, cores) and the CPU<->GPU link (B^{c,g}_peak, per
direction, pinned vs pageable). Optional efficiency curves, fitted by `hrm profile`, refine the
peaks: achieved GEMM FLOP/s vs rows, copy bandwidth vs transfer size, CPU attention bandwidth vs
KV bytes per call. Interference factors slow stages down when they overlap. An optional
interconnect tier describes a machine of several GPUs: how many, the GPU<->GPU all-reduce bus
bandwidth and latency, and whether the GPUs share one host link or each has its own.

TOML layout: every number is a table ``{ value = ..., source = "..." }`` so that each figure says
where it comes from (datasheet, paper, or measured with a date). Example::

    name = "t4"
    description = "..."
    [gpu]
    name = "NVIDIA T4"
    memory_bytes = { value = 16.0e9, source = "datasheet" }
    hbm_bandwidth_bps = { value = 320.0e9, source = "datasheet" }
    [gpu.peak_flops]
    fp16 = { value = 65.0e12, source = "datasheet, tensor cores" }
    [curves.gpu_gemm]
    peak = { value = 40.0e12, source = "fit" }
    half = { value = 96.0, source = "fit" }
    [interconnect]                      # optional: machines with several GPUs
    num_gpus = { value = 4, source = "nvidia-smi" }
    allreduce_bus_bps = { value = 12.0e9, source = "measured ..." }
    allreduce_latency_s = { value = 30.0e-6, source = "measured ..." }
    link_shared = { value = false, source = "one PCIe x16 slot per GPU" }
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from hrm.errors import HardwareProfileError
from hrm.io import write_text_atomic

PROFILE_DIR = Path(__file__).resolve().parent.parent / "hardware_profiles"


@dataclass(frozen=True)
class SaturatingCurve:
    """y(x) = peak * x / (x + half): a rate that saturates at `peak`, reaching half of it at
    x = `half`. For a copy of x bytes this is t(x) = half/peak + x/peak (latency + bandwidth);
    for a GEMM with x rows it is the tile/launch-limited efficiency curve."""

    peak: float
    half: float
    #: relative RMS error of the fit on the measurements it came from (0 if not fitted)
    rel_error: float = 0.0

    def __post_init__(self) -> None:
        if not (self.peak > 0 and math.isfinite(self.peak)) or not (self.half >= 0):
            raise HardwareProfileError(f"curve needs peak > 0 and half >= 0, got peak={self.peak}"
                                       f", half={self.half}")

    def __call__(self, x: float) -> float:
        return self.peak * x / (x + self.half) if x > 0 else 0.0

    def time_s(self, x: float) -> float:
        """Time to process amount x at the curve's rate: (x + half) / peak."""
        return (x + self.half) / self.peak if x > 0 else 0.0


@dataclass(frozen=True)
class GPUTier:
    name: str
    #: peak dense FLOP/s per dtype name ('bf16', 'fp16', 'fp8', 'int8', 'fp32')
    peak_flops: dict[str, float]
    hbm_bandwidth_bps: float
    memory_bytes: float
    #: fixed cost of launching one kernel / op from Python (s)
    op_overhead_s: float = 0.0
    #: the launching thread's seconds per micro-batch to hand its decode attention to the CPU
    #: worker and take the output back onto the GPU (executor.schedule.AttentionLink); 0 when
    #: not measured
    attention_handoff_s: float = 0.0
    #: the launching thread's seconds per operation of the executor's decode blocks, timed by
    #: their own code (hrm.profile.launch_blocks): the pre-attention block, the post-attention
    #: block with grouped experts and GPU decode attention (hrm.roofline ATTENTION_IN_BLOCK,
    #: POST_GROUPED_BLOCK, GPU_ATTENTION_BLOCK); 0 when not measured (op_overhead_s then)
    attention_in_op_s: float = 0.0
    post_grouped_op_s: float = 0.0
    gpu_attention_op_s: float = 0.0

    def block_op_s(self, block: str = "") -> float:
        """Host seconds per operation of launch block `block` (hrm.roofline Operator.host_block;
        the field `<block>_op_s`) where measured, else the tiny-op launch cost op_overhead_s."""
        measured = getattr(self, f"{block}_op_s", 0.0) if block else 0.0
        return measured or self.op_overhead_s

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype`; bf16 and fp16 stand in for each other, int8/fp8 fall back to
        the 16-bit rate (weights are dequantized to 16 bits for the matmul)."""
        for name in (dtype, {"bf16": "fp16", "fp16": "bf16"}.get(dtype, "bf16"), "bf16", "fp16"):
            if name in self.peak_flops:
                return self.peak_flops[name]
        raise HardwareProfileError(f"GPU {self.name!r} has no peak FLOP/s for {dtype!r}")


@dataclass(frozen=True)
class CPUTier:
    name: str
    cores: int
    peak_flops: float
    dram_bandwidth_bps: float
    memory_bytes: float


@dataclass(frozen=True)
class LinkTier:
    """The CPU<->GPU link (PCIe). Bandwidths in bytes/s."""

    h2d_pinned_bps: float
    d2h_pinned_bps: float
    h2d_pageable_bps: float
    d2h_pageable_bps: float
    #: largest host memory that can be pinned (bytes); inf when unknown
    pinned_max_bytes: float = math.inf
    #: pageable -> pinned staging copy by a CPU thread (bytes/s, reads + writes DRAM)
    pageable_to_pinned_bps: float = 0.0
    #: the launching thread's gather of CPU KV blocks into pinned memory for GPU attention
    #: (bytes/s copied, whole blocks; profiles before 2026-12-02d timed a ragged batch in bytes
    #: held); 0 when not measured
    kv_gather_bps: float = 0.0


@dataclass(frozen=True)
class Interference:
    """Slowdown factors (>= 1) of each stage when link, GPU and CPU attention run at once."""

    link: float = 1.0
    gpu: float = 1.0
    cpu_attention: float = 1.0
    #: the launching thread's host work (kernel launches from Python) beside the other stages;
    #: 0 where not measured (the GPU's factor stands in: hrm.cost.gpu_factors)
    launch: float = 0.0
    #: the GPU stage of the executor's own decode pipeline over its solo model, kernels plus the
    #: launching thread's host work (hrm.profile.pipeline_calibration); 0 where not measured.
    #: Where measured, it is the GPU stage's factor for kernels and host work alike
    #: (hrm.cost.gpu_factors)
    pipeline: float = 0.0
    #: the same with part of the weights staged by the copy thread (its memmove threads and the
    #: link thread contend with the launching thread); 0 where not measured (hrm.cost then
    #: takes `pipeline` for staged policies too)
    pipeline_staged: float = 0.0
    #: the copy thread's staging memcpy beside the three stages (staging_copy) and beside the
    #: link alone (staging_copy_link); 1 where not measured (hrm.cost: the copy's solo rate)
    staging_copy: float = 1.0
    staging_copy_link: float = 1.0


@dataclass(frozen=True)
class InterconnectTier:
    """The GPUs of one machine and the link between them (NVLink, or PCIe through the host).

    Ring all-reduce of S bytes over G GPUs (NCCL's bus-bandwidth convention):
    t = 2 (G - 1) / G * S / allreduce_bus_bps + allreduce_latency_s."""

    num_gpus: int = 1
    #: all-reduce bus bandwidth (bytes/s); 0 when unknown (then only one GPU can be modeled)
    allreduce_bus_bps: float = 0.0
    #: fixed cost of one all-reduce call (s)
    allreduce_latency_s: float = 0.0
    #: True: every GPU's host transfers share one CPU<->GPU link (its bandwidth is divided by
    #: the GPUs in use); False: each GPU has its own link of the [link] bandwidths
    link_shared: bool = False


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    gpu: GPUTier
    cpu: CPUTier
    link: LinkTier
    description: str = ""
    interference: Interference = field(default_factory=Interference)
    interconnect: InterconnectTier = field(default_factory=InterconnectTier)
    #: fitted curves, keyed 'gpu_gemm' (FLOP/s vs rows per expert), 'gpu_grouped_experts' (the
    #: same for a micro-batch's routed experts as grouped GEMMs), 'h2d' (bytes/s vs copy bytes),
    #: 'cpu_attention' (KV bytes/s vs KV bytes per call), 'cpu_gemm' (FLOP/s vs rows)
    curves: dict[str, SaturatingCurve] = field(default_factory=dict)
    #: where each value comes from, keyed by dotted path ('gpu.memory_bytes')
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    #: free-form provenance of a measured profile (benchmarks, versions, dates)
    measurements: dict[str, Any] = field(default_factory=dict, compare=False)

    def with_memory(self, gpu_memory_bytes: float | None = None,
                    cpu_memory_bytes: float | None = None,
                    pinned_max_bytes: float | None = None) -> HardwareProfile:
        """The same machine with the GPU and/or CPU memory capped (e.g. emulate a 16 GiB GPU),
        and/or the weights' pinned budget set (the executor's --pin-mem; inf: no limit)."""
        gpu, cpu, link, sources = self.gpu, self.cpu, self.link, dict(self.sources)
        if pinned_max_bytes is not None:
            if not pinned_max_bytes >= 0:
                raise HardwareProfileError(f"pinned memory budget must be >= 0 bytes, got "
                                           f"{pinned_max_bytes}")
            link = dataclasses.replace(link, pinned_max_bytes=float(pinned_max_bytes))
            sources["link.pinned_max_bytes"] = "user cap"
        if gpu_memory_bytes is not None:
            _check_positive("gpu memory", gpu_memory_bytes)
            gpu = dataclasses.replace(gpu, memory_bytes=float(gpu_memory_bytes))
            sources["gpu.memory_bytes"] = "user cap"
        if cpu_memory_bytes is not None:
            _check_positive("cpu memory", cpu_memory_bytes)
            cpu = dataclasses.replace(cpu, memory_bytes=float(cpu_memory_bytes))
            sources["cpu.memory_bytes"] = "user cap"
        return dataclasses.replace(self, gpu=gpu, cpu=cpu, link=link, sources=sources)

    def check_gpus(self, num_gpus: int) -> None:
        """Raise HardwareProfileError unless `num_gpus` GPUs can be modeled on this machine."""
        have = self.interconnect.num_gpus
        if num_gpus > have:
            raise HardwareProfileError(
                f"{self.name} has {have} GPU{'s' if have > 1 else ''} (interconnect.num_gpus), "
                f"{num_gpus} asked")
        if num_gpus > 1 and self.interconnect.allreduce_bus_bps <= 0:
            raise HardwareProfileError(
                f"{self.name} has no interconnect.allreduce_bus_bps: cannot model {num_gpus} "
                f"GPUs (hrm profile measures it when several GPUs are visible)")

    def per_gpu(self, num_gpus: int) -> HardwareProfile:
        """The machine as each of `num_gpus` GPU processes sees it: with a shared host link
        (`interconnect.link_shared`) each gets 1/G of its bandwidth; with one link per GPU, or
        G = 1, the profile unchanged. GPU memory is per GPU already; CPU and pinned memory stay
        the machine's (shared)."""
        if num_gpus == 1 or not self.interconnect.link_shared:
            return self
        share = 1.0 / num_gpus
        link = dataclasses.replace(
            self.link, **{f: getattr(self.link, f) * share for f in
                          ("h2d_pinned_bps", "d2h_pinned_bps", "h2d_pageable_bps",
                           "d2h_pageable_bps")})
        curves = dict(self.curves)
        if "h2d" in curves:
            curves["h2d"] = dataclasses.replace(curves["h2d"], peak=curves["h2d"].peak * share)
        return dataclasses.replace(self, link=link, curves=curves)


def _check_positive(what: str, value: float) -> None:
    if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
        raise HardwareProfileError(f"{what} must be a positive number, got {value!r}")


# ---- TOML ------------------------------------------------------------------------------------
_TIER_CLASSES = {"gpu": GPUTier, "cpu": CPUTier, "link": LinkTier}


def _number(table: dict[str, Any], key: str, where: str, sources: dict[str, str],
            required: bool = True, default: float | None = None) -> float | None:
    path = f"{where}.{key}"
    if key not in table:
        if required:
            raise HardwareProfileError(f"missing {path}")
        return default
    item = table[key]
    value, source = (item.get("value"), item.get("source", "")) if isinstance(item, dict) else \
        (item, "")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HardwareProfileError(f"{path} must be a number, got {value!r}")
    if value < 0 or math.isnan(value):
        raise HardwareProfileError(f"{path} must be >= 0, got {value!r}")
    if source:
        sources[path] = str(source)
    return float(value)


def _flag(table: dict[str, Any], key: str, where: str, sources: dict[str, str]) -> bool:
    """A boolean `{ value = true, source = "..." }` (or a bare boolean); False when absent."""
    item = table.get(key, False)
    value, source = (item.get("value"), item.get("source", "")) if isinstance(item, dict) else \
        (item, "")
    if not isinstance(value, bool):
        raise HardwareProfileError(f"{where}.{key} must be true or false, got {value!r}")
    if source:
        sources[f"{where}.{key}"] = str(source)
    return value


def profile_from_dict(data: dict[str, Any], origin: str = "<dict>") -> HardwareProfile:
    """Parse and validate the TOML structure described in the module docstring."""
    sources: dict[str, str] = {}
    try:
        g, c, lk = data["gpu"], data["cpu"], data["link"]
    except KeyError as exc:
        raise HardwareProfileError(f"{origin}: missing [{exc.args[0]}] table") from None
    peak = g.get("peak_flops")
    if not isinstance(peak, dict) or not peak:
        raise HardwareProfileError(f"{origin}: [gpu.peak_flops] needs at least one dtype")
    try:
        gpu = GPUTier(
            name=str(g.get("name", "GPU")),
            peak_flops={k: _number(peak, k, "gpu.peak_flops", sources) for k in peak},
            hbm_bandwidth_bps=_number(g, "hbm_bandwidth_bps", "gpu", sources),
            memory_bytes=_number(g, "memory_bytes", "gpu", sources),
            op_overhead_s=_number(g, "op_overhead_s", "gpu", sources, False, 0.0),
            attention_handoff_s=_number(g, "attention_handoff_s", "gpu", sources, False, 0.0),
            attention_in_op_s=_number(g, "attention_in_op_s", "gpu", sources, False, 0.0),
            post_grouped_op_s=_number(g, "post_grouped_op_s", "gpu", sources, False, 0.0),
            gpu_attention_op_s=_number(g, "gpu_attention_op_s", "gpu", sources, False, 0.0),
        )
        cpu = CPUTier(
            name=str(c.get("name", "CPU")),
            cores=int(_number(c, "cores", "cpu", sources)),
            peak_flops=_number(c, "peak_flops", "cpu", sources),
            dram_bandwidth_bps=_number(c, "dram_bandwidth_bps", "cpu", sources),
            memory_bytes=_number(c, "memory_bytes", "cpu", sources),
        )
        link = LinkTier(
            h2d_pinned_bps=_number(lk, "h2d_pinned_bps", "link", sources),
            d2h_pinned_bps=_number(lk, "d2h_pinned_bps", "link", sources),
            h2d_pageable_bps=_number(lk, "h2d_pageable_bps", "link", sources),
            d2h_pageable_bps=_number(lk, "d2h_pageable_bps", "link", sources),
            pinned_max_bytes=_number(lk, "pinned_max_bytes", "link", sources, False, math.inf),
            kv_gather_bps=_number(lk, "kv_gather_bps", "link", sources, False, 0.0),
            pageable_to_pinned_bps=_number(lk, "pageable_to_pinned_bps", "link", sources, False,
                                           0.0),
        )
        inter = data.get("interference", {})
        interference = Interference(
            **{k: _number(inter, k, "interference", sources, False, 1.0)
               for k in ("link", "gpu", "cpu_attention", "staging_copy", "staging_copy_link")},
            launch=_number(inter, "launch", "interference", sources, False, 0.0),
            pipeline=_number(inter, "pipeline", "interference", sources, False, 0.0),
            pipeline_staged=_number(inter, "pipeline_staged", "interference", sources, False,
                                    0.0))
        ic = data.get("interconnect", {})
        interconnect = InterconnectTier(
            num_gpus=int(_number(ic, "num_gpus", "interconnect", sources, False, 1)),
            allreduce_bus_bps=_number(ic, "allreduce_bus_bps", "interconnect", sources, False,
                                      0.0),
            allreduce_latency_s=_number(ic, "allreduce_latency_s", "interconnect", sources,
                                        False, 0.0),
            link_shared=_flag(ic, "link_shared", "interconnect", sources))
        curves = {}
        for cname, ctable in (data.get("curves") or {}).items():
            where = f"curves.{cname}"
            curves[cname] = SaturatingCurve(
                peak=_number(ctable, "peak", where, sources),
                half=_number(ctable, "half", where, sources),
                rel_error=_number(ctable, "rel_error", where, sources, False, 0.0))
    except HardwareProfileError as exc:
        raise HardwareProfileError(f"{origin}: {exc}") from None
    for label, value in (("gpu.memory_bytes", gpu.memory_bytes),
                         ("gpu.hbm_bandwidth_bps", gpu.hbm_bandwidth_bps),
                         ("cpu.memory_bytes", cpu.memory_bytes),
                         ("cpu.dram_bandwidth_bps", cpu.dram_bandwidth_bps),
                         ("link.h2d_pinned_bps", link.h2d_pinned_bps)):
        if value <= 0:
            raise HardwareProfileError(f"{origin}: {label} must be > 0, got {value}")
    below = [k for k, v in dataclasses.asdict(interference).items()
             if v < 1.0 and not (k == "launch" and v == 0.0)
             and k not in ("pipeline", "pipeline_staged")]
    if below:
        raise HardwareProfileError(f"{origin}: interference factors must be >= 1 (launch: 0 "
                                   f"where not measured), got {below[0]} < 1")
    for key in ("pipeline", "pipeline_staged"):
        if getattr(interference, key) < 0:
            raise HardwareProfileError(f"{origin}: interference.{key} must be > 0 (0 where not "
                                       f"measured), got {getattr(interference, key)}")
    if interconnect.num_gpus < 1:
        raise HardwareProfileError(f"{origin}: interconnect.num_gpus must be >= 1")
    return HardwareProfile(
        name=str(data.get("name", Path(origin).stem)), description=str(data.get("description", "")),
        gpu=gpu, cpu=cpu, link=link, interference=interference, interconnect=interconnect,
        curves=curves, sources=sources,
        measurements=dict(data.get("measurements") or {}))


def profile_to_dict(profile: HardwareProfile) -> dict[str, Any]:
    """Inverse of `profile_from_dict` (values with their sources)."""

    def item(path: str, value: float) -> dict[str, Any]:
        out: dict[str, Any] = {"value": value}
        if profile.sources.get(path):
            out["source"] = profile.sources[path]
        return out

    def tier(prefix: str, obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        table: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name in skip or (isinstance(value, float) and math.isinf(value)):
                continue
            table[f.name] = value if isinstance(value, str) else item(f"{prefix}.{f.name}", value)
        return table

    gpu = tier("gpu", profile.gpu, skip=("peak_flops",))
    gpu["peak_flops"] = {k: item(f"gpu.peak_flops.{k}", v) for k, v in
                         profile.gpu.peak_flops.items()}
    data: dict[str, Any] = {
        "name": profile.name, "description": profile.description, "gpu": gpu,
        "cpu": tier("cpu", profile.cpu), "link": tier("link", profile.link),
        "interference": tier("interference", profile.interference),
        "interconnect": tier("interconnect", profile.interconnect),
        "curves": {k: tier(f"curves.{k}", c) for k, c in profile.curves.items()},
    }
    if profile.measurements:
        data["measurements"] = profile.measurements
    return data


def shipped_profiles() -> list[str]:
    """Names of the profiles in hardware_profiles/."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """Load a profile by shipped name ('t4') or path to a TOML file."""
    path = Path(name_or_path)
    if not path.exists():
        shipped = PROFILE_DIR / f"{name_or_path}.toml"
        if not shipped.exists():
            raise HardwareProfileError(
                f"unknown hardware {str(name_or_path)!r}: not a file and not a shipped profile "
                f"(shipped: {', '.join(shipped_profiles())})")
        path = shipped
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise HardwareProfileError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise HardwareProfileError(f"{path}: malformed TOML: {exc}") from None
    return profile_from_dict(data, origin=str(path))


def save_profile(profile: HardwareProfile, path: str | Path) -> None:
    """Write `profile` as TOML, atomically."""
    write_text_atomic(path, tomli_w.dumps(profile_to_dict(profile)))
