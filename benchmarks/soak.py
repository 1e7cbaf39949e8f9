"""Soak and chaos: hours-long behaviour in minutes.

    python bench.py soak --minutes 15 --chaos 30     # kill a random worker every 30 s
    python bench.py soak --minutes 5                 # the no-chaos reference

Two engines run side by side, calls alternating between them: the toy env with an image
camera (``LatencyPolicy``), and ``tabletop/pick-place`` with one 64x64 camera and the chunked
expert. Each engine alternates ``rollout`` and ``collect_episodes``. Every minute a line
reports the RSS of every process, open descriptors, /dev/shm entries, throughput and
restarts; at the end, growth after the first (warm-up) minute and the accounting of every
episode requested: each must come back complete, or as aborted decisions, never missing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import statistics
import threading
import time

import psutil
import torch

from pipeline import RolloutEngine
from pipeline.policies import ExpertPolicy, LatencyPolicy

TOY = dict(state_dim=16, cameras=("cam",), image_size=64, episode_len=40, step_cost_us=300)
PICK = dict(cameras=("head",), image_size=64)


def _engines(args) -> dict[str, RolloutEngine]:
    common = dict(num_envs=8, num_workers=2, num_stages=2, max_restarts=10_000, seed=0)
    common["spare_worker"] = False if args.no_spare else None  # None: the default, a spare
    return {
        "toy": RolloutEngine(
            "toy",
            LatencyPolicy(state_dim=16, chunk_len=8, base_ms=4, per_item_ms=0.5),
            env_kwargs=TOY,
            **common,
        ),
        "pick-place": RolloutEngine(
            "tabletop/pick-place",
            ExpertPolicy("tabletop/pick-place", chunk_len=8),
            env_kwargs=PICK,
            **common,
        ),
    }


class Chaos(threading.Thread):
    """SIGKILLs a random worker of a random engine every ``period_s``."""

    def __init__(self, engines: dict[str, RolloutEngine], period_s: float, seed: int) -> None:
        super().__init__(name="chaos", daemon=True)
        self.engines, self.period_s = engines, period_s
        self.rng = random.Random(seed)
        self.kills: list[tuple[float, str, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.period_s):
            name = self.rng.choice(sorted(self.engines))
            pids = self.engines[name].worker_pids()
            pid = self.rng.choice(pids)
            try:
                os.kill(pid, signal.SIGKILL)
                self.kills.append((time.time(), name, pid))
            except ProcessLookupError:
                pass  # replaced a moment ago

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def _processes(engines) -> list[psutil.Process]:
    pids = [os.getpid()] + [p for e in engines.values() for p in e.worker_pids()]
    return [psutil.Process(p) for p in pids]


def _sample(engines) -> dict:
    procs = _processes(engines)
    rss = {}
    for i, p in enumerate(procs):
        try:
            rss["parent" if i == 0 else f"worker {p.pid}"] = p.memory_info().rss
        except psutil.Error:
            pass
    parent = procs[0]
    return {
        "t": time.time(),
        "parent_rss": parent.memory_info().rss,
        "workers_rss": sum(v for k, v in rss.items() if k != "parent"),
        "max_worker_rss": max((v for k, v in rss.items() if k != "parent"), default=0),
        "parent_fds": parent.num_fds(),
        "shm_entries": len(os.listdir("/dev/shm")),
        "threads": parent.num_threads(),
    }


def _account(name: str, kind: str, td, totals: dict) -> None:
    """Tally what a call returned; raise if anything requested is missing."""
    t = totals.setdefault(name, dict(decisions=0, aborted=0, episodes=0, restarted=0, calls=0))
    t["calls"] += 1
    t["decisions"] += int(td["mask"].sum())
    t["aborted"] += int(td["aborted"].sum())
    if kind == "episodes":
        length = td["length"]
        done = td["next", "done"][torch.arange(len(length)), (length - 1).clamp(min=0), 0]
        if not bool(done.all()) or not bool((length > 0).all()):
            raise AssertionError(f"{name}: collect_episodes returned an unfinished episode")
        t["episodes"] += len(length)
        t["restarted"] += int(td["restarts"].sum())
    elif bool((td["mask"] & td["aborted"]).any()):
        raise AssertionError(f"{name}: an aborted decision is not masked")


def run(args) -> dict:
    torch.set_num_threads(1)
    print(f"soak: {args.minutes} min, chaos every {args.chaos or '-'} s, {os.cpu_count()} cores")
    engines = _engines(args)
    chaos = Chaos(engines, args.chaos, seed=0) if args.chaos else None
    totals: dict = {}
    minutes, samples = [], [_sample(engines)]
    t_start = time.monotonic()
    t_minute, last = t_start, dict(decisions=0, steps=0)
    steps = {name: 0 for name in engines}
    replace_s = {name: 0.0 for name in engines}  # the loop's time inside replacements
    replaced = {name: 0 for name in engines}  # and their number (failures keeps 1000 at most)
    if chaos:
        chaos.start()
    try:
        i = 0
        while time.monotonic() - t_start < args.minutes * 60:
            name = sorted(engines)[i % 2]
            e = engines[name]
            kind = "episodes" if (i // 2) % 2 else "rollout"
            e.stats.reset()
            td = e.collect_episodes(2, 4) if kind == "episodes" else e.rollout(12)
            steps[name] += e.stats.env_steps
            replace_s[name] += e.stats.replace_ns / 1e9
            replaced[name] += e.stats.restarts
            _account(name, kind, td, totals)
            i += 1
            now = time.monotonic()
            if now - t_minute >= 60:
                s = _sample(engines)
                decisions = sum(t["decisions"] for t in totals.values())
                env_steps = sum(steps.values())
                row = dict(
                    s,
                    minute=len(minutes) + 1,
                    decisions_per_s=(decisions - last["decisions"]) / (now - t_minute),
                    env_steps_per_s=(env_steps - last["steps"]) / (now - t_minute),
                    restarts=sum(e.stats.restarts for e in engines.values()),
                    kills=len(chaos.kills) if chaos else 0,
                )
                minutes.append(row)
                samples.append(s)
                last = dict(decisions=decisions, steps=env_steps)
                t_minute = now
                print(
                    f"  min {row['minute']:>3}: parent RSS {row['parent_rss'] / 2**20:7.1f} MiB, "
                    f"workers {row['workers_rss'] / 2**20:7.1f} MiB (max "
                    f"{row['max_worker_rss'] / 2**20:.1f}), fds {row['parent_fds']}, /dev/shm "
                    f"{row['shm_entries']}, {row['decisions_per_s']:.1f} decisions/s, "
                    f"{row['env_steps_per_s']:.0f} env steps/s, kills {row['kills']}",
                    flush=True,
                )
    finally:
        if chaos:
            chaos.stop()
        restarts = {n: len(e.failures) for n, e in engines.items()}
        spares = {n: e._pool.spares_used for n, e in engines.items()}
        for e in engines.values():
            e.close()
    res = _summary(args, minutes, samples, totals, restarts, chaos)
    res["replace_s"], res["replaced"], res["spares_used"] = replace_s, replaced, spares
    for name in engines:
        if replaced[name]:
            print(
                f"  {name}: {replace_s[name]:.1f} s inside {replaced[name]} replacements "
                f"({replace_s[name] / replaced[name]:.3f} s each), {spares[name]} by a spare"
            )
    return res


def _summary(args, minutes, samples, totals, restarts, chaos) -> dict:
    res = {"args": vars(args), "minutes": minutes, "totals": totals, "restarts": restarts}
    res["kills"] = len(chaos.kills) if chaos else 0
    if len(minutes) >= 2:
        warm = minutes[0]
        end = minutes[-1]
        res["parent_rss_growth"] = end["parent_rss"] / warm["parent_rss"] - 1
        res["max_worker_rss_growth"] = end["max_worker_rss"] / warm["max_worker_rss"] - 1
        res["fd_growth"] = end["parent_fds"] - warm["parent_fds"]
        res["shm_growth"] = end["shm_entries"] - samples[0]["shm_entries"]
        rates = [m["decisions_per_s"] for m in minutes[1:]]
        res["decisions_per_s_median"] = statistics.median(rates)
    print("\nsoak summary")
    for name, t in totals.items():
        print(
            f"  {name}: {t['calls']} calls, {t['decisions']} decisions kept, {t['aborted']} "
            f"aborted, {t['episodes']} episodes complete ({t['restarted']} re-run after a "
            f"fault), {restarts[name]} restarts; nothing missing"
        )
    if "parent_rss_growth" in res:
        print(
            f"  after the warm-up minute: parent RSS {res['parent_rss_growth']:+.2%}, largest "
            f"worker RSS {res['max_worker_rss_growth']:+.2%}, parent fds {res['fd_growth']:+d}, "
            f"/dev/shm entries {res['shm_growth']:+d}; median "
            f"{res['decisions_per_s_median']:.1f} decisions/s (minutes 2..{len(minutes)})"
        )
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench.py soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--chaos", type=float, default=0.0, help="kill a worker every N s (0: off)")
    ap.add_argument("--no-spare", action="store_true", help="replace workers cold")
    ap.add_argument("--out", default=None, help="JSON results (default bench_results/soak-*.json)")
    args = ap.parse_args(argv)
    res = run(args)
    out = args.out or os.path.join(
        "bench_results", f"soak-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    )
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1, default=float)
    print(f"wrote {out}")
    return 0
