"""Print a markdown table of static vs continuous scheduling predictions for the README.

Mixtral-8x7B on the GPU machine's measured profile (h100-machine), GPU capped at 16 GiB (the
issue's setting), the three seeded synthetic workloads of 20,000 sequences (MTBench-like, RAG-like,
reasoning): the best static CGOPipe policy (`hrm optimize`) and the best continuous policy
(`hrm optimize --scheduler continuous`), their predicted throughput, what binds each, and the
continuous job timed pass by pass over the scheduler's dry run.

    .venv/bin/python scripts/continuous_table.py [--hardware H] [--gpu-mem GIB] [--num-seqs N]
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from hrm.continuous import continuous_report
from hrm.hardware import load_profile
from hrm.model import load_model_spec
from hrm.units import GiB
from hrm.workload import synthetic_workload

KINDS = ("mtbench", "rag", "reasoning")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mixtral-8x7b")
    ap.add_argument("--hardware", default="h100-machine")
    ap.add_argument("--gpu-mem", type=float, default=16.0)
    ap.add_argument("--num-seqs", type=int, default=20000)
    args = ap.parse_args()
    model = load_model_spec(args.model)
    hw = load_profile(args.hardware).with_memory(gpu_memory_bytes=args.gpu_mem * GiB)
    print("| workload | static tok/s (N, binds) | continuous tok/s steady / job / dry run | "
          "R (KV allows) | n_tok, mu, r_w | binds | x static |")
    print("|---|---|---|---|---|---|---|")
    for kind in tqdm(KINDS, desc="optimize", file=sys.stderr):
        doc = continuous_report(model, hw, synthetic_workload(kind, args.num_seqs),
                                policy=None)
        s, p = doc["static"], doc["policy"]
        static = (f"{s['throughput_tok_s']:.0f} ({s['policy']['batch_size']}, "
                  f"{s['bottleneck']})" if "error" not in s else "does not fit")
        ratio = f"{s['continuous_over_static']:.2f}x" if "error" not in s else "-"
        print(f"| {kind} | {static} | {doc['throughput_tok_s']:.0f} / "
              f"{doc['job_throughput_tok_s']:.0f} / {doc['dry_run']['throughput_tok_s']:.0f} | "
              f"{doc['running_seqs']:.0f} ({doc['running_seqs_kv']:.0f}) | "
              f"{p['batch_size']}, {p['micro_batch_size']}, {p['weights_gpu_fraction']:.2f} | "
              f"{doc['bottleneck']} | {ratio} |")


if __name__ == "__main__":
    main()
