"""Scheduling: first-ready dynamic batching against fixed stages and lock-step, in one run.

    python bench.py scheduler                 # toy at CV 0 / 0.5 / 1, then tabletop/pick-place
    python bench.py scheduler --cv 0.5 --windows 5
    python bench.py scheduler --cv 1 --against-simulation   # real / simulated, fixed caps

Workloads: ``toy`` envs with real CPU cost (``--step-cost-us`` per control step, chunks of
``--chunk``) whose cost is drawn per env and per chunk from a gamma distribution with the
given coefficient of variation (``step_cost_cv``); then ``tabletop/pick-place`` (one 64x64
camera, SAPIEN physics, auto-resets every 40 control steps). The policy is
``LatencyPolicy``: ``L(B) = base + per_item * B`` on a simulated device (no CPU), calibrated
so that one stage's inference equals one stage's stepping at CV 0, the balanced case where
overlap matters most; ``--base-share`` of it is the per-call base.

Schedules: lock-step (sync, 1 stage), 2-stage pipelining, and dynamic batching (its default,
adaptive rule: batches of the size that the fitted ``L(B)`` and the measured step times say
is best, a partial batch waiting at most the per-call cost; ``--min-batch``/``--max-wait-us``
give the fixed rule instead). Per row, medians over
``--windows`` rollout() calls: decisions/s; the bound (the time the busier side needs: the
simulated device's busy time for the batches this schedule formed, or the workers' measured
busy time per worker; lock-step adds the two, as it cannot overlap them); throughput as a
share of the bound; simulated GPU and worker CPU busy fractions; the median batch size.

``--against-simulation`` runs the toy workloads only, and puts each real schedule beside its
event simulation (no cost of its own): 2 stages, and first-ready dynamic batching with fixed
caps on the batch. The ratio real / simulated says how much of a schedule's ceiling its
machinery keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import numpy as np

import envs
from benchmarks.engine import calibrate_env_ms, measure
from pipeline import RolloutEngine
from pipeline.policies import LatencyPolicy
from pipeline.schedule.dynamic import rule_candidates, simulate, simulate_stages

SCHEDULES = {
    "lock-step (sync, 1 stage)": dict(mode="sync", num_stages=1),
    "2-stage pipelining": dict(num_stages=2),
    "dynamic batching": dict(schedule="dynamic"),
}
PICK_PLACE = dict(cameras=("head",), image_size=64, max_steps=40)


def run(env: str, env_kwargs: dict, policy: LatencyPolicy, args, **schedule) -> dict:
    with RolloutEngine(
        env,
        policy,
        num_envs=args.envs,
        num_workers=args.workers,
        env_kwargs=env_kwargs,
        **schedule,
    ) as engine:
        m = measure(engine, args.decisions, args.windows)
        sizes = list(engine.stats.batch_sizes)
        rule = engine.batching
        model = rule.latency_model() if hasattr(rule, "latency_model") else None
    rows = []
    for w in m["windows"]:
        cpu = sum(w["worker_busy_s"]) / 1e9 / args.workers  # per worker
        gpu = w["policy_s"]
        bound_s = gpu + cpu if schedule.get("mode") == "sync" else max(gpu, cpu)
        rows.append(
            {
                "efficiency": bound_s / w["wall_s"],
                "gpu_busy": gpu / w["wall_s"],
                "cpu_busy": cpu / w["wall_s"],
                "bound_decisions_per_s": w["decisions_per_s"] * w["wall_s"] / bound_s,
            }
        )
    out = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    out["decisions_per_s"] = m["decisions_per_s"]
    out["spread"] = m["spread_decisions_per_s"]
    out["median_batch"] = float(np.median(sizes)) if sizes else 0.0
    if model is not None:  # what the adaptive rule measured and chose
        out["rule"] = {
            "fitted_base_ms": model[0] / 1e6,
            "fitted_per_item_ms": model[1] / 1e6,
            "max_batch": rule.max_batch,
            "max_wait_ms": rule.max_wait_ns / 1e6,
            "fixed_stages": rule.fixed_stages,
            "windows_on_fixed_stages": sum(w["fixed_stages"] for w in m["windows"]),
        }
    return out


def _chunk_times(cv: float, env_ms: float) -> np.ndarray:
    """Gamma-drawn chunk times (ns) of mean ``env_ms`` and this CV, as the toy env draws
    them."""
    n = 1 << 14
    if cv > 0:
        return np.random.default_rng(0).gamma(1 / cv**2, env_ms * 1e6 * cv**2, n)
    return np.full(n, env_ms * 1e6)


def _device_model(latency: dict) -> tuple[float, float]:
    """The bench's ``L(B)`` as the simulations take it: ``(base, per_item)`` in ns."""
    return latency["base_ms"] * 1e6, latency["per_item_ms"] * 1e6


