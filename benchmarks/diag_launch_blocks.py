"""Diagnosis: the launching thread's time for a decode micro-batch's pre-attention block, the
executor's (`executor.layers.attention_in`: one fused QKV GEMM, RoPE on q and k together in
place, the cos/sin lookup once per step; the CPU worker gets its output as it is) against the
form it had until the second session of 2026-12-04, which is transformers' (three projections,
RoPE on q and k apart with rotate_half, the cos/sin lookup and casts in every layer, then q, k
and v concatenated for the hand-off). Also the executor's other decode blocks (post-attention
with grouped experts, GPU attention), for scale: `hrm.profile.launch_blocks` times all three, as
`hrm profile` does.

Host clock per call (`hrm.profile.launch_block_times`: on CUDA the stream is held by a sleep kernel,
so no call waits for the GPU; on the CPU a call's time includes its compute, so a small model
(the default tiny-mixtral) makes it dispatch-bound, which is what the launching thread pays).

    python3 benchmarks/diag_launch_blocks.py -o RESULT.json [--model tiny-mixtral]
        [--device cpu|cuda] [--bursts 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import executor.layers as L  # noqa: E402
from executor.cli import machine_info  # noqa: E402
from hrm.io import write_json_atomic  # noqa: E402
from hrm.model import ModelSpec, load_model_spec  # noqa: E402
from hrm.profile import (  # noqa: E402
    LAUNCH_BLOCK_CALLS_PER_BURST,
    dispatched_ops,
    launch_block_times,
    launch_blocks,
)

MICRO_BATCHES = (1, 16, 64)
POSITIONS = 4096


def transformers_form(spec: ModelSpec, layer: L.DenseLayer, device: str):
    """The pre-attention block as it was until 2026-12-04 (transformers' Mixtral form), for one
    micro-batch: hidden states and positions in, q/k/v concatenated for the hand-off out."""
    d, q_out, kv_out = spec.head_dim, spec.num_heads * spec.head_dim, \
        spec.num_kv_heads * spec.head_dim
    wq, wk, wv = layer.wqkv.split((q_out, kv_out, kv_out))
    table = L.rope_tables(spec, POSITIONS, device, torch.float32)   # fp32, as then
    sign = torch.cat((-torch.ones(d // 2), torch.ones(d - d // 2))).to(device)
    cos, sin = table[:, 0, 0], table[:, 1, 0] * sign      # the signed sin undone

    def rope(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        c, s = c[:, None, :].to(x.dtype), s[:, None, :].to(x.dtype)
        return x * c + rotated * s

    def block(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        c, s = cos[positions], sin[positions]
        h = L.rms_norm(x, layer.input_norm, spec.rms_norm_eps)
        q = F.linear(h, wq).view(x.shape[0], spec.num_heads, d)
        k = F.linear(h, wk).view(x.shape[0], spec.num_kv_heads, d)
        v = F.linear(h, wv).view(x.shape[0], spec.num_kv_heads, d)
        q, k = rope(q, c, s), rope(k, c, s)
        return torch.cat((q.flatten(1), k.flatten(1), v.flatten(1)), dim=1)

    return block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", type=Path, required=True, help="result JSON")
    ap.add_argument("--model", default="tiny-mixtral")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bursts", type=int, default=8,
                    help=f"bursts of {LAUNCH_BLOCK_CALLS_PER_BURST} timed calls per block")
    args = ap.parse_args()
    spec, dev = load_model_spec(args.model), args.device
    rows = [dict(m.params, host_us_per_call=statistics.median(m.times_s) * 1e6,
                 host_us_per_op=statistics.median(m.times_s) / m.work * 1e6)
            for m in launch_blocks(spec, MICRO_BATCHES, dev, bursts=args.bursts)]
    h1, qkv_out = spec.hidden_size, (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    layer = L.DenseLayer(input_norm=torch.ones(h1, dtype=torch.bfloat16, device=dev),
                         post_norm=torch.ones(h1, dtype=torch.bfloat16, device=dev),
                         wqkv=torch.randn(qkv_out, h1, device=dev).to(torch.bfloat16) * 0.05,
                         wo=torch.empty(0), router=torch.empty(0))
    old = transformers_form(spec, layer, dev)
    generator = torch.Generator(device="cpu").manual_seed(0)
    for mu in MICRO_BATCHES:
        x = torch.randn(mu, h1, device=dev).to(torch.bfloat16)
        positions = torch.randint(0, POSITIONS, (mu,), generator=generator).to(dev)
        ops = dispatched_ops(lambda x=x, p=positions: old(x, p))
        times = launch_block_times(lambda x=x, p=positions: old(x, p), args.bursts, dev)
        rows.append({"block": "attention_in_transformers_form", "micro_batch": mu, "ops": ops,
                     "model": spec.name, "dtype": "bf16",
                     "host_us_per_call": statistics.median(times) * 1e6,
                     "host_us_per_op": statistics.median(times) / ops * 1e6})
    for r in rows:
        print(f"{r['block']:32s} mu={r['micro_batch']:4d} ops={r['ops']:3d} "
              f"{r['host_us_per_call']:8.1f} us/call {r['host_us_per_op']:6.2f} us/op")
    write_json_atomic(args.out, {
        "what": __doc__.split("\n\n")[0], "rows": rows, "machine": machine_info(torch.device(dev)),
        "command": " ".join(["python3", *sys.argv]), "date": datetime.now(UTC).isoformat()})


if __name__ == "__main__":
    main()
