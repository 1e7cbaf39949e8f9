"""The Ray backend against the local one, on a loopback cluster of simulated nodes.

    python bench.py ray                    # every part
    python bench.py ray --part overhead    # what going through Ray costs per decision
    python bench.py ray --part channel     # a Ray call against a direct TCP channel

Parts:

- ``overhead``: lock-step turns of a zero-cost toy env and a zero-latency policy, 2 and 8
  envs, locally and through Ray (all workers on one node; one worker on each of 2 nodes),
  with state only and with a 128x128 camera: the loop's fixed cost per policy call and per
  env, which is what Ray adds to every decision.
- ``nodes``: CPU-heavy toy envs and ``LatencyPolicy``: 1 worker locally, 1 node and 2 nodes
  of one worker each through Ray (and 2 local workers), under lock-step, 2 stages and
  dynamic batching; each against the capacity planner's prediction with the backend's own
  measured loop cost (``bench.py capacity``'s model), so the planner is validated on 1 and 2
  simulated nodes too.
- ``channel``: what a direct channel could save. Round trips between the driver and an
  actor on another simulated node, a small request and a reply of a stage's observations
  (state only; with a 128x128 camera), as a Ray method call against the actor's own TCP
  connection on loopback, interleaved; medians.

Every simulated node is a raylet on this machine and binds 127.0.0.1. The nodes share this
machine's 2 cores with each other and with the inference loop: 2 nodes double the worker
processes, not the cores behind them once the loop needs one. What the figure shows is the
backend's cost and that stepping spreads over nodes; what it cannot show is the speed-up of
real extra machines, which the planner extrapolates (``bench.py capacity --part seed``).
"""

from __future__ import annotations

import dataclasses

from benchmarks import parts
from benchmarks.capacity import calibrate_loop, compare, loop_text
from benchmarks.ray_cluster import loopback_cluster

CAMERA = dict(cameras=("cam",), image_size=128)


BACKENDS = {  # the loop's configurations: 2 workers, locally, on one node, on two
    "local": {},
    "ray, 1 node": dict(backend="ray", workers_per_node=2),
    "ray, 2 nodes": dict(backend="ray", workers_per_node=1),
}


def overhead(args) -> dict:
    print(
        "overhead: lock-step turns, zero-cost toy env, zero-latency policy, chunks of "
        f"{args.chunk}; loop cost = a + b x envs (from 2 and 8 envs), medians of "
        f"{args.windows} windows of 200 decisions"
    )
    print(
        f"  {'2 workers':<16}{'obs':<14}{'per call ms':>12}{'per env ms':>12}{'turn @8 ms':>12}"
        f"{'CPU per call':>14}{'per env':>9}"
    )
    rows = []
    for obs, extra in (("state", {}), ("state+128px", CAMERA)):
        for label, kw in BACKENDS.items():
            c = calibrate_loop(args, extra, **kw)
            rows.append(dict(config=label, obs=obs, **dataclasses.asdict(c)))
            print(
                f"  {label:<16}{obs:<14}{c.call_ms:>12.3f}{c.env_ms:>12.3f}"
                f"{c.call_ms + 8 * c.env_ms:>12.3f}{c.cpu_call_ms:>14.3f}{c.cpu_env_ms:>9.3f}",
                flush=True,
            )
    base = {r["obs"]: r for r in rows if r["config"].startswith("local")}
    for r in rows:
        ref = base[r["obs"]]
        r["added_turn_ms_at_8"] = (r["call_ms"] + 8 * r["env_ms"]) - (
            ref["call_ms"] + 8 * ref["env_ms"]
        )
    for r in rows:
        if not r["config"].startswith("local"):
            print(
                f"  {r['config']} ({r['obs']}): +{r['added_turn_ms_at_8']:.3f} ms per "
                "lock-step turn of 8 envs against local"
            )
    return {"rows": rows}


