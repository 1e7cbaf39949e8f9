"""The machine's floor for one engine turn: parent -> N worker processes -> parent.

The same machinery as the engine (spawned processes, socket pairs, one 16-byte frame each
way, ``poll`` in the parent, blocking reads in the workers) with no work at all: what two
process wake-ups cost here. On a VM an idle vCPU's wake-up alone can take tens of
microseconds, so this is the number the engine's transport overhead is compared with.
"""

from __future__ import annotations

import os
import select
import socket
import statistics
import time
from collections.abc import Callable

FRAME = b"\0" * 16
WAKE_UPS = ("socket", "pipe", "eventfd")


def _echo(conn) -> None:
    fd = conn.fileno()
    while True:
        frame = os.read(fd, 16)
        if not frame:
            return
        os.write(fd, frame)


def _rounds(
    send: list[Callable[[], None]],
    fds: list[int],
    size: int,
    reps: int,
    busy_us: float,
) -> tuple[float, float]:
    """Median and p99 (us) of ``reps`` rounds: call every ``send``, then poll ``fds`` until
    each has delivered one ``size``-byte message; ``busy_us`` of spinning before each round."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    times = []
    for i in range(reps + reps // 10):  # the first tenth warms up
        busy_until = time.perf_counter_ns() + int(busy_us * 1000)
        while time.perf_counter_ns() < busy_until:
            pass
        t0 = time.perf_counter_ns()
        for wake in send:
            wake()
        need = set(fds)
        while need:
            for fd, _ in poller.poll():
                os.read(fd, size)
                need.discard(fd)
        if i >= reps // 10:
            times.append((time.perf_counter_ns() - t0) / 1e3)
    times.sort()
    return statistics.median(times), times[int(0.99 * (len(times) - 1))]


def wake_up_us(
    kind: str, num_workers: int, reps: int = 5000, busy_us: float = 0.0
) -> tuple[float, float]:
    """The round trip of :func:`round_trip_us` by another wake-up mechanism: ``"socket"`` (a
    socket pair, as the engine), ``"pipe"`` (two pipes) or ``"eventfd"`` (two eventfds, an
    8-byte counter each way instead of a frame). The echo processes are forked, for all
    three alike: they only read and write descriptors, and a descriptor crosses ``fork``
    as it is.

    Example:
        >>> {k: wake_up_us(k, 2)[0] for k in WAKE_UPS}   # median round trips, us
    """
    if kind not in WAKE_UPS:
        raise ValueError(f"wake-up {kind!r} is not one of {WAKE_UPS}")
    size = 8 if kind == "eventfd" else len(FRAME)
    message = (1).to_bytes(8, "little") if kind == "eventfd" else FRAME
    pids, keep, down, up = [], [], [], []
    try:
        for _ in range(num_workers):
            if kind == "socket":
                a, b = socket.socketpair()
                keep += [a, b]
                pair = (a.fileno(), b.fileno(), b.fileno(), a.fileno())
            elif kind == "pipe":
                (r1, w1), (r2, w2) = os.pipe(), os.pipe()
                keep += [r1, w1, r2, w2]
                pair = (w1, r1, w2, r2)
            else:
                e1, e2 = os.eventfd(0), os.eventfd(0)
                keep += [e1, e2]
                pair = (e1, e1, e2, e2)
            to_child, child_reads, child_writes, from_child = pair
            pid = os.fork()
            if pid == 0:  # the echo: read a message, send one back, until killed
                try:
                    while True:
                        os.read(child_reads, size)
                        os.write(child_writes, message)
                finally:
                    os._exit(0)  # never return into the parent's code
            pids.append(pid)
            down.append(to_child)
            up.append(from_child)
        send = [lambda fd=fd: os.write(fd, message) for fd in down]
        return _rounds(send, up, size, reps, busy_us)
    finally:
        for pid in pids:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        for k in keep:
            if isinstance(k, socket.socket):
                k.close()
            else:
                os.close(k)


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
        fds = [c.fileno() for c in conns]
        send = [lambda fd=fd: os.write(fd, FRAME) for fd in fds]
        return _rounds(send, fds, len(FRAME), reps, busy_us)
    finally:
        for c in conns:
            c.close()
        for p in procs:
            p.join(2)
