"""The machine's floor for one engine turn: parent -> N worker processes -> parent.

The same machinery as the engine (spawned processes, socket pairs, one 16-byte frame each
way, ``poll`` in the parent, blocking reads in the workers) with no work at all: what two
process wake-ups cost here. On a VM an idle vCPU's wake-up alone can take tens of
microseconds, so this is the number the engine's transport overhead is compared with.
"""

from __future__ import annotations

import os
import select
import statistics
import time

FRAME = b"\0" * 16


def _echo(conn) -> None:
    fd = conn.fileno()
    while True:
        frame = os.read(fd, 16)
        if not frame:
            return
        os.write(fd, frame)


def round_trip_us(num_workers: int, reps: int = 5000, busy_us: float = 0.0) -> tuple[float, float]:
    """Median and p99 round trip (us): one frame to every worker, one back from each.

    ``busy_us``: the parent computes this long before each round (as the engine's loop runs
    the policy), so the workers sit idle in between. An idle vCPU is parked by the host after
    a short while, and waking it again costs more than a wake-up straight after the last one.
    """
    import multiprocess as mp

    ctx = mp.get_context("spawn")
    conns, procs = [], []
    for _ in range(num_workers):
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_echo, args=(child,), daemon=True)
        proc.start()
        child.close()
        conns.append(parent)
        procs.append(proc)
    try:
        poller = select.poll()
        fds = [c.fileno() for c in conns]
        for fd in fds:
            poller.register(fd, select.POLLIN)
        times = []
        for i in range(reps + reps // 10):  # the first tenth warms up
            busy_until = time.perf_counter_ns() + int(busy_us * 1000)
            while time.perf_counter_ns() < busy_until:
                pass
            t0 = time.perf_counter_ns()
            for fd in fds:
                os.write(fd, FRAME)
            need = set(fds)
            while need:
                for fd, _ in poller.poll():
                    os.read(fd, 16)
                    need.discard(fd)
            if i >= reps // 10:
                times.append((time.perf_counter_ns() - t0) / 1e3)
    finally:
        for c in conns:
            c.close()
        for p in procs:
            p.join(2)
    times.sort()
    return statistics.median(times), times[int(0.99 * (len(times) - 1))]
