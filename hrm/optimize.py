"""Policy search: the policy that maximizes predicted throughput within GPU and CPU memory.

`optimize` solves one mixed-integer linear program (PuLP + bundled CBC) over the cost model's own
affine coefficients (`hrm.cost.cost_terms`), so its optimum is the cost model's optimum:

  * integers: the candidate (mu, n_ub) pairs are one-hot binaries x_c (sum_c x_c = 1; N = mu n_ub
    <= num_seqs), decode attention placement is a binary a (1 = GPU). Modes m = (c, device)
    carry binaries w_m with sum_device w_(c, device) = x_c and sum_c w_(c, gpu) = a, the exact
    linearization of w_m = x_c * [a = device];
  * the expert kernel (policy expert_kernel: a loop over the experts or one grouped GEMM pair)
    is part of the mode. A grouped mode stages whole layers (hrm.policy.staged_experts: its
    staging term is a constant, the weights stream's copy of the resident experts is affine
    in r_w: `hrm.cost.resident_copy_s`), so r_w is searched as for the loop;
  * continuous r_w, r_c in [0, 1] (r_c <= a). Products with the mode binary, y_m = w_m r_w and
    q_m = w_m r_c, are linearized by McCormick envelopes, exact when w_m is binary:
    y <= w, y <= r_w, y >= r_w - (1 - w), y >= 0;
  * the pinned overflow o_m >= overflow_bytes(w_m, y_m), o_m >= 0;
  * the pipeline's max() as epigraph constraints T_(m,k) >= f_s stage_s(w_m, y_m, q_m, o_m) for
    every stage s of layer kind k (cgopipe), or the sum of the stages (serial schedules);
  * memory: every phase's GPU bytes <= usable GPU memory * w_m, CPU bytes likewise;
  * objective: min sum_m (prefill_m + (n - 1) step_m) / (N_m n), the time per generated token.

Candidates that cannot fit even at their most frugal r_w are pruned before the model is built.
`brute_force` evaluates the same candidates on a grid of (r_w, r_c) and is the reference.

With G > 1 GPUs both searches run once per parallelism (tp, ep) and keep the faster policy:
the choice changes every cost coefficient, so one MILP per choice stays exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import pulp

from hrm.cost import (
    WEIGHT_STREAM_STAGES,
    Affine,
    CostTerms,
    Prediction,
    breakdown_text,
    cost_terms,
    gpu_label,
    interfered,
    predict,
    without_weight_stream,
)
from hrm.errors import InfeasibleError
from hrm.hardware import HardwareProfile
from hrm.model import ModelSpec
from hrm.policy import EXPERT_KERNELS, PARALLELISMS, Policy
from hrm.units import GiB
from hrm.workload import Workload

#: micro-batch sizes (sequences per GPU kernel) and micro-batch counts the search considers
MICRO_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
NUM_MICRO_BATCHES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
#: the objective is scaled to milliseconds per token for the solver's tolerances
_OBJ_SCALE = 1e3


@dataclass(frozen=True)
class SearchGrid:
    """The discrete candidates (and, for brute force, the r_w / r_c grid)."""

    micro_batch_sizes: tuple[int, ...] = MICRO_BATCH_SIZES
    num_micro_batches: tuple[int, ...] = NUM_MICRO_BATCHES
    attn_decode_devices: tuple[str, ...] = ("cpu", "gpu")
    #: decode's routed-expert kernels (policy expert_kernel); grouped only on one GPU and for
    #: models with routed experts
    expert_kernels: tuple[str, ...] = EXPERT_KERNELS
    r_w_values: tuple[float, ...] = tuple(i / 20 for i in range(21))
    r_c_values: tuple[float, ...] = tuple(i / 10 for i in range(11))


@dataclass(frozen=True)
class OptimizeResult:
    policy: Policy
    prediction: Prediction
    method: str          # 'milp' | 'brute'
    solve_s: float
    #: throughput the solver's objective claims (tokens/s); `prediction` re-evaluates the policy
    objective_tok_s: float = 0.0
    num_candidates: int = 0


def _modes(model: ModelSpec, hw: HardwareProfile, workload: Workload, schedule: str,
           grid: SearchGrid, weight_dtype: str, kv_dtype: str, num_gpus: int = 1,
           parallelism: str = "tp") -> list[CostTerms]:
    """Cost terms of every discrete candidate with N <= num_seqs."""
    devices = ("gpu",) if schedule == "layerwise" else grid.attn_decode_devices
    mus = sorted({*grid.micro_batch_sizes,
                  *([workload.num_seqs] if workload.num_seqs <= max(grid.micro_batch_sizes)
                    else [])})
    kernels = [k for k in grid.expert_kernels
               if k == "loop" or (num_gpus == 1 and model.num_experts)]
    modes = []
    for mu in mus:
        for n_ub in grid.num_micro_batches:
            if mu * n_ub > workload.num_seqs:
                continue
            for device in devices:
                for kernel in kernels:
                    policy = Policy(batch_size=mu * n_ub, micro_batch_size=mu,
                                    attn_decode_device=device, weight_dtype=weight_dtype,
                                    kv_dtype=kv_dtype, schedule=schedule, num_gpus=num_gpus,
                                    parallelism=parallelism, expert_kernel=kernel)
                    modes.append(cost_terms(model, hw, workload, policy))
    return modes


def _may_fit(terms: CostTerms) -> bool:
    """Necessary condition: GPU fits at its most frugal point (nothing resident) and CPU at its
    own (everything resident that may be)."""
    r_c_max = 1.0 if terms.policy.attn_decode_device == "gpu" else 0.0
    return (terms.gpu_need_bytes(0.0, 0.0) <= terms.gpu_capacity_bytes
            and terms.cpu_need_bytes(1.0, r_c_max) <= terms.cpu_capacity_bytes)


def _infeasible(modes: list[CostTerms], hw: HardwareProfile) -> InfeasibleError:
    """Explain why the most frugal candidate (smallest batch) does not fit."""
    terms = min(modes, key=lambda t: (t.policy.batch_size, t.gpu_need_bytes(0.0, 0.0)))
    gpu0 = terms.gpu_need_bytes(0.0, 0.0)
    if gpu0 > terms.gpu_capacity_bytes:
        phase = max(terms.gpu_memory, key=lambda p: sum(
            a(0.0, 0.0, terms.overflow(0.0)) for a in terms.gpu_memory[p].values()))
        parts = {k: a(0.0, 0.0, terms.overflow(0.0)) for k, a in terms.gpu_memory[phase].items()}
        g = terms.policy.num_gpus
        return InfeasibleError(
            f"needs {gpu0 / GiB:.1f} GiB GPU memory{gpu_label(g)} even with every routed expert "
            f"offloaded{f' over {g} GPUs' if g > 1 else ''} and "
            f"batch 1 ({breakdown_text(parts)}), {terms.gpu_capacity_bytes / GiB:.1f} GiB "
            f"usable of {hw.gpu.memory_bytes / GiB:.1f} GiB given")
    # the largest r_w the GPU allows, then the CPU memory that is still needed
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if terms.gpu_need_bytes(mid, 0.0) <= terms.gpu_capacity_bytes \
            else (lo, mid)
    cpu = terms.cpu_need_bytes(lo, 0.0)
    parts = {k: a(lo, 0.0, terms.overflow(lo)) for k, a in terms.cpu_memory.items()}
    return InfeasibleError(
        f"needs {cpu / GiB:.1f} GiB CPU memory at batch 1 with {lo:.0%} of the experts on the GPU "
        f"({breakdown_text(parts)}), {terms.cpu_capacity_bytes / GiB:.1f} GiB usable of "
        f"{hw.cpu.memory_bytes / GiB:.1f} GiB given")


def _result(model: ModelSpec, hw: HardwareProfile, workload: Workload, terms: CostTerms,
            r_w: float, r_c: float, method: str, start: float, objective_s: float,
            n_candidates: int) -> OptimizeResult:
    r_w = min(max(r_w, 0.0), 1.0)
    r_c = min(max(r_c, 0.0), 1.0) if terms.policy.attn_decode_device == "gpu" else 0.0
    policy = replace(terms.policy, weights_gpu_fraction=r_w, kv_gpu_fraction=r_c)
    prediction = predict(model, hw, workload, policy)
    return OptimizeResult(policy=policy, prediction=prediction, method=method,
                          solve_s=time.perf_counter() - start,
                          objective_tok_s=1.0 / objective_s, num_candidates=n_candidates)


def parallelisms(num_gpus: int) -> tuple[str, ...]:
    """The layouts worth searching: with one GPU they coincide, so tp only."""
    return PARALLELISMS if num_gpus > 1 else ("tp",)


def _best_of(results: list[OptimizeResult | InfeasibleError]) -> OptimizeResult:
    """The result with the highest predicted throughput; the first error if none fits."""
    found = [r for r in results if isinstance(r, OptimizeResult)]
    if not found:
        raise next(r for r in results if isinstance(r, InfeasibleError))
    return max(found, key=lambda r: r.prediction.throughput_tok_s)


def optimize(model: ModelSpec, hw: HardwareProfile, workload: Workload, *,
             schedule: str = "cgopipe", method: str = "milp", weight_dtype: str = "bf16",
             kv_dtype: str = "bf16", grid: SearchGrid | None = None,
             num_gpus: int = 1) -> OptimizeResult:
    """The policy with the highest predicted throughput that fits on `num_gpus` GPUs (tensor or
    expert parallel, whichever is faster); raises InfeasibleError."""
    if method == "brute":
        return brute_force(model, hw, workload, schedule=schedule, grid=grid or SearchGrid(),
                           weight_dtype=weight_dtype, kv_dtype=kv_dtype, num_gpus=num_gpus)
    if method != "milp":
        raise ValueError(f"method must be 'milp' or 'brute', got {method!r}")
    results: list[OptimizeResult | InfeasibleError] = []
    for parallelism in parallelisms(num_gpus):
        modes = _modes(model, hw, workload, schedule, grid or SearchGrid(), weight_dtype,
                       kv_dtype, num_gpus, parallelism)
        try:
            results.append(_solve_milp(model, hw, workload, modes))
        except InfeasibleError as exc:
            results.append(exc)
    return _best_of(results)


def _solve_milp(model: ModelSpec, hw: HardwareProfile, workload: Workload,
                all_modes: list[CostTerms]) -> OptimizeResult:
    """The MILP's optimum over `all_modes` (one parallelism)."""
    start = time.perf_counter()
    modes = [t for t in all_modes if _may_fit(t)]
    if not modes:
        raise _infeasible(all_modes, hw)
    prob, w, r_w, r_c = _build_milp(modes, workload.gen_len)
    status = prob.solve(pulp.PULP_CBC_CMD(msg=False))
    if pulp.LpStatus[status] != "Optimal":
        raise _infeasible(all_modes, hw)
    best = max(range(len(modes)), key=lambda m: w[m].varValue or 0.0)
    objective_s = pulp.value(prob.objective) / _OBJ_SCALE
    return _result(model, hw, workload, modes[best], r_w.varValue or 0.0, r_c.varValue or 0.0,
                   "milp", start, objective_s, len(modes))


