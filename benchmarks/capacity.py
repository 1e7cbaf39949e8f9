"""Capacity planner: how many CPU cores keep a GPU busy, per schedule, from measured costs.

    python bench.py capacity                         # validate here, then plan the seed scenario
    python bench.py capacity --part seed --step-ms 60 --chunk 25 --latency-ms 300

The model (:class:`Scenario`, :func:`predict`) takes the per-step CPU cost of an env, its
render cost per decision, the chunk and execution lengths, the policy latency
``L(B) = base + per_item * B``, the inference loop's own cost per policy call
``o(B) = loop_call_ms + loop_env_ms * B`` (batching, dispatch, frames; transport per env is
part of it), the number of envs and of worker cores. Every env of a worker is stepped in
turn; a policy call and its loop work are serial. Per schedule, one cycle takes:

- lock-step: ``L(N) + o(N) + ceil(N / W) * c``, with ``c`` one env decision's CPU;
- ``k`` stages (batch ``B = N / k``, stage stepping ``S = ceil(B / W) * c``, device turn
  ``D = L(B) + o(B)``): ``max(k * D, k * S, D + S)``;
- lookahead ``d`` on top of either: the last ``d`` steps of a stage's stepping overlap its
  own device turn: ``D + S - min(ceil(B / W) * d * step, D)`` in place of ``D + S``;
- dynamic batching: a closed system whose batch is what becomes ready during one call,
  ``B = X * D(B)``, at the rate ``X = min(W / c, B / D(B), N / (c + D(B)))``, solved by
  iteration.

Parts: ``validate`` calibrates on this machine (toy env with real CPU cost, the loop's cost
from a zero-latency run, ``LatencyPolicy``'s configured L(B)) and compares prediction with
measurement for local 1 and 2 workers under each schedule; ``seed`` plans the seed scenario
(60 ms per control step, chunks of 25, 300 ms per batch of 8 on the GPU, 64-512 envs): the
cores that reach 90% GPU utilisation, where the GPU saturates as nodes are added, and where
the loop (transport included) becomes the limit, with a plot.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, replace

from benchmarks import parts

SCHEDULES = ("lock-step", "2-stage", "dynamic", "lookahead", "2-stage + lookahead")


@dataclass(frozen=True)
class Scenario:
    """Everything the model needs; times in milliseconds.

    Example:
        >>> s = Scenario(num_envs=8, workers=2, step_ms=1.0, exec_len=8, chunk_len=8,
        ...              base_ms=5.0, per_item_ms=1.0)
        >>> predict(s, "2-stage")["gpu_busy"] > predict(s, "lock-step")["gpu_busy"]
        True
    """

    num_envs: int
    workers: int
    step_ms: float
    exec_len: int
    chunk_len: int
    base_ms: float
    per_item_ms: float
    render_ms: float = 0.0
    loop_call_ms: float = 0.0  # the loop's host work per policy call
    loop_env_ms: float = 0.0  # ... and per env in it (transport included)
    lookahead: int = 2
    # Where the loop and the transport run on the workers' own cores (one machine, simulated
    # nodes), their CPU per policy call competes with the physics: the cores, and that CPU.
    # None: the inference node has cores of its own, as on a real cluster.
    shared_cores: int | None = None
    loop_cpu_call_ms: float = 0.0
    loop_cpu_env_ms: float = 0.0

    def latency(self, b: float) -> float:
        return self.base_ms + self.per_item_ms * b

    def turn(self, b: float) -> float:
        """A policy call for ``b`` envs with the loop's work around it."""
        return self.latency(b) + self.loop_call_ms + self.loop_env_ms * b

    def call_cpu(self, b: float) -> float:
        """CPU (on shared cores) of the loop and the transport for one call of ``b`` envs."""
        return self.loop_cpu_call_ms + self.loop_cpu_env_ms * b

    @property
    def decision_ms(self) -> float:
        """One env decision's CPU: its executed steps and one render."""
        return self.exec_len * self.step_ms + self.render_ms


