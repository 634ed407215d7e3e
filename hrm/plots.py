"""Plots (matplotlib, Agg backend): the Hierarchical Roofline Model with operators on it."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hrm.io import write_bytes_atomic  # noqa: E402
from hrm.roofline import RooflineSummary  # noqa: E402


def plot_roofline(summary: RooflineSummary, path: str | Path) -> None:
    """Log-log HRM: GPU, CPU and link roofs with their ridge points; each decode operator with
    its data in HBM (Eq. 8), the expert FFN and attention also with their data fetched over the
    link (Eq. 7), and attention on the CPU; dotted verticals at the expert FFN's turning points
    P1 (Eq. 9) and P2 (Eq. 10)."""
    s = summary
    intensities = [v for op in s.operators for v in (op.gpu_intensity, op.cpu_intensity,
                                                     op.link_intensity) if np.isfinite(v)]
    lo = min([*intensities, *s.ridge_points.values()]) / 4
    hi = max([*intensities, *s.ridge_points.values()]) * 4
    x = np.logspace(np.log10(lo), np.log10(hi), 400)
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.plot(x, np.minimum(s.gpu_peak_flops, s.gpu_bps * x), "C0-", lw=2,
            label=f"GPU: {s.gpu_peak_flops / 1e12:.0f} TFLOP/s, HBM {s.gpu_bps / 1e9:.0f} GB/s")
    ax.plot(x, np.minimum(s.cpu_peak_flops, s.cpu_bps * x), "C1-", lw=2,
            label=f"CPU: {s.cpu_peak_flops / 1e12:.1f} TFLOP/s, DRAM {s.cpu_bps / 1e9:.0f} GB/s")
    ax.plot(x, np.minimum(s.gpu_peak_flops, s.link_bps * x), "C2--", lw=1.5,
            label=f"CPU->GPU link: {s.link_bps / 1e9:.1f} GB/s")
    for name, ridge in s.ridge_points.items():
        peak = s.cpu_peak_flops if name == "cpu" else s.gpu_peak_flops
        ax.plot([ridge], [peak], "k^", ms=6)
        ax.annotate(f"ridge {name}", (ridge, peak), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    for k, op in enumerate(s.operators):
        color = f"C{3 + k % 6}"
        streamed = op.name == "expert_ffn" or op.name.startswith("attention")
        if not op.name.startswith("attention"):
            ax.plot([op.gpu_intensity], [op.gpu_resident_flops], "o", color=color,
                    label=f"{op.name}, data in HBM (Eq. 8)")
        if streamed:
            ax.plot([op.link_intensity], [op.offloaded_flops], "D", color=color,
                    label=f"{op.name} on GPU, data over the link (Eq. 7)")
        if op.name.startswith("attention"):
            ax.plot([op.cpu_intensity], [op.cpu_flops], "s", color=color,
                    label=f"{op.name} on CPU (Eq. 8)")
        if op.name == "expert_ffn":
            for label, value in (("P1", op.p1_intensity), ("P2", op.p2_intensity)):
                ax.axvline(value, color=color, ls=":", lw=1)
                ax.text(value, 0.03, f" {label} (expert FFN)", rotation=90, fontsize=7,
                        transform=ax.get_xaxis_transform())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("operational intensity (FLOP / byte)")
    ax.set_ylabel("attainable performance (FLOP/s)")
    turning = ", ".join(f"{k}: N={v:,.0f}" for k, v in s.turning_batch_sizes.items())
    ax.set_title(f"HRM: {s.model} on {s.hardware}, decode N={s.batch_size}, "
                 f"mu={s.micro_batch_size}, context {s.context_len:.0f}\n"
                 f"expert FFN leaves the link roof at {turning}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)
    plt.close(fig)


# ---- validation and what-if plots (figures returned for notebooks; saved when a path is given)
#: error bands drawn on validation plots (percent): the MAPE and worst-configuration targets
ERROR_BANDS_PCT = (5.0, 12.0)


def save_figure(fig: Any, path: str | Path | None) -> Any:
    """Write `fig` atomically to `path` (format from the suffix) when a path is given; return
    the figure."""
    if path is not None:
        buf = io.BytesIO()
        fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", dpi=120,
                    bbox_inches="tight")
        write_bytes_atomic(path, buf.getvalue())
    return fig


def plot_predicted_vs_measured(configs: Any, path: str | Path | None = None,
                               title: str = "") -> Any:
    """Log-log predicted vs measured tokens/s of every configuration that ran (a pandas frame of
    `hrm validate`'s validation_configs.csv), with y = x and the +-5% / +-12% bands; the
    optimizer's policy is a star."""
    df = configs[configs["ran"].astype(bool)]
    fig, ax = plt.subplots(figsize=(6.5, 6))
    lo = min(df["measured_tok_s"].min(), df["predicted_tok_s"].min()) / 1.3
    hi = max(df["measured_tok_s"].max(), df["predicted_tok_s"].max()) * 1.3
    x = np.array([lo, hi])
    ax.plot(x, x, "k-", lw=1, label="predicted = measured")
    for band, style in zip(ERROR_BANDS_PCT, (":", "--"), strict=True):
        ax.fill_between(x, x * (1 - band / 100), x * (1 + band / 100), color="C0",
                        alpha=0.08, lw=0)
        ax.plot(x, x * (1 + band / 100), "k" + style, lw=0.6, label=f"+-{band:g}%")
        ax.plot(x, x * (1 - band / 100), "k" + style, lw=0.6)
    for k, (key, group) in enumerate(df[df["role"] == "grid"].groupby(
            ["schedule", "attn_decode_device"])):
        ax.plot(group["measured_tok_s"], group["predicted_tok_s"], "o", color=f"C{k}",
                label=f"{key[0]}, attention on {key[1]}")
    opt = df[df["role"] == "optimizer"]
    if len(opt):
        ax.plot(opt["measured_tok_s"], opt["predicted_tok_s"], "*", ms=14, color="gold",
                mec="k", label="optimizer's policy")
    grid = df[df["role"] == "grid"]
    worst = grid.loc[grid["throughput_error_pct"].abs().idxmax()]
    ax.annotate(f"{worst['config']} ({worst['throughput_error_pct']:+.1f}%)",
                (worst["measured_tok_s"], worst["predicted_tok_s"]),
                textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured tokens/s")
    ax.set_ylabel("predicted tokens/s (HRM)")
    mape = grid["throughput_error_pct"].abs().mean()
    ax.set_title(f"{title}\nthroughput MAPE {mape:.1f}% over {len(grid)} configurations",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def plot_error_by_config(configs: Any, path: str | Path | None = None) -> Any:
    """Signed throughput error of every configuration (bars), with the +-5% / +-12% bands."""
    df = configs[configs["ran"].astype(bool)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(df)), 4))
    colors = ["C3" if abs(e) > ERROR_BANDS_PCT[1] else "C1" if abs(e) > ERROR_BANDS_PCT[0]
              else "C2" for e in df["throughput_error_pct"]]
    labels = [{"grid": c, "optimizer": "OPTIMIZER"}.get(r, f"{c} ({r})")
              for c, r in zip(df["config"], df["role"], strict=True)]
    ax.bar(range(len(df)), df["throughput_error_pct"], color=colors)
    for band in ERROR_BANDS_PCT:
        ax.axhline(band, color="k", ls=":", lw=0.7)
        ax.axhline(-band, color="k", ls=":", lw=0.7)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(df)), labels, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("throughput error (%)\n(predicted - measured) / measured")
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_stage_errors(stages: Any, path: str | Path | None = None) -> Any:
    """Signed error of each stage's busy time per decode layer (and of the layer time, where the
    overlap shows), one dot per configuration; the box is the spread over configurations."""
    df = stages.dropna(subset=["error_pct"])
    names = list(dict.fromkeys(df["stage"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    data = [df.loc[df["stage"] == s, "error_pct"].to_numpy() for s in names]
    ax.boxplot(data, showfliers=False)
    for k, values in enumerate(data, start=1):
        jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [0.0]
        ax.plot(k + np.asarray(jitter), values, "o", ms=3, alpha=0.6, color="C0")
    ax.set_xticks(range(1, len(names) + 1), names, fontsize=8)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("error (%): predicted vs measured busy time")
    ax.set_title("where the model misses, by stage (decode, per layer)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_timeline(events: list[dict[str, Any]], start_us: float, end_us: float,
                  path: str | Path | None = None, title: str = "") -> Any:
    """Gantt chart of Chrome-trace complete events ("ph": "X", microseconds) in [start_us,
    end_us], one row per track (tid): a measured trace or `hrm.cost.timeline`'s prediction."""
    spans = [e for e in events if e.get("ph") == "X" and e["ts"] + e["dur"] >= start_us
             and e["ts"] <= end_us]
    tracks = list(dict.fromkeys(e["tid"] for e in sorted(spans, key=lambda e: str(e["tid"]))))
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(tracks) + 1.2))
    for row, track in enumerate(tracks):
        bars = [((e["ts"] - start_us) / 1e3, e["dur"] / 1e3) for e in spans if e["tid"] == track]
        ax.broken_barh(bars, (row - 0.4, 0.8), color=f"C{row}", edgecolor="k", lw=0.2)
    ax.set_yticks(range(len(tracks)), tracks)
    ax.set_xlim(0, (end_us - start_us) / 1e3)
    ax.set_xlabel("ms")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    return save_figure(fig, path)


def plot_what_if(sweep: Any, x: str, xlabel: str, path: str | Path | None = None,
                 logx: bool = False) -> Any:
    """Predicted throughput of the optimal policy along one what-if axis (a frame with columns
    `x`, throughput_tok_s, bottleneck, batch_size, weights_gpu_fraction, attn_decode_device),
    each point colored by the roof that binds it, with the policy's N and r_w annotated."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sweep[x], sweep["throughput_tok_s"], "-", color="0.6", lw=1)
    for k, (name, group) in enumerate(sweep.groupby("bottleneck")):
        ax.plot(group[x], group["throughput_tok_s"], "o", color=f"C{k}",
                label=f"binds: {name}")
    for _, r in sweep.iterrows():
        ax.annotate(f"N={r['batch_size']}\nr_w={r['weights_gpu_fraction']:.2f}"
                    f"\n{r['attn_decode_device']}", (r[x], r["throughput_tok_s"]),
                    textcoords="offset points", xytext=(3, 4), fontsize=6)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("predicted tokens/s (optimal policy)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_phase_times(runs: Any, path: str | Path | None = None, title: str = "") -> Any:
    """Measured vs predicted prefill and decode seconds of executor runs (a pandas frame with
    columns run, prefill_s, predicted_prefill_s, decode_s, predicted_decode_s): where a
    throughput error comes from."""
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.1 * len(runs)), 3.6), sharey=False)
    x = np.arange(len(runs))
    for ax, phase in zip(axes, ("prefill", "decode"), strict=True):
        ax.bar(x - 0.2, runs[f"{phase}_s"], 0.4, label="measured")
        ax.bar(x + 0.2, runs[f"predicted_{phase}_s"], 0.4, label="predicted (HRM)")
        ax.set_xticks(x, runs["run"], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"{phase} s")
        ax.set_title(phase, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
