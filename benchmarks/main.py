"""The main bench: the lock-step baseline against the pipelined engine, profiled.

Default workload: ``tabletop/pick-place`` with one 128x128 camera and TinyVLA-tiny on the best
available device, 16 envs on 2 workers. Each mode runs a warm-up, then alternates plain and
profiled measurement windows: figures are medians of the plain windows (with their spread),
the per-phase breakdown and utilisation come from the last profiled window, and the
profiler's overhead is the ratio of the two medians.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch

import envs
from pipeline import RolloutEngine
from pipeline.policies import ExpertPolicy, LatencyPolicy, TinyVLA


def make_policy(name: str, spec, chunk: int, device: torch.device):
    """``tiny-vla``, ``tiny-vla-base``, ``expert`` or ``latency:BASE_MS,PER_ITEM_MS``."""
    torch.manual_seed(0)
    if name in ("tiny-vla", "tiny-vla-base"):
        size = "base" if name.endswith("base") else "tiny"
        return TinyVLA.from_spec(spec, chunk_len=chunk, size=size).eval().to(device)
    if name == "expert":
        return ExpertPolicy(spec.name, chunk_len=chunk)
    if name.startswith("latency:"):
        try:
            base, per_item = (float(x) for x in name.split(":", 1)[1].split(","))
        except ValueError:
            raise SystemExit(f"--policy {name!r}: use latency:BASE_MS,PER_ITEM_MS") from None
        return LatencyPolicy(spec.state_dim, spec.action_dim, chunk, base, per_item)
    raise SystemExit(f"--policy {name!r}: choose tiny-vla, tiny-vla-base, expert, latency:B,P")


def parse_mode(mode: str, stages: int) -> tuple[str, int, str]:
    """``sync1`` (lock-step baseline), ``sync`` or ``pipelined`` (with ``--stages``), or
    ``dynamic`` (first-ready dynamic batching)."""
    if mode == "sync1":
        return "sync", 1, "sync, 1 stage (lock-step)"
    if mode in ("sync", "pipelined"):
        return mode, stages, f"{mode}, {stages} stages"
    if mode == "dynamic":
        return "dynamic", 0, "dynamic batching"
    raise SystemExit(f"--modes: unknown mode {mode!r} (sync1, sync, pipelined, dynamic)")


def env_kwargs(args) -> dict:
    """``--env-kwargs``, or the env's default: one 128x128 camera (``head`` on the tabletop
    tasks, ``agentview`` on robosuite), none elsewhere."""
    if args.env_kwargs:
        return json.loads(args.env_kwargs)
    if args.env.startswith("tabletop/"):
        return {"cameras": ["head"], "image_size": 128}
    if args.env.startswith("robosuite/"):
        return {"cameras": ["agentview"], "image_size": 128}
    return {}


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_mode(args, spec, policy, mode: str, stages: int, label: str, out_dir: str | None) -> dict:
    """Start an engine, warm it up, measure plain and profiled windows."""
    t_start = time.perf_counter()
    kwargs = env_kwargs(args)
    schedule = dict(schedule="dynamic") if mode == "dynamic" else dict(mode=mode, num_stages=stages)
    engine = RolloutEngine(
        args.env,
        policy,
        num_envs=args.num_envs,
        num_workers=args.workers,
        **schedule,
        env_kwargs=kwargs,
        device=args.device,
        chunk_len=args.chunk,
        exec_len=args.exec,
        seed=0,
        pin_workers=args.pin_workers,
    )
    with engine:
        _say(f"  {label}: engine up in {time.perf_counter() - t_start:.1f} s; warming up")
        decisions = args.decisions
        if args.seconds:  # size the windows from a timed warm-up
            t0 = time.perf_counter()
            engine.rollout(4)
            per = (time.perf_counter() - t0) / 4
            decisions = max(2, int(args.seconds / args.windows / 2 / per))
        else:
            engine.rollout(max(2, decisions // 2))
        plain, profiled, summaries, report = [], [], [], None
        for w in range(args.windows):
            engine.stats.reset()
            t0 = time.perf_counter()
            engine.rollout(decisions)
            wall = time.perf_counter() - t0
            plain.append(
                {
                    "wall_s": wall,
                    "decisions_per_s": engine.stats.decisions / wall,
                    "env_steps_per_s": engine.stats.env_steps / wall,
                }
            )
            if args.profile:
                engine.stats.reset()
                t0 = time.perf_counter()
                with engine.profile() as prof:
                    engine.rollout(decisions)
                wall = time.perf_counter() - t0
                profiled.append(engine.stats.decisions / wall)
                report = prof.report()
                summaries.append(report.summary)
            _say(
                f"  {label}: window {w + 1}/{args.windows}: "
                f"{plain[-1]['decisions_per_s']:.1f} decisions/s"
            )
    res = {
        "label": label,
        "mode": mode,
        "stages": stages,
        "decisions_per_window": decisions,
        "windows": plain,
    }
    for key in ("decisions_per_s", "env_steps_per_s"):
        vals = [p[key] for p in plain]
        res[key] = statistics.median(vals)
        res[key + "_spread"] = [min(vals), max(vals)]
    if report is not None:
        res["profiled_decisions_per_s"] = statistics.median(profiled)
        res["profiler_overhead"] = 1 - res["profiled_decisions_per_s"] / res["decisions_per_s"]
        res["summary"] = dict(report.summary)
        # Utilisation and efficiency: medians over every profiled window, with their spread.
        for key in ("cpu_utilization", "gpu_utilization", "overlap_efficiency"):
            vals = [s[key] for s in summaries if s.get(key) is not None]
            if vals:
                res["summary"][key] = statistics.median(vals)
                res["summary"][key + "_spread"] = [min(vals), max(vals)]
        res["table"] = report.table()
        if out_dir:
            res["files"] = report.save(
                os.path.join(out_dir, label.split(",")[0] + f"_{stages}stage")
            )
    return res


def side_by_side(rows: list[dict]) -> str:
    base = rows[0]["decisions_per_s"]
    width = max(28, *(len(r["label"]) + 2 for r in rows))
    head = f"{'':<24}" + "".join(f"{r['label']:>{width}}" for r in rows)

    def line(name, fn):
        return f"{name:<24}" + "".join(f"{fn(r):>{width}}" for r in rows)

    def pct(v):
        return "n/a" if v is None else f"{v:.0%}"

    def spread(r, key):
        lo, hi = r[key + "_spread"]
        return f"{r[key]:.1f} [{lo:.0f}-{hi:.0f}]"

    lines = [
        head,
        line("env steps/s", lambda r: spread(r, "env_steps_per_s")),
        line("decisions/s", lambda r: spread(r, "decisions_per_s")),
        line("speed-up over first", lambda r: f"{r['decisions_per_s'] / base:.2f}x"),
    ]
    if any("summary" in r for r in rows):

        def stat(key: str, suffix: str = ""):
            def fmt(r) -> str:
                s = r.get("summary")
                if s is None:
                    return "not profiled"
                lo_hi = s.get(key + "_spread")
                spread = f" [{lo_hi[0]:.0%}-{lo_hi[1]:.0%}]" if lo_hi else ""
                sim = suffix if "simulated" in s.get("gpu_source", "") else ""
                return pct(s.get(key)) + spread + sim

            return fmt

        lines += [
            line("GPU utilization", stat("gpu_utilization", " sim")),
            line("CPU utilization", stat("cpu_utilization")),
            line("overlap efficiency", stat("overlap_efficiency")),
            line(
                "profiler overhead",
                lambda r: f"{r['profiler_overhead']:+.1%}" if "summary" in r else "-",
            ),
        ]
    return "\n".join(lines)


def sweep(args, spec, out_dir) -> list[dict]:
    """``--sweep stages=1,2,4`` or ``--sweep num_envs=8,16,32``: one pipelined row each."""
    key, _, values = args.sweep.partition("=")
    if key not in ("stages", "num_envs") or not values:
        raise SystemExit("--sweep: use stages=1,2,3,4 or num_envs=8,16,32")
    rows = []
    for v in (int(x) for x in values.split(",")):
        if key == "stages":
            args_v = argparse.Namespace(**{**vars(args)})
            stages = v
        else:
            args_v = argparse.Namespace(**{**vars(args), "num_envs": v})
            stages = args.stages
        policy = make_policy(args.policy, spec, args.chunk, resolve_device(args.device))
        label = f"pipelined, {stages} stages, {args_v.num_envs} envs"
        _say(f"sweep {key}={v}")
        row = run_mode(args_v, spec, policy, "pipelined", stages, label, None)
        row["setting"] = {key: v}
        rows.append(row)
    base = rows[0]["decisions_per_s"]
    _say(
        f"\n{'setting':<22}{'decisions/s':>14}{'env steps/s':>13}{'speed-up':>10}"
        f"{'GPU':>8}{'CPU':>8}{'overlap eff':>13}"
    )
    for r in rows:
        s = r.get("summary", {})
        gpu = s.get("gpu_utilization")
        _say(
            f"{key}={list(r['setting'].values())[0]:<15}{r['decisions_per_s']:>14.1f}{r['env_steps_per_s']:>13.0f}"
            f"{r['decisions_per_s'] / base:>9.2f}x{'n/a' if gpu is None else f'{gpu:.0%}':>8}"
            f"{s.get('cpu_utilization', float('nan')):>8.0%}"
            f"{s.get('overlap_efficiency') or float('nan'):>13.0%}"
        )
    return rows


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--env", default="tabletop/pick-place")
    ap.add_argument(
        "--env-kwargs",
        default=None,
        help="JSON (default: one 128x128 camera on tabletop and robosuite tasks)",
    )
    ap.add_argument("--num-envs", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--stages", type=int, default=2, help="stages of the pipelined mode")
    ap.add_argument("--chunk", type=int, default=8, help="action chunk length")
    ap.add_argument(
        "--exec", type=int, default=None, help="actions executed per chunk (default: all)"
    )
    ap.add_argument(
        "--policy",
        default="tiny-vla",
        help="tiny-vla, tiny-vla-base, expert, latency:BASE_MS,PER_ITEM_MS",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--pin-workers", action="store_true", help="pin each worker to a core")
    ap.add_argument("--decisions", type=int, default=8, help="decisions per env per window")
    ap.add_argument(
        "--seconds", type=float, default=None, help="size windows to about this much time per mode"
    )
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument(
        "--modes", default="sync1,pipelined", help="comma list of sync1, sync, pipelined, dynamic"
    )
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default=None, help="default: bench_results/<timestamp>/")
    ap.add_argument("--sweep", default=None, help="stages=1,2,3,4 or num_envs=8,16,32")
    ap.add_argument("--compare", choices=("gymnasium",), default=None)
    ap.add_argument(
        "--transport",
        action="store_true",
        help="instead: what moving observations costs (zero-cost env; benchmarks/transport.py)",
    )
    args = ap.parse_args(argv)
    if args.transport:
        from benchmarks import transport

        if args.compare == "gymnasium":
            _need_gymnasium()
        results = transport.run(args.compare == "gymnasium")
        os.makedirs("bench_results", exist_ok=True)
        with open(os.path.join("bench_results", "transport.json"), "w") as f:
            json.dump(results, f, indent=1, default=float)
        return 0
    out_dir = args.out or os.path.join(
        "bench_results", datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    )
    os.makedirs(out_dir, exist_ok=True)
    kwargs = env_kwargs(args)
    probe = envs.make(args.env, **kwargs)
    spec = probe.spec
    probe.close()
    device = resolve_device(args.device)
    torch.set_num_threads(1)  # the inference process shares the machine with the workers
    _say(
        f"bench: {args.env} {kwargs}, {args.num_envs} envs, {args.workers} workers, policy "
        f"{args.policy} on {device}, chunk {args.chunk}; {args.windows} windows x "
        f"{args.decisions if not args.seconds else '~' + str(args.seconds) + ' s'}; out {out_dir}"
    )
    results: dict = {"args": vars(args), "device": str(device), "cpus": os.cpu_count()}
    if args.sweep:
        results["sweep"] = sweep(args, spec, out_dir)
    else:
        rows = []
        for m in args.modes.split(","):
            mode, stages, label = parse_mode(m.strip(), args.stages)
            policy = make_policy(args.policy, spec, args.chunk, device)
            rows.append(run_mode(args, spec, policy, mode, stages, label, out_dir))
        if args.compare == "gymnasium":
            _need_gymnasium()
            from benchmarks.gym_compare import run_gymnasium

            rows.append(
                run_gymnasium(
                    args, spec, make_policy(args.policy, spec, args.chunk, device), device
                )
            )
        results["modes"] = rows
        _say("\n" + side_by_side(rows))
        for r in rows:
            if "table" in r:
                _say(f"\n[{r['label']}] per-phase breakdown (profiled window)\n{r['table']}")
        _write_index(out_dir, rows)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    _say(f"\nwrote {out_dir}/results.json" + ("" if args.sweep else f", {out_dir}/report.html"))
    return 0


def _need_gymnasium() -> None:
    try:
        import gymnasium  # noqa: F401
    except ImportError:
        raise SystemExit(
            "--compare gymnasium needs Gymnasium: pip install -e '.[gymnasium]'"
        ) from None


def _write_index(out_dir: str, rows: list[dict]) -> None:
    """One page comparing the modes, with each mode's timeline."""
    import base64
    import html

    parts = [f"<pre>{html.escape(side_by_side(rows))}</pre>"]
    for r in rows:
        files = r.get("files")
        if not files:
            continue
        png = base64.b64encode(open(files["png"], "rb").read()).decode("ascii")
        parts.append(
            f"<h2>{html.escape(r['label'])}</h2>"
            f"<img style='max-width:100%' src='data:image/png;base64,{png}'>"
        )
        parts.append(f"<pre>{html.escape(r['table'])}</pre>")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>bench</title></head>"
        "<body style='font-family:sans-serif'><h1>Rollout bench</h1>"
        + "".join(parts)
        + "</body></html>"
    )
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write(page)