def nodes(args) -> dict:
    from benchmarks.engine import calibrate_env_ms

    toy = dict(state_dim=16, episode_len=10_000, step_cost_us=args.step_cost_us)
    step_ms = calibrate_env_ms(toy, args.chunk) / args.chunk
    loops = {label: calibrate_loop(args, **kw) for label, kw in BACKENDS.items()}
    print(
        f"nodes: toy envs at {step_ms:.2f} ms per control step, chunks of {args.chunk}, "
        f"{args.envs} envs, LatencyPolicy L(B) = {args.base_ms} + {args.per_item_ms} ms x B; "
        "loop cost measured per backend:"
    )
    for label, loop in loops.items():
        print(f"    {label}: {loop_text(loop)}")
    configs = [
        ("local, 1 worker", 1, {}, loops["local"]),
        ("ray, 1 node x 1 worker", 1, BACKENDS["ray, 2 nodes"], loops["ray, 1 node"]),
        ("ray, 2 nodes x 1 worker", 2, BACKENDS["ray, 2 nodes"], loops["ray, 2 nodes"]),
        ("local, 2 workers", 2, {}, loops["local"]),
    ]
    rows = compare(args, step_ms, configs, schedules=("lock-step", "2-stage", "dynamic"))
    by = {(r["config"], r["schedule"]): r for r in rows}
    for schedule in ("lock-step", "2-stage", "dynamic"):
        one = by[("ray, 1 node x 1 worker", schedule)]
        two = by[("ray, 2 nodes x 1 worker", schedule)]
        print(
            f"  {schedule}: 2 nodes / 1 node = {two['measured'] / one['measured']:.2f}x measured, "
            f"{two['predicted'] / one['predicted']:.2f}x predicted; simulated GPU busy "
            f"{one['measured_gpu_busy']:.0%} -> {two['measured_gpu_busy']:.0%}"
        )
    return {
        "step_ms": step_ms,
        "loops": {k: dataclasses.asdict(v) for k, v in loops.items()},
        "rows": rows,
    }


class ChannelProbe:
    """A node-side actor that hands the driver ``n`` bytes two ways: as the result of a
    Ray method call (the object store, as the backend's replies travel), and over a TCP
    connection of its own on loopback (``multiprocessing.connection``: length-prefixed
    pickles), the direct channel the issue names as the alternative."""

    def reply(self, n: int):
        import numpy as np

        return np.zeros(n, np.uint8)

    def listen(self, authkey: bytes) -> tuple[str, int]:
        import threading
        from multiprocessing.connection import Listener

        self._listener = Listener(("127.0.0.1", 0), authkey=authkey)
        threading.Thread(target=self._serve, daemon=True).start()
        return self._listener.address

    def _serve(self) -> None:
        import numpy as np

        with self._listener.accept() as conn:
            while True:
                try:
                    n = conn.recv()
                except EOFError:
                    return
                conn.send(np.zeros(n, np.uint8))


def channel(args) -> dict:
    """Round trips to an actor on another simulated node: a Ray call against a direct TCP
    connection, for a state-only reply and one with a 128x128 camera per env."""
    import os
    import statistics
    import time
    from multiprocessing.connection import Client

    import ray

    probe = ray.remote(num_cpus=1, resources={"node1": 1})(ChannelProbe).remote()
    key = os.urandom(16)
    conn = Client(tuple(ray.get(probe.listen.remote(key))), authkey=key)
    sizes = {"state (8 envs x 16 floats)": 8 * 16 * 4, "+ 128x128 camera (8 envs)": 8 * 49_152}
    print(
        f"channel: driver <-> an actor on another simulated node, a small request and a reply "
        f"of n bytes; median round trip of {args.round_trips} (after 20 warm-up)"
    )
    print(f"  {'reply':<30}{'Ray call ms':>12}{'TCP ms':>10}{'Ray / TCP':>11}")
    rows = []
    for label, n in sizes.items():
        times = {"ray": [], "tcp": []}
        for i in range(20 + args.round_trips):
            t0 = time.perf_counter()
            ray.get(probe.reply.remote(n))
            t1 = time.perf_counter()
            conn.send(n)
            conn.recv()
            t2 = time.perf_counter()
            if i >= 20:  # interleaved, so both see the same machine load
                times["ray"].append(t1 - t0)
                times["tcp"].append(t2 - t1)
        ray_ms = 1e3 * statistics.median(times["ray"])
        tcp_ms = 1e3 * statistics.median(times["tcp"])
        rows.append(dict(reply=label, bytes=n, ray_ms=ray_ms, tcp_ms=tcp_ms))
        print(f"  {label:<30}{ray_ms:>12.3f}{tcp_ms:>10.3f}{ray_ms / tcp_ms:>10.1f}x")
    conn.close()
    ray.kill(probe)
    return {"rows": rows}


PARTS = {"overhead": overhead, "nodes": nodes, "channel": channel}


def main(argv: list[str] | None = None) -> int:
    ap = parts.parser("bench.py ray", __doc__, PARTS)
    ap.add_argument("--cpus-per-node", type=int, default=2, help="Ray CPUs of each node")
    ap.add_argument("--step-cost-us", type=float, default=1000.0)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--lookahead", type=int, default=2)
    ap.add_argument("--envs", type=int, default=8)
    ap.add_argument("--base-ms", type=float, default=6.0)
    ap.add_argument("--per-item-ms", type=float, default=1.0)
    ap.add_argument("--decisions", type=int, default=20, help="per window and env")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--round-trips", type=int, default=300, help="channel: per reply size")
    ap.add_argument("--json", default="bench_results/ray.json")
    args = ap.parse_args(argv)
    with loopback_cluster(nodes=2, cpus_per_node=args.cpus_per_node):
        return parts.run(args, PARTS)