def _staged(s: Scenario, stages: int, d: int) -> tuple[float, float, float]:
    """(decisions, ms, device-busy ms) of one cycle of ``stages`` fixed stages with
    lookahead ``d``."""
    b = s.num_envs / stages
    per_worker = math.ceil(b / min(s.workers, b))
    step = per_worker * s.decision_ms
    turn = s.turn(b)
    own = turn + step - min(per_worker * d * s.step_ms, turn)
    every = math.ceil(s.num_envs / min(s.workers, s.num_envs)) * s.decision_ms  # per worker
    cycle = max(stages * turn, every, own)
    if s.shared_cores:  # a cycle's physics and loop CPU, spread over the shared cores
        cycle = max(cycle, (s.num_envs * s.decision_ms + stages * s.call_cpu(b)) / s.shared_cores)
    return s.num_envs, cycle, stages * s.latency(b)


def _dynamic(s: Scenario) -> tuple[float, float, float]:
    """(decisions, ms, device-busy ms) of one dynamic batch at the fixed point."""
    c, n = s.decision_ms, s.num_envs
    w = min(s.workers, n)
    x, b = w / c, 1.0  # decisions per ms: start from the CPU's rate
    for _ in range(500):
        b = min(float(n), max(1.0, x * s.turn(b)))
        x_new = min(w / c, b / s.turn(b), n / (c + s.turn(b)))
        if s.shared_cores:
            x_new = min(x_new, s.shared_cores / (c + s.call_cpu(b) / b))
        if abs(x_new - x) <= 1e-12:
            break
        x = 0.5 * (x + x_new)
    return b, b / x, s.latency(b)


def predict(s: Scenario, schedule: str) -> dict:
    """Throughput and utilisation of ``schedule`` (one of :data:`SCHEDULES`);
    ``"lookahead"`` is one stage with ``s.lookahead`` actions executed during inference.

    ``gpu_busy`` is the device's busy time share (what nvidia-smi and the profiler show);
    ``gpu_used`` the share of what the device could do at a batch of every env (``N / L(N)``
    decisions per ms): a device kept busy by small batches (dynamic batching when the
    per-call base latency dominates) is busy, not used. ``batch`` is the policy batch."""
    staged = {"lock-step": (1, 0), "2-stage": (2, 0), "lookahead": (1, s.lookahead)}
    staged["2-stage + lookahead"] = (2, s.lookahead)
    if schedule in staged:
        decisions, cycle, busy = _staged(s, *staged[schedule])
        batch = s.num_envs / staged[schedule][0]
    elif schedule == "dynamic":
        decisions, cycle, busy = _dynamic(s)
        batch = decisions
    else:
        raise ValueError(f"schedule={schedule!r}: choose from {SCHEDULES}")
    x = decisions / cycle  # per ms
    return {
        "decisions_per_s": 1000 * x,
        "env_steps_per_s": 1000 * x * s.exec_len,
        "gpu_busy": min(1.0, busy / cycle),
        "gpu_used": min(1.0, x * s.latency(s.num_envs) / s.num_envs),
        "cpu_busy": min(1.0, x * s.decision_ms / s.workers),
        "batch": batch,
    }


