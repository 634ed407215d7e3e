"""Print a markdown table of `hrm optimize` predictions for the README.

Mixtral-8x7B and Mixtral-8x22B on every shipped hardware profile, MTBench-like prompts of 100
tokens, generating 32/64/128/256 tokens, 10,000 sequences (the batch is limited by memory):
the optimized policy, its predicted throughput and its bottleneck.

    .venv/bin/python scripts/predictions_table.py [--models M ...] [--gen-lens G ...]
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from hrm.errors import InfeasibleError
from hrm.hardware import load_profile, shipped_profiles
from hrm.model import load_model_spec
from hrm.optimize import optimize
from hrm.workload import Workload


def prediction_rows(models: list[str], gen_lens: list[int], prompt_len: int,
                    num_seqs: int) -> list[str]:
    """One markdown row per (model, profile, gen_len)."""
    jobs = [(m, h, g) for m in models for h in shipped_profiles() for g in gen_lens]
    rows = []
    for model_name, hw_name, gen_len in tqdm(jobs, desc="optimize", file=sys.stderr):
        model, hw = load_model_spec(model_name), load_profile(hw_name)
        workload = Workload(num_seqs=num_seqs, prompt_len=prompt_len, gen_len=gen_len)
        try:
            result = optimize(model, hw, workload)
        except InfeasibleError as exc:
            rows.append(f"| {model_name} | {hw_name} | {gen_len} | does not fit: {exc} "
                        "| | | |")
            continue
        p, pred = result.policy, result.prediction
        policy = (f"N={p.batch_size} (mu={p.micro_batch_size} x {p.num_micro_batches}), "
                  f"attn {p.attn_decode_device}, r_w={p.weights_gpu_fraction:.2f}"
                  + (f", r_c={p.kv_gpu_fraction:.2f}" if p.attn_decode_device == "gpu" else ""))
        rows.append(f"| {model_name} | {hw_name} | {gen_len} | {policy} | "
                    f"{pred.throughput_tok_s:,.1f} | {pred.bottleneck} "
                    f"({pred.bottleneck_slack:.2f}x) | {result.solve_s:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mixtral-8x7b", "mixtral-8x22b"])
    parser.add_argument("--gen-lens", nargs="+", type=int, default=[32, 64, 128, 256])
    parser.add_argument("--prompt-len", type=int, default=100)
    parser.add_argument("--num-seqs", type=int, default=10000)
    args = parser.parse_args()
    rows = prediction_rows(args.models, args.gen_lens, args.prompt_len, args.num_seqs)
    print(f"Predicted by the HRM cost model (not measured): prompt {args.prompt_len} tokens, "
          f"{args.num_seqs} sequences, schedule cgopipe, bf16 weights and KV.\n")
    print("| model | hardware | gen | policy | tokens/s | bottleneck (slack) | solve s |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