def _build_milp(modes: list[CostTerms], gen_len: int
                ) -> tuple[pulp.LpProblem, list[pulp.LpVariable], pulp.LpVariable,
                           pulp.LpVariable]:
    """The MILP of the module docstring over `modes` (memory in GiB, time in seconds)."""
    prob = pulp.LpProblem("moe_policy", pulp.LpMinimize)
    r_w = prob.add_variable("r_w", 0, 1)
    r_c = prob.add_variable("r_c", 0, 1)
    a_gpu = prob.add_variable("attn_on_gpu", cat="Binary")
    prob += r_c <= a_gpu
    pairs = sorted({(t.policy.micro_batch_size, t.policy.num_micro_batches) for t in modes})
    x = {c: prob.add_variable(f"x_mu{c[0]}_nub{c[1]}", cat="Binary") for c in pairs}
    prob += pulp.lpSum(x.values()) == 1
    w = [prob.add_variable(f"w{m}", cat="Binary") for m in range(len(modes))]
    for c in pairs:
        prob += pulp.lpSum(w[m] for m, t in enumerate(modes)
                           if (t.policy.micro_batch_size, t.policy.num_micro_batches) == c) == x[c]
    prob += pulp.lpSum(w[m] for m, t in enumerate(modes)
                       if t.policy.attn_decode_device == "gpu") == a_gpu
    products: list[tuple[pulp.LpVariable, pulp.LpVariable]] = []
    prob += pulp.lpSum(_add_mode(prob, m, terms, w[m], r_w, r_c, gen_len, products)
                       for m, terms in enumerate(modes))
    # valid equalities (one w_m is 1): sum_m y_m = r_w, sum_m q_m = r_c. They make the LP
    # relaxation the convex hull of the disjunction, so CBC closes the gap near the root.
    prob += pulp.lpSum(y for y, _ in products) == r_w
    prob += pulp.lpSum(q for _, q in products) == r_c
    return prob, w, r_w, r_c