def ceiling(cv: float, env_ms: float, latency: dict, envs: int, workers: int) -> dict:
    """What each schedule could reach with no cost of its own: the event simulations of
    2 stages and of dynamic batching (the best batch size and wait of those the adaptive
    rule chooses from), on gamma-drawn chunk times of mean ``env_ms`` and this CV."""
    step_ns = _chunk_times(cv, env_ms)
    model = _device_model(latency)
    stages = simulate_stages(envs, workers, model, step_ns, rounds=400)
    dynamic = max(
        simulate(envs, workers, model, step_ns, batch, wait, rounds=60).rate
        for batch, wait in rule_candidates(envs, workers, model[0], step_ns)
    )
    return {"stages": stages, "dynamic": dynamic, "ratio": dynamic / stages}


HEADER = (
    f"  {'schedule':<28}{'dec/s':>8}{'[spread]':>16}{'bound':>8}{'of bound':>9}"
    f"{'GPU busy':>9}{'CPU busy':>9}{'batch':>7}"
)


def _line(name: str, r: dict) -> str:
    lo, hi = r["spread"]
    return (
        f"  {name:<28}{r['decisions_per_s']:>8.1f} [{lo:6.1f}-{hi:6.1f}]"
        f"{r['bound_decisions_per_s']:>8.1f}{r['efficiency']:>9.0%}{r['gpu_busy']:>9.0%}"
        f"{r['cpu_busy']:>9.0%}{r['median_batch']:>7.1f}"
    )


def workload(
    title: str,
    env: str,
    env_kwargs: dict,
    state_dim: int,
    latency: dict,
    args,
    bound: dict | None = None,
):
    print(f"{title}")
    print(HEADER)
    rows = {}
    schedules = dict(SCHEDULES)
    if args.min_batch or args.max_wait_us:
        rule = dict(min_batch=args.min_batch or None, max_wait_us=args.max_wait_us or None)
        schedules["dynamic batching"] = dict(schedule="dynamic", **rule)
    for name, schedule in schedules.items():
        policy = LatencyPolicy(state_dim=state_dim, chunk_len=args.chunk, **latency)
        rows[name] = r = run(env, env_kwargs, policy, args, **schedule)
        print(_line(name, r), flush=True)
        if "rule" in r:
            q = r["rule"]
            choice = (
                "its 2 fixed stages"
                if q["fixed_stages"]
                else f"batches of {q['max_batch']}, a partial one waiting up to "
                f"{q['max_wait_ms']:.1f} ms"
            )
            print(
                f"    adaptive rule: fitted L(B) = {q['fitted_base_ms']:.1f} + "
                f"{q['fitted_per_item_ms']:.2f} ms x B; chose {choice} at the end; "
                f"{q['windows_on_fixed_stages']} of {args.windows} windows ran on the fixed "
                "stages",
                flush=True,
            )
    dyn, stages = rows["dynamic batching"], rows["2-stage pipelining"]
    print(
        f"  -> dynamic / 2-stage: {dyn['decisions_per_s'] / stages['decisions_per_s']:.2f}x; "
        f"dynamic at {dyn['efficiency']:.0%} of its bound",
        flush=True,
    )
    if bound is not None:
        rows["ceiling"] = bound
        print(
            f"  -> with no cost of their own (event simulation): 2-stage {bound['stages']:.1f}, "
            f"dynamic {bound['dynamic']:.1f} decisions/s, dynamic / 2-stage at most "
            f"{bound['ratio']:.2f}x",
            flush=True,
        )
    print()
    return rows


CAPS = (4, 8, 16)  # first-ready batch caps set beside their simulation


