"""Diagnosis: a decode micro-batch's routed experts as the executor runs them, the per-expert
loop (`executor.layers.routed_experts`) against one grouped GEMM pair
(`routed_experts_grouped`, policy expert_kernel='grouped'), on one layer of a model's experts,
all resident on the device, with uniformly random routing (top-k of E, seeded).

For each micro-batch size: the seconds per micro-batch with the calls queued back to back (what
the pipeline's GPU stage sees), the launching thread's seconds per call, whether each path makes
the host wait for the GPU (CUDA sync debug mode), the kernel time alone
(queued behind a sleep kernel, `hrm.profile.time_calls(queued=True)`; the loop reads the routing
counts on the host, so it cannot be queued and has none), and the largest difference of their
outputs beside the largest output.

    python3 benchmarks/diag_grouped_experts.py --out DIR [--model mixtral-8x7b] [--reps 50]
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import executor.layers as L  # noqa: E402
from executor.weights import ExpertStore  # noqa: E402
from hrm.io import write_json_atomic  # noqa: E402
from hrm.model import load_model_spec  # noqa: E402
from hrm.profile import time_calls  # noqa: E402

MICRO_BATCHES = (1, 16, 64, 256)


def expert_store(model: str, device: torch.device) -> ExpertStore:
    """One layer of `model`'s routed experts, random bf16, all resident on `device`."""
    spec = load_model_spec(model)
    e, h1, h2 = spec.num_experts, spec.hidden_size, spec.expert_intermediate_size
    flat = (torch.rand(e * 3 * h1 * h2, device=device) - 0.5).to(torch.bfloat16) * 0.02
    return ExpertStore.one_resident_layer(spec, flat)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_micro_batch_s(fn, reps: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds per call with `reps` calls back to back, the host's seconds per call)."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    host_s = time.perf_counter() - start
    synchronize(device)
    return (time.perf_counter() - start) / reps, host_s / reps


def syncs_with_host(fn) -> bool:
    """Whether `fn()` makes the host wait for the GPU (torch's CUDA sync debug mode)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return False
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode("default")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mixtral-8x7b")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    store = expert_store(args.model, device)
    spec, expert, stacked = store.spec, store.expert_fn(0, 0), store.stacked(0, 0)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    with torch.inference_mode():
        for mu in MICRO_BATCHES:
            h = (torch.rand(mu, spec.hidden_size, generator=gen) - 0.5).to(device, torch.bfloat16)
            experts = torch.rand(mu, spec.num_experts, generator=gen).argsort(dim=1)[
                :, :spec.top_k].to(device)
            weights = torch.rand(mu, spec.top_k, generator=gen).softmax(dim=1).to(device)

            def loop(h=h, experts=experts, weights=weights):
                return L.routed_experts(h, experts, weights, spec.num_experts, expert)

            def grouped(h=h, experts=experts, weights=weights):
                return L.routed_experts_grouped(h, experts, weights, *stacked)

            reference = loop().float()
            row = {"micro_batch": mu, "max_abs_out": float(reference.abs().max()),
                   "max_abs_diff": float((reference - grouped().float()).abs().max())}
            for name, fn in (("loop", loop), ("grouped", grouped)):
                wall_s, host_s = per_micro_batch_s(fn, args.reps, device)
                row[f"{name}_s"], row[f"{name}_host_s"] = wall_s, host_s
            if device.type == "cuda":
                row["loop_syncs"], row["grouped_syncs"] = (syncs_with_host(loop),
                                                           syncs_with_host(grouped))
                kernel = time_calls(grouped, args.reps, "cuda", queued=True)
                row["grouped_kernel_s"] = sorted(kernel)[len(kernel) // 2]
            rows.append(row)
            print("  ".join(f"{k} {v * 1e6:.0f} us" if k.endswith("_s") else f"{k} {v:g}"
                            for k, v in row.items()))
    write_json_atomic(args.out / "diag_grouped_experts.json", {
        "benchmark": "diag_grouped_experts", "model": args.model, "reps": args.reps,
        "rows": rows, "machine": {
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "torch": torch.__version__, "cuda": torch.version.cuda},
        "command": " ".join(sys.argv), "date": datetime.now(UTC).isoformat()})


if __name__ == "__main__":
    main()