def _add_mode(prob: pulp.LpProblem, m: int, terms: CostTerms, w_m: pulp.LpVariable,
              r_w: pulp.LpVariable, r_c: pulp.LpVariable, gen_len: int,
              products: list[tuple[pulp.LpVariable, pulp.LpVariable]]
              ) -> pulp.LpAffineExpression:
    """Constraints of mode m; returns its objective term (ms per generated token) and appends
    its products (w_m r_w, w_m r_c) to `products`."""
    gpu_attention = terms.policy.attn_decode_device == "gpu"
    y = prob.add_variable(f"y{m}", 0, 1)     # w_m * r_w
    # w_m * r_c; r_c = 0 whenever attention runs on the CPU
    q = prob.add_variable(f"q{m}", 0, 1 if gpu_attention else 0)
    products.append((y, q))
    for prod, var in ((y, r_w), (q, r_c)) if gpu_attention else ((y, r_w),):
        prob += prod <= w_m                  # McCormick envelope, exact for binary w_m
        prob += prod <= var
        prob += prod >= var - (1 - w_m)
    o = prob.add_variable(f"o{m}", 0)        # pinned overflow, GiB
    if terms.overflow_bytes is None:
        prob += o == 0
    else:
        ov = terms.overflow_bytes.scaled(1.0 / GiB)
        prob += o >= ov.const * w_m + ov.r_w * y
        prob += o <= max(ov.const, 0.0) * w_m

    def lin(a: Affine) -> pulp.LpAffineExpression:
        """An affine term times the mode binary (overflow coefficient per byte, o in GiB)."""
        return a.const * w_m + a.r_w * y + a.r_c * q + a.overflow * GiB * o

    for comps in terms.gpu_memory.values():
        prob += pulp.lpSum(lin(a.scaled(1 / GiB)) for a in comps.values()) <= \
            terms.gpu_capacity_bytes / GiB * w_m
    prob += pulp.lpSum(lin(a.scaled(1 / GiB)) for a in terms.cpu_memory.values()) <= \
        terms.cpu_capacity_bytes / GiB * w_m

    def layer_time(stages: dict[str, Affine], name: str) -> pulp.LpAffineExpression:
        if not terms.overlapped:   # in series, the weight stream's two legs overlapping
            rest = pulp.lpSum(lin(a) for a in without_weight_stream(stages).values())
            legs = [a for s, a in stages.items() if s in WEIGHT_STREAM_STAGES and a != Affine()]
            if len(legs) < 2:
                return rest + pulp.lpSum(lin(a) for a in legs)
            stream = prob.add_variable(name, 0)     # epigraph of max over the two legs
            for a in legs:
                prob.addConstraint(stream >= lin(a))
            return rest + stream
        t_var = prob.add_variable(name, 0)     # epigraph of max over the stages
        for s, a in interfered(stages, terms.factors).items():
            if stages[s] != Affine():        # a stage with nothing to do binds nothing
                prob.addConstraint(t_var >= lin(a))
        return t_var

    layers = pulp.lpSum(count * layer_time(terms.decode_stages[k], f"D{m}_{k}")
                        for k, count in terms.layer_counts.items())
    if terms.overlapped:   # max(layers, fill + layers without the weight stream): epigraph
        filled = lin(terms.decode_fill_s) + pulp.lpSum(
            count * layer_time(without_weight_stream(terms.decode_stages[k]), f"F{m}_{k}")
            for k, count in terms.filled_layer_counts().items())
        step_layers = prob.add_variable(f"S{m}", 0)
        prob.addConstraint(step_layers >= layers)
        prob.addConstraint(step_layers >= filled)
        layers = step_layers
    step = lin(terms.decode_extra_s) + layers
    prefill = lin(terms.prefill_extra_s) + pulp.lpSum(
        count * layer_time(terms.prefill_stages[k], f"P{m}_{k}")
        for k, count in terms.layer_counts.items())
    return _OBJ_SCALE / (terms.policy.batch_size * gen_len) * (prefill + (gen_len - 1) * step)