def against_simulation(cv: float, env_ms: float, toy: dict, latency: dict, args) -> dict:
    """Each schedule's real decisions/s beside its event simulation's, for one CV: 2 stages,
    and first-ready dynamic batching capped at each of :data:`CAPS`."""
    step_ns = _chunk_times(cv, env_ms)
    model = _device_model(latency)
    kw = dict(toy, step_cost_cv=cv)
    cases = {"2-stage pipelining": (dict(num_stages=2), None)}
    for cap in CAPS:
        rule = dict(schedule="dynamic", min_batch=1, max_batch=cap, max_wait_us=0)
        cases[f"dynamic, first-ready, cap {cap}"] = (rule, cap)
    print(f"toy, step cost CV {cv}: real against simulated (no cost of its own)")
    rows = {}
    for name, (schedule, cap) in cases.items():
        policy = LatencyPolicy(state_dim=toy["state_dim"], chunk_len=args.chunk, **latency)
        r = run("toy", kw, policy, args, **schedule)
        if cap is None:
            r["simulated"] = simulate_stages(args.envs, args.workers, model, step_ns, rounds=400)
        else:
            r["simulated"] = simulate(
                args.envs, args.workers, model, step_ns, cap, 0.0, rounds=60
            ).rate
        rows[name] = r
        print(
            f"  {name:<30} real {r['decisions_per_s']:7.1f}  simulated {r['simulated']:7.1f}  "
            f"real/simulated {r['decisions_per_s'] / r['simulated']:.2f}  (median batch "
            f"{r['median_batch']:.1f}, GPU busy {r['gpu_busy']:.0%}, CPU busy "
            f"{r['cpu_busy']:.0%})",
            flush=True,
        )
    print()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench.py scheduler",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--cv", type=float, action="append", help="repeatable; default 0, 0.5, 1")
    ap.add_argument("--step-cost-us", type=float, default=1000.0)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--envs", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--decisions", type=int, default=40, help="per window and env")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--base-share", type=float, default=0.25)
    ap.add_argument("--skip-tabletop", action="store_true")
    ap.add_argument("--min-batch", type=int, default=0, help="dynamic's rule (0: default)")
    ap.add_argument("--max-wait-us", type=float, default=0.0, help="dynamic's rule")
    ap.add_argument(
        "--against-simulation",
        action="store_true",
        help="toy only: each schedule beside its event simulation, dynamic at fixed caps",
    )
    ap.add_argument("--json", default="bench_results/scheduler.json")
    args = ap.parse_args(argv)
    toy = dict(state_dim=32, episode_len=400, step_cost_us=args.step_cost_us)
    env_ms = calibrate_env_ms(toy, args.chunk)
    stage = args.envs // 2
    stage_ms = env_ms * stage / args.workers  # one of two stages, spread over the workers
    latency = dict(
        base_ms=args.base_share * stage_ms, per_item_ms=(1 - args.base_share) * stage_ms / stage
    )
    print(
        f"{args.envs} envs, {args.workers} workers, chunks of {args.chunk}; one toy decision "
        f"= {env_ms:.2f} ms of CPU at CV 0, so one stage of {stage} envs steps in "
        f"{stage_ms:.1f} ms; L(B) = {latency['base_ms']:.1f} + {latency['per_item_ms']:.2f} "
        f"ms x B (L({stage}) = {latency['base_ms'] + latency['per_item_ms'] * stage:.1f} ms)\n"
    )
    results: dict = {"config": vars(args), "env_decision_ms": env_ms, "latency": latency}
    if args.against_simulation:
        for cv in args.cv or [0.0, 0.5, 1.0]:
            results[f"toy cv {cv}"] = against_simulation(cv, env_ms, toy, latency, args)
        return _save(results, args.json)
    for cv in args.cv or [0.0, 0.5, 1.0]:
        kw = dict(toy, step_cost_cv=cv)
        bound = ceiling(cv, env_ms, latency, args.envs, args.workers)
        results[f"toy cv {cv}"] = workload(
            f"toy, step cost CV {cv}", "toy", kw, toy["state_dim"], latency, args, bound
        )
    if not args.skip_tabletop:
        spec = envs.make("tabletop/pick-place", **PICK_PLACE).spec
        results["pick-place"] = workload(
            "tabletop/pick-place, one 64x64 camera, auto-reset every 40 steps (same L(B))",
            "tabletop/pick-place",
            PICK_PLACE,
            spec.obs["state"].shape[0],
            latency,
            args,
        )
    return _save(results, args.json)


def _save(results: dict, path: str) -> int:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"figures: {path}")
    return 0
