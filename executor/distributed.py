"""Multi-GPU execution: K processes, one per GPU, each holding a shard of every layer.

Sharding (hrm/policy.py PARALLELISMS), rank r of K:
  attention (tp and ep): query heads r*n_q/K.., KV heads r*n_kv/K.. (q/k/v rows, o_proj input
      columns); the rank keeps the KV cache of its KV heads in CPU memory and runs CPU attention
      for its heads on its own cores.
  experts, tp: every expert's intermediate dim h2 (w1/w3 rows r*h2/K.., w2 columns);
  experts, ep: whole experts e with e mod K == r (round-robin);
  shared experts (Qwen2-MoE): their intermediate dim, as tp, in both modes.
Routers, norms, embeddings and the LM head are replicated. Each rank's O projection and MoE block
give partial sums; one all_reduce after each makes the hidden states equal on every rank, so
routing and logits agree, and rank 0's sampled tokens are broadcast so the ranks never diverge.

A rank's shard is a smaller ModelSpec (`Shard.spec`): fewer heads, a narrower h2 (tp) or fewer
experts (ep), so the weights, KV cache, memory plan and layer code of one GPU serve it unchanged;
the router keeps all n_e rows. Communication is torch.distributed only: NCCL on GPUs, gloo on
the CPU stand-in; ranks are processes started with torch.multiprocessing and a TCP rendezvous on
a free localhost port.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hrm.errors import HRMError, PolicyError
from hrm.model import ModelSpec

#: environment of every rank (GPU-host requirement: no NVLink multicast / NVLS)
RANK_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


@dataclass(frozen=True)
class Shard:
    """The part of the model rank `rank` of `world` holds; Shard() is the whole model."""

    rank: int = 0
    world: int = 1
    parallelism: str = "tp"

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def check(self, spec: ModelSpec) -> None:
        """PolicyError unless the model splits evenly over the ranks."""
        k = self.world
        need = {"num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads,
                "shared_intermediate_size": spec.shared_intermediate_size}
        if self.parallelism == "tp":
            need["expert_intermediate_size"] = spec.expert_intermediate_size
        uneven = [f"{name}={value}" for name, value in need.items() if value % k]
        if uneven:
            raise PolicyError(f"model {spec.name!r} does not split over {k} GPUs with "
                              f"{self.parallelism}: {', '.join(uneven)} not divisible by {k}")
        if self.parallelism == "ep" and spec.num_experts // k < spec.top_k:
            raise PolicyError(f"model {spec.name!r}: ep needs at least top_k={spec.top_k} "
                              f"experts per GPU, has {spec.num_experts} experts for {k} GPUs")

    def experts(self, num_experts: int) -> list[int]:
        """Global ids of the routed experts this rank holds, in local order."""
        if self.parallelism == "ep":
            return list(range(self.rank, num_experts, self.world))
        return list(range(num_experts))

    def spec(self, spec: ModelSpec) -> ModelSpec:
        """This rank's view of the model: its heads, its part of h2 (tp) or its experts (ep)."""
        if not self.distributed:
            return spec
        self.check(spec)
        k = self.world
        tp = self.parallelism == "tp"
        return replace(spec, num_heads=spec.num_heads // k, num_kv_heads=spec.num_kv_heads // k,
                       expert_intermediate_size=spec.expert_intermediate_size // k if tp
                       else spec.expert_intermediate_size,
                       num_experts=spec.num_experts if tp
                       else len(self.experts(spec.num_experts)),
                       shared_intermediate_size=spec.shared_intermediate_size // k)

    def rows(self, total: int) -> slice:
        """This rank's contiguous 1/K of `total` rows (heads * head_dim, or h2)."""
        part = total // self.world
        return slice(self.rank * part, (self.rank + 1) * part)

    def expert_rows(self, h2: int) -> slice:
        """This rank's rows of every expert's intermediate dim: 1/K with tp, all with ep."""
        return self.rows(h2) if self.parallelism == "tp" else slice(0, h2)

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's `partial` (in place; identity on one rank)."""
        if self.distributed:
            dist.all_reduce(partial)
        return partial

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` on every rank (in place; identity on one rank)."""
        if self.distributed:
            dist.broadcast(tensor, src=0)
        return tensor

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values


def check_gpus(world: int, device_type: str) -> None:
    """HRMError unless `world` GPUs are visible (any K runs on the CPU stand-in)."""
    if device_type == "cuda" and world > torch.cuda.device_count():
        raise HRMError(f"{world} GPUs requested but {torch.cuda.device_count()} visible")


def rank_cores(rank: int, world: int) -> list[int]:
    """The CPU cores of rank `rank`: an even share of the cores this process may use, so the
    ranks' CPU attention does not contend (all cores for every rank if there are fewer than K)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < world:
        return cores
    share = len(cores) // world
    return cores[rank * share:(rank + 1) * share]


def free_port() -> int:
    """A free TCP port on localhost, for a torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world: int, parallelism: str, device_type: str, port: int,
               fn: Callable[..., Any], args: tuple[Any, ...], result_path: str) -> None:
    """Entry point of one rank: process group, cores, device; run fn; rank 0 saves its value."""
    os.environ.update(RANK_ENV)
    cores = rank_cores(rank, world)
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank) if device_type == "cuda"
                            else None)
    try:
        value = fn(Shard(rank, world, parallelism), *args)
        if rank == 0:
            torch.save(value, result_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, parallelism: str, device_type: str,
          *args: Any, timeout_s: float = 3600.0) -> Any:
    """Run fn(shard, *args) on `world` ranks (processes) and return rank 0's value. fn and args
    must pickle. A failing rank terminates the others and its error is raised here; ranks still
    running after `timeout_s` are killed."""
    check_gpus(world, device_type)
    for key, value in RANK_ENV.items():
        os.environ.setdefault(key, value)
    with tempfile.TemporaryDirectory(prefix="hrm-ranks-") as tmp:
        result_path = str(Path(tmp) / "rank0.pt")
        context = mp.start_processes(
            _rank_main, args=(world, parallelism, device_type, free_port(), fn, args,
                              result_path),
            nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=max(0.0, min(5.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise HRMError(f"the {world} ranks did not finish within {timeout_s:.0f} s")
        except mp.ProcessException as exc:
            raise HRMError(f"a rank failed: {str(exc).strip().splitlines()[-1]}") from exc
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join(timeout=10)
        return torch.load(result_path, weights_only=False)