def brute_force(model: ModelSpec, hw: HardwareProfile, workload: Workload, *,
                schedule: str = "cgopipe", grid: SearchGrid | None = None,
                weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                num_gpus: int = 1) -> OptimizeResult:
    """Reference search: every candidate of `grid` (and every parallelism with G > 1) on its
    (r_w, r_c) grid, evaluated with the cost model; the best one re-evaluated with `predict`."""
    grid = grid or SearchGrid()
    start = time.perf_counter()
    modes = [t for parallelism in parallelisms(num_gpus) for t in
             _modes(model, hw, workload, schedule, grid, weight_dtype, kv_dtype, num_gpus,
                    parallelism)]
    best: tuple[float, CostTerms, float, float] | None = None
    for terms in modes:
        r_cs = grid.r_c_values if terms.policy.attn_decode_device == "gpu" else (0.0,)
        for r_w in grid.r_w_values:
            for r_c in r_cs:
                if not terms.fits(r_w, r_c):
                    continue
                tpt = terms.time_per_token_s(r_w, r_c)
                if best is None or tpt < best[0]:
                    best = (tpt, terms, r_w, r_c)
    if best is None:
        raise _infeasible(modes, hw)
    tpt, terms, r_w, r_c = best
    return _result(model, hw, workload, terms, r_w, r_c, "brute", start, tpt, len(modes))


def compare_schedules(model: ModelSpec, hw: HardwareProfile, workload: Workload, *,
                      weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                      grid: SearchGrid | None = None, num_gpus: int = 1
                      ) -> dict[str, OptimizeResult | InfeasibleError]:
    """The best policy under each schedule (what pipelining and CPU attention buy), or the
    reason none fits."""
    out: dict[str, OptimizeResult | InfeasibleError] = {}
    for schedule in ("cgopipe", "cgopipe-serial", "layerwise"):
        try:
            out[schedule] = optimize(model, hw, workload, schedule=schedule,
                                     weight_dtype=weight_dtype, kv_dtype=kv_dtype, grid=grid,
                                     num_gpus=num_gpus)
        except InfeasibleError as exc:
            out[schedule] = exc
    return out