def cores_for(s: Scenario, schedule: str, target: float = 0.9, max_cores: int = 4096) -> int | None:
    """The fewest worker cores at which ``schedule`` keeps the GPU ``target`` busy (None:
    not within ``max_cores``: the schedule cannot)."""
    lo = 1
    while lo <= max_cores:
        if predict(replace(s, workers=lo), schedule)["gpu_busy"] >= target:
            break
        lo *= 2
    else:
        return None
    hi, lo = lo, max(1, lo // 2)
    while lo < hi:
        mid = (lo + hi) // 2
        if predict(replace(s, workers=mid), schedule)["gpu_busy"] >= target:
            hi = mid
        else:
            lo = mid + 1
    return hi


# -- validation on this machine ---------------------------------------------------------------
@dataclass(frozen=True)
class LoopCost:
    """The loop's cost per policy call and per env in it: wall time (serial with the call),
    and the machine's CPU (every process: loop, workers' frame handling, a backend's own)."""

    call_ms: float
    env_ms: float
    cpu_call_ms: float
    cpu_env_ms: float


def calibrate_loop(args, env_kwargs: dict | None = None, **engine_kw) -> LoopCost:
    """The loop's :class:`LoopCost`, from lock-step turns of a zero-cost env and a
    zero-latency policy with 2 and 8 envs; ``engine_kw`` picks the backend
    (``backend="ray", workers_per_node=1``)."""
    from benchmarks.engine import measure
    from pipeline import RolloutEngine
    from pipeline.policies import LatencyPolicy

    turn, cpu = {}, {}
    toy = dict(state_dim=16, episode_len=10_000, **(env_kwargs or {}))
    for n in (2, 8):
        policy = LatencyPolicy(state_dim=16, chunk_len=args.chunk, deterministic=True)
        with RolloutEngine(
            "toy", policy, num_envs=n, num_workers=2, mode="sync", num_stages=1,
            env_kwargs=toy, **engine_kw,
        ) as engine:  # fmt: skip
            m = measure(engine, 200, args.windows)
        turn[n] = 1000 / m["decisions_per_s"] * n  # ms per lock-step turn
        per_turn = [
            1000 * w["cpu_s"] * n / (w["decisions_per_s"] * w["wall_s"]) for w in m["windows"]
        ]
        cpu[n] = sorted(per_turn)[len(per_turn) // 2]
    per_env, cpu_env = (turn[8] - turn[2]) / 6, (cpu[8] - cpu[2]) / 6
    per_env, cpu_env = max(0.0, per_env), max(0.0, cpu_env)  # (noise can make them < 0)
    return LoopCost(
        max(0.0, turn[2] - 2 * per_env), per_env, max(0.0, cpu[2] - 2 * cpu_env), cpu_env
    )


ENGINE_KW = {
    "lock-step": dict(mode="sync", num_stages=1),
    "2-stage": dict(num_stages=2),
    "dynamic": dict(schedule="dynamic"),
    "lookahead": dict(num_stages=1),
    "2-stage + lookahead": dict(num_stages=2),
}


def compare(args, step_ms: float, configs: list[tuple], schedules=tuple(ENGINE_KW)) -> list[dict]:
    """Predicted against measured decisions/s for each ``(label, workers, engine_kw,
    LoopCost)`` config and schedule, on toy envs at ``step_ms`` per step with
    ``LatencyPolicy``; prints a row each. Everything runs on this machine, so the model
    shares its cores between the workers, the loop and the transport; the prediction
    without that contention is printed beside it."""
    from benchmarks.engine import measure
    from pipeline import RolloutEngine
    from pipeline.policies import LatencyPolicy

    toy = dict(state_dim=16, episode_len=10_000, step_cost_us=args.step_cost_us)
    d = args.lookahead
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"  {'config':<24}{'schedule':<22}{'predicted':>10}{'measured':>10}{'error':>8}"
        f"{'own-cores model':>17}{'error':>8}"
    )
    rows = []
    for label, workers, config_kw, loop in configs:
        for schedule in schedules:
            ahead = "lookahead" in schedule
            scenario = Scenario(
                num_envs=args.envs,
                workers=workers,
                step_ms=step_ms,
                exec_len=args.chunk - d if ahead else args.chunk,
                chunk_len=args.chunk,
                base_ms=args.base_ms,
                per_item_ms=args.per_item_ms,
                loop_call_ms=loop.call_ms,
                loop_env_ms=loop.env_ms,
                lookahead=d,
            )
            apart = predict(scenario, schedule)["decisions_per_s"]
            scenario = replace(
                scenario,
                shared_cores=cores,
                loop_cpu_call_ms=loop.cpu_call_ms,
                loop_cpu_env_ms=loop.cpu_env_ms,
            )
            predicted = predict(scenario, schedule)
            policy = LatencyPolicy(
                state_dim=16, chunk_len=args.chunk, base_ms=args.base_ms,
                per_item_ms=args.per_item_ms,
            )  # fmt: skip
            kw = dict(ENGINE_KW[schedule], **config_kw, lookahead=d if ahead else 0)
            with RolloutEngine(
                "toy", policy, num_envs=args.envs, num_workers=workers, env_kwargs=toy, **kw
            ) as engine:
                m = measure(engine, args.decisions, args.windows)
            measured = m["decisions_per_s"]
            busy = sorted(w["policy_s"] / w["wall_s"] for w in m["windows"])[len(m["windows"]) // 2]
            error = predicted["decisions_per_s"] / measured - 1
            rows.append(
                dict(config=label, workers=workers, schedule=schedule,
                     predicted=predicted["decisions_per_s"], measured=measured, error=error,
                     predicted_own_cores=apart, error_own_cores=apart / measured - 1,
                     predicted_gpu_busy=predicted["gpu_busy"], measured_gpu_busy=busy)
            )  # fmt: skip
            print(
                f"  {label:<24}{schedule:<22}{predicted['decisions_per_s']:>10.1f}"
                f"{measured:>10.1f}{error:>+8.0%}{apart:>17.1f}{apart / measured - 1:>+8.0%}",
                flush=True,
            )
    for key in ("error", "error_own_cores"):
        errors = sorted(abs(r[key]) for r in rows)
        print(
            f"  {'shared-cores' if key == 'error' else 'own-cores'} model: median |error| "
            f"{errors[len(errors) // 2]:.0%}, largest {errors[-1]:.0%}"
        )
    return rows


def validate(args) -> dict:
    from benchmarks.engine import calibrate_env_ms

    toy = dict(state_dim=16, episode_len=10_000, step_cost_us=args.step_cost_us)
    step_ms = calibrate_env_ms(toy, args.chunk) / args.chunk
    loop = calibrate_loop(args)
    print(
        f"validate: toy envs at {step_ms:.2f} ms per control step (measured), chunks of "
        f"{args.chunk} (lookahead: {args.lookahead} of them frozen, windows of "
        f"{args.chunk - args.lookahead}), {args.envs} envs, LatencyPolicy L(B) = "
        f"{args.base_ms} + {args.per_item_ms} ms x B; loop cost measured {loop_text(loop)}"
    )
    configs = [(f"local, {w} worker{'s' * (w > 1)}", w, {}, loop) for w in (1, 2)]
    rows = compare(args, step_ms, configs)
    return {"step_ms": step_ms, "loop": dataclasses.asdict(loop), "rows": rows}


def loop_text(loop: LoopCost) -> str:
    return (
        f"{loop.call_ms:.3f} ms per call + {loop.env_ms:.3f} ms per env (wall), "
        f"{loop.cpu_call_ms:.3f} + {loop.cpu_env_ms:.3f} ms (machine CPU)"
    )


# -- the seed scenario -------------------------------------------------------------------------
def seed(args) -> dict:
    """The seed's workload at LIBERO-like scales: cores for 90% GPU busy, and the node sweep."""
    per_item = (1 - args.base_share) * args.latency_ms / args.latency_batch
    base = args.base_share * args.latency_ms
    bytes_ms = args.obs_kb / 1024 / args.bandwidth_gbs  # ms per decision on the wire
    d = args.seed_lookahead

    def scenario(n: int, cores: int, ahead: bool) -> Scenario:
        return Scenario(
            num_envs=n,
            workers=cores,
            step_ms=args.step_ms,
            exec_len=args.seed_chunk - d if ahead else args.seed_chunk,
            chunk_len=args.seed_chunk,
            base_ms=base,
            per_item_ms=per_item,
            render_ms=args.render_ms,
            loop_call_ms=args.loop_call_ms,
            loop_env_ms=args.loop_env_ms + bytes_ms,
            lookahead=d,
        )

    print(
        f"seed scenario: {args.step_ms} ms per control step, {args.render_ms} ms render per "
        f"decision, chunks of {args.seed_chunk} (lookahead: {d} frozen, windows of "
        f"{args.seed_chunk - d}); GPU L(B) = {base:.0f} + {per_item:.2f} ms x B "
        f"({args.latency_ms} ms at B = {args.latency_batch}, base share {args.base_share}); "
        f"loop {args.loop_call_ms} ms per call + {args.loop_env_ms} ms per env + "
        f"{args.obs_kb} KB per observation at {args.bandwidth_gbs} GB/s"
    )
    out: dict = {"cores_for_90": {}, "nodes": {}}
    print("  worker cores for 90% GPU busy (none: not reachable):")
    for n in args.envs_list:
        cores = {k: cores_for(scenario(n, 1, "lookahead" in k), k) for k in SCHEDULES}
        out["cores_for_90"][n] = cores
        batch = cores["dynamic"] and predict(scenario(n, cores["dynamic"], False), "dynamic")
        cells = "  ".join(f"{k}: {v if v else 'none'}" for k, v in cores.items())
        if batch:
            cells += f" (dynamic's batch: {batch['batch']:.1f})"
        print(f"    {n:>4} envs  {cells}")
    n = args.sweep_envs
    print(f"  {n} envs, {args.cores_per_node} worker cores per node: env steps/s (GPU busy)")
    for k in SCHEDULES:
        series = []
        for nodes in args.nodes_list:
            p = predict(scenario(n, nodes * args.cores_per_node, "lookahead" in k), k)
            series.append({"nodes": nodes, **p})
        out["nodes"][k] = series
        cells = "  ".join(
            f"{r['nodes']}: {r['env_steps_per_s']:.0f} ({r['gpu_busy']:.0%})" for r in series
        )
        print(f"    {k:<22} {cells}")
        rates = [r["env_steps_per_s"] for r in series]
        flat = next(
            (series[i]["nodes"] for i in range(1, len(rates)) if rates[i] < rates[i - 1] * 1.02),
            None,
        )
        out["nodes"][k + " saturates at"] = flat
    loop_rate = 1000 / (args.loop_env_ms + bytes_ms)
    cpu_rate = n and 1000 * args.nodes_list[-1] * args.cores_per_node / (
        args.seed_chunk * args.step_ms + args.render_ms
    )
    print(
        f"  the loop and transport carry at most {loop_rate:,.0f} decisions/s; "
        f"{args.nodes_list[-1]} nodes of CPU produce at most {cpu_rate:,.0f}: "
        + ("the transport is the limit" if cpu_rate > loop_rate else "the transport never limits")
    )
    out["loop_rate"], out["cpu_rate_max_nodes"] = loop_rate, cpu_rate
    if args.plot:
        _plot(out, args)
    return out


def _plot(out: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k in SCHEDULES:
        series = out["nodes"][k]
        nodes = [r["nodes"] for r in series]
        ax1.plot(nodes, [r["env_steps_per_s"] for r in series], marker="o", label=k)
        ax2.plot(nodes, [100 * r["gpu_busy"] for r in series], marker="o", label=k)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"nodes ({args.cores_per_node} worker cores each)")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("env steps / s")
    ax2.set_ylabel("GPU busy (%)")
    ax2.axhline(90, color="grey", ls="--", lw=1)
    ax1.set_title(
        f"seed scenario, {args.sweep_envs} envs, transport {args.bandwidth_gbs:g} GB/s: "
        "throughput (model)",
        fontsize=10,
    )
    ax2.set_title("GPU busy (model); dashed: 90%")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"  wrote {args.plot}")


PARTS = {"validate": validate, "seed": seed}


def main(argv: list[str] | None = None) -> int:
    ap = parts.parser("bench.py capacity", __doc__, PARTS)
    g = ap.add_argument_group("validate (this machine)")
    g.add_argument("--step-cost-us", type=float, default=1000.0)
    g.add_argument("--chunk", type=int, default=8)
    g.add_argument("--lookahead", type=int, default=2)
    g.add_argument("--envs", type=int, default=8)
    g.add_argument("--base-ms", type=float, default=6.0)
    g.add_argument("--per-item-ms", type=float, default=1.0)
    g.add_argument("--decisions", type=int, default=20, help="per window and env")
    g.add_argument("--windows", type=int, default=3)
    g = ap.add_argument_group("seed scenario (the model alone)")
    g.add_argument("--step-ms", type=float, default=60.0, help="CPU per control step")
    g.add_argument("--render-ms", type=float, default=0.0, help="per decision")
    g.add_argument("--seed-chunk", type=int, default=25)
    g.add_argument("--seed-lookahead", type=int, default=5)
    g.add_argument("--latency-ms", type=float, default=300.0)
    g.add_argument("--latency-batch", type=int, default=8)
    g.add_argument("--base-share", type=float, default=0.8, help="of latency-ms, per call")
    g.add_argument("--loop-call-ms", type=float, default=1.0)
    g.add_argument("--loop-env-ms", type=float, default=0.1)
    g.add_argument("--obs-kb", type=float, default=400.0, help="bytes moved per decision")
    g.add_argument("--bandwidth-gbs", type=float, default=3.0, help="node to inference node")
    g.add_argument("--envs-list", type=int, nargs="+", default=[64, 128, 256, 512])
    g.add_argument("--sweep-envs", type=int, default=256)
    g.add_argument("--cores-per-node", type=int, default=16)
    g.add_argument("--nodes-list", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    g.add_argument("--plot", default="docs/capacity_plan.png")
    ap.add_argument("--json", default="bench_results/plan.json")
    return parts.run(ap.parse_args(argv), PARTS)
