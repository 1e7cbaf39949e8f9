"""The worker pool: the parent's half of :mod:`pipeline.runtime.protocol`.

It spawns the env worker processes, runs the start-up hand-shake, owns the shared segment,
waits on every worker's pipe and process sentinel in one poll set, reads replies into
per-worker inboxes, and shuts everything down. It knows nothing of stages, plans or policies:
the engine says which workers to wait for and what reply it expects.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from envs.spec import EnvSpec
from pipeline.backends.base import PoolBase
from pipeline.backends.budget import RestartBudget
from pipeline.backends.processes import (
    exit_status,
    sched_getcpu,
    shutdown,
    without_main,
    worker_environ,
)
from pipeline.errors import (
    EngineError,
    EngineTimeout,
    EnvError,
    ProtocolError,
    WorkerDiedError,
    WorkerStuckError,
)
from pipeline.runtime import protocol as P
from pipeline.runtime.layout import Layout, SharedBuffers
from pipeline.runtime.process import set_scheduler, spare_main, worker_main
from pipeline.runtime.spans import SpanRing
from pipeline.runtime.stacks import dump_stacks, own_stacks
from pipeline.runtime.worker import SpareConfig

_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
SPIN_S = 100e-6  # how long the loop polls without sleeping before it blocks (_spin)
SPIN_MISSES = 8  # spins in a row that found nothing, after which it spins once in 16


@dataclass
class _Spare:
    """The process started ahead of need, and whether it has said READY."""

    proc: Any
    conn: Any
    ready: bool = False


class WorkerPool(PoolBase):
    """``num_workers`` env worker processes around one shared segment.

    Example:
        >>> pool = WorkerPool("toy", {}, env_ids=[[0, 2], [1, 3]],
        ...                   env_stages=[(0,), (1,), (0,), (1,)], auto_reset=True, env_name="toy")
        >>> spec = pool.start(lambda spec: Layout(spec, 4, 8, 2), start_timeout_s=60)
        >>> pool.send(0, [P.Frame(P.RESET, stage=0, slot=1, seq=1)], "resetting")
        >>> pool.close()
    """

    def __init__(
        self,
        env: str | Callable[..., Any],
        env_kwargs: dict,
        *,
        env_ids: list[list[int]],
        env_stages: list[tuple[int, ...]],
        auto_reset: bool,
        env_name: str,
        pin_workers: bool = False,
        profile: bool = False,
        max_restarts: int = 0,
        workers: list[int] | None = None,
        spare: bool = False,
    ) -> None:
        self.env, self.env_kwargs, self.env_name = env, env_kwargs, env_name
        self.budget = RestartBudget(max_restarts, len(env_ids))
        self.env_ids, self.env_stages, self.auto_reset = env_ids, env_stages, auto_reset
        self.num_workers = len(env_ids)
        # The workers this pool runs (global ids): all of them, or one node's share when a
        # node of the Ray backend runs its part of the engine's workers.
        self.local = list(range(self.num_workers)) if workers is None else list(workers)
        self.profile = profile
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.worker_cpu = (
            {w: cpus[i % len(cpus)] for i, w in enumerate(self.local)}
            if pin_workers and cpus
            else None
        )
        self.procs: list = [None] * self.num_workers
        self.conns: list = [None] * self.num_workers
        self.shm: SharedBuffers | None = None
        self.spec: EnvSpec | None = None
        # One poll set for the life of the pool: every worker's socket and sentinel. Whatever
        # frame arrives is read at once into that worker's inbox, where the engine picks the
        # reply it waits for by stage and sequence number; the set changes only when a
        # worker is replaced.
        self._poller = select.poll()
        self.inbox: list[deque] = [deque() for _ in range(self.num_workers)]
        # Per worker, the commands sent whose replies are not read yet: a worker that owes
        # none is asleep, its core free for the loop to spin on (_spin).
        self.owed = [0] * self.num_workers
        self._spins = self._spin_misses = 0
        # wait_any's watchdog, kept across waits: per worker, its progress count and when it
        # last changed (or the worker last replied).
        self._watch: dict[int, tuple[int, float]] = {}
        self._fd_owner: dict[int, tuple[str, int]] = {}
        # A process started ahead of need (runtime/process.py: spare_main): a replacement
        # takes it, so the loop waits for an attach, not for a
        # Python start-up, imports and env creation; the next one starts in the background.
        self.spare_wanted = spare
        self._spare: _Spare | None = None
        self._ready_due: set[int] = set()  # workers, once spares, whose READY is still to come
        self.spares_used = self.prebuilt_envs_used = 0

    # -- start-up ----------------------------------------------------------------------------
    def start(self, make_layout: Callable[[EnvSpec], Layout], start_timeout_s: float) -> EnvSpec:
        """Spawn every worker, agree on the spec, create the shared segment and attach every
        worker to it. On failure, the healthy workers are told to CLOSE and everything is
        released before the error propagates."""
        spec = self.spawn_all(start_timeout_s)
        self.attach_all(make_layout(spec), start_timeout_s)
        return spec

    def spawn_all(self, start_timeout_s: float) -> EnvSpec:
        """Start-up, first half: spawn every worker and agree on the env spec."""
        try:
            for w in self.local:
                self._spawn(w)
            specs = [self._hello_or_replace(w, start_timeout_s) for w in self.local]
            if any(repr(s) != repr(specs[0]) for s in specs):
                raise EngineError(f"workers disagree on the env spec: {specs}")
        except BaseException:
            self.close()
            raise
        self.spec = specs[0]
        return self.spec

    def attach_all(self, layout: Layout, start_timeout_s: float) -> None:
        """Start-up, second half: create the shared segment and attach every worker."""
        try:
            self.layout = layout
            self.shm = SharedBuffers.create(layout)
            if self.profile:  # on before the workers serve, so their clocks run from the start
                self.shm.arrays["profile_on"][0] = 1
            for w in self.local:
                self._attach(w, start_timeout_s)
            if self.spare_wanted:
                self._spawn_spare()
        except BaseException:
            self.close()
            raise

    def _spawn(self, w: int) -> None:
        import multiprocess as mp

        # spawn: never fork a parent that may hold CUDA state or torch threads.
        ctx = mp.get_context("spawn")
        cfg = self.worker_config(w, self.worker_cpu[w] if self.worker_cpu else None)
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=worker_main, args=(cfg, child_conn), name=f"rollout-worker-{w}", daemon=True
        )
        with worker_environ(), without_main(self.env):
            proc.start()
        child_conn.close()
        self.procs[w], self.conns[w] = proc, parent_conn

    def _spawn_spare(self) -> None:
        import multiprocess as mp

        ctx = mp.get_context("spawn")
        cfg = SpareConfig(
            env_fn=self.env,
            env_kwargs=self.env_kwargs,
            num_envs=max(len(ids) for ids in self.env_ids),
            parent_pid=os.getpid(),
        )
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=spare_main, args=(cfg, child_conn), name="rollout-spare")
        proc.daemon = True
        with worker_environ(), without_main(self.env):
            proc.start()
        child_conn.close()
        self._spare = _Spare(proc, parent_conn)

    def wait_spare(self, timeout: float) -> bool:
        """Wait until the spare has prepared (its envs built); False when there is none, or
        it is not ready within ``timeout`` seconds.

        Example:
            >>> pool.wait_spare(60.0)  # a replacement from now on needs only an attach
            True
        """
        spare = self._spare
        if spare is None:
            return False
        if not spare.ready and spare.conn.poll(timeout):
            try:
                frame = P.recv(spare.conn)
            except (EOFError, OSError):
                return False  # it died: a replacement finds out and spawns cold
            if frame.kind != P.READY:
                raise ProtocolError(f"the spare: expected READY, got {frame}")
            spare.ready = True
        return spare.ready

    def _assign_spare(self, w: int) -> bool:
        """Make the spare worker ``w`` (it goes on with the hand-shake); False when there is
        none, or it is gone."""
        if self._spare is None:
            return False
        spare, self._spare = self._spare, None
        proc, conn = spare.proc, spare.conn
        # Still preparing (an import cannot be interrupted): at normal priority now, every
        # thread; where not permitted, the spare's own switch on ASSIGN does it.
        if hasattr(os, "SCHED_OTHER"):
            set_scheduler(os.SCHED_OTHER, proc.pid)
        try:
            P.send(conn, P.Frame(P.ASSIGN))
            conn.send(self.worker_config(w, self.worker_cpu[w] if self.worker_cpu else None))
        except OSError:
            shutdown([proc], [conn], None)
            proc.close()
            return False
        self.procs[w], self.conns[w] = proc, conn
        if not spare.ready:
            self._ready_due.add(w)
        self.spares_used += 1
        return True

    def _hello(self, w: int, timeout: float) -> EnvSpec:
        if w in self._ready_due:  # a spare assigned before it said READY says it first
            self._ready_due.discard(w)
            self._expect(w, P.READY, timeout, "preparing as a spare")
        hello = self._expect(w, P.HELLO, timeout, "creating its envs")
        self.prebuilt_envs_used += hello.stage
        return self.conns[w].recv()

    def _hello_or_replace(self, w: int, timeout: float) -> EnvSpec:
        """The HELLO of worker ``w``; a worker whose envs fail to start is replaced while the
        restart budget lasts."""
        while True:
            try:
                return self._hello(w, timeout)
            except (EnvError, WorkerDiedError) as exc:
                self._account(w, exc)
                self._kill(w)
                self._spawn(w)

    def _attach(self, w: int, timeout: float) -> None:
        lay = self.layout
        P.send_attach(self.conns[w], self.shm.fd, lay.num_envs, lay.chunk_len, self.num_workers)
        self._expect(w, P.ATTACHED, timeout, "attaching shared memory")
        conn, proc = self.conns[w], self.procs[w]
        self._poller.register(conn.fileno(), select.POLLIN)
        self._poller.register(proc.sentinel, select.POLLIN)
        self._fd_owner[conn.fileno()] = ("conn", w)
        self._fd_owner[proc.sentinel] = ("sentinel", w)

    def _expect(self, w: int, kind: int, timeout: float, doing: str) -> P.Frame:
        from multiprocess.connection import wait

        conn, proc = self.conns[w], self.procs[w]
        ready = wait([conn, proc.sentinel], timeout)
        if conn in ready:
            try:
                frame = P.recv(conn)
            except (EOFError, OSError):
                raise WorkerDiedError(
                    self.death(w, doing) + ". Workers are spawned: a script that creates the "
                    "engine at import time must guard it with `if __name__ == '__main__':`",
                    worker=w,
                ) from None
            if frame.kind == P.ERROR:
                raise conn.recv().to_error(self.env_name)
            if frame.kind != kind:
                raise ProtocolError(f"worker {w}: expected {P.NAMES[kind]}, got {frame}")
            return frame
        if proc.sentinel in ready:
            raise WorkerDiedError(self.death(w, doing), worker=w)
        raise EngineTimeout(f"worker {w} did not finish {doing} within {timeout:.0f} s", worker=w)

    # -- running -----------------------------------------------------------------------------
    def pids(self) -> list[int]:
        return [self.procs[w].pid for w in self.local]

    def local_pids(self) -> list[int | None]:
        """Per worker, its pid where this machine's psutil can watch it: all of them here."""
        return self.pids()

    def placement(self) -> list[dict]:
        """Where the workers run: one node, this machine."""
        return [{"node": 0, "address": "local", "workers": list(self.local), "pids": self.pids()}]

    def death(self, w: int, doing: str) -> str:
        """How worker ``w`` died, for an error message. Called once its pipe is closed or its
        sentinel fired; a killed process closes its pipe before it becomes a zombie, so this
        waits up to 2 s for the exit status (at once when it is already there)."""
        proc = self.procs[w]
        code = exit_status(proc, 2.0)
        how = f"exit code {code}"
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                how = f"signal {signal.Signals(-code).name}"
        return f"worker {w} (pid {proc.pid}) died ({how}) while {doing}"

    def send(self, w: int, frames: list[P.Frame], doing: str) -> None:
        """Send ``frames`` to worker ``w``, in one write."""
        self.owed[w] += len(frames)
        try:
            if len(frames) == 1:
                P.send(self.conns[w], frames[0])
            else:
                P.send_many(self.conns[w], frames)
        except OSError:  # BrokenPipeError: the worker is gone
            raise WorkerDiedError(self.death(w, doing), worker=w) from None

    def send_all(self, frames: dict[int, list[P.Frame]], doing: str) -> EngineError | None:
        """Send each worker its frames (one write each). A worker that is gone does not stop
        the others from getting theirs (a recovery relies on every healthy worker having its
        commands): its error is returned, not raised."""
        failed = None
        for w in self.wake_order(list(frames)):
            try:
                self.send(w, frames[w], doing)
            except EngineError as exc:
                failed = failed or exc
        return failed

    def wake_order(self, workers: list[int]) -> list[int]:
        """Wake the workers on other cores first: a worker woken on this process's core may
        preempt it before it has woken the rest, which serialises the workers."""
        if self.worker_cpu is None or sched_getcpu is None:
            return workers
        here = sched_getcpu()
        return sorted(workers, key=lambda w: self.worker_cpu[w] == here)

    def read_frame(self, w: int, doing: str) -> P.Frame:
        try:
            frame = P.recv(self.conns[w])
        except (EOFError, OSError):
            raise WorkerDiedError(self.death(w, doing), worker=w) from None
        if frame.kind == P.ERROR:
            raise self.conns[w].recv().to_error(self.env_name)
        if frame.kind != P.DONE:
            raise ProtocolError(f"worker {w}: expected DONE or ERROR, got {frame}")
        self.owed[w] -= 1
        return frame

    def drain(self, doing: str) -> None:
        """Read every reply already waiting into the inboxes (never blocks); a worker may
        have several waiting (one per env of a dynamic batch)."""
        while True:
            read = False
            for fd, _ in self._poller.poll(0):
                what, w = self._fd_owner[fd]
                if what == "conn":
                    self.inbox[w].append(self.read_frame(w, doing))
                    read = True
            if not read:
                return

    def ready(self, workers: list[int], match: Callable[[tuple], bool], doing: str) -> bool:
        """Whether each of ``workers`` has a reply that ``match`` accepts (never blocks)."""
        self.drain(doing)
        return all(any(match(f) for f in self.inbox[w]) for w in workers)

    def collect(
        self,
        workers: list[int],
        match: Callable[[tuple], bool],
        hang_timeout: float,
        doing: str,
    ) -> None:
        """Block (in poll, burning no CPU) until each of ``workers`` has sent the reply that
        ``match`` accepts, and take those replies; replies to other commands (another
        stage's) stay in the inbox.

        The watchdog: a worker whose progress counter has not moved for ``hang_timeout``
        seconds is stuck (:class:`WorkerStuckError`, with its live stack); one whose counter
        moves is only slow and is waited for.
        """
        # Replies wait in the inboxes until every one is in, so a failure half-way leaves
        # the healthy workers' replies where a recovery finds them.
        progress = self.shm.arrays["progress"]
        now = time.monotonic()
        seen = {w: (int(progress[w]), now) for w in workers}
        period_ms = max(1, int(min(1.0, hang_timeout / 4) * 1000))
        while True:
            need = [w for w in workers if not any(match(f) for f in self.inbox[w])]
            if not need:
                break
            events = self._spin() or self._poller.poll(period_ms)
            if events:
                self._read_events(events, doing)
            else:
                self._watchdog(need, seen, hang_timeout, doing)
        for w in workers:
            box = self.inbox[w]
            box.remove(next(f for f in box if match(f)))
            self.budget.served(w)  # it served a command: not a deterministic failure

    def _spin(self) -> list:
        """Poll without sleeping for up to ``SPIN_S`` while a core is free of workers, and
        return what came (nothing: block as before).

        A reply that finds the loop asleep costs twice: the worker's write wakes a halted
        core (a median 32 us on the project's KVM machine, against 12 us when the loop
        spins), and the loop takes about as long again to run. Lock-step waits for its last
        workers with the others asleep, so their cores are free; spinning there costs no
        worker any time.
        The bound is about one sleep and wake-up, so a wait that outlasts it costs at most
        twice what blocking at once would (a spin-then-block lock's rule). After
        ``SPIN_MISSES`` spins in a row that found nothing (envs slower than the bound), it
        spins once in 16 only, until one finds its reply: spinning then mostly burns a core
        that another process on a shared machine could use."""
        if sum(1 for n in self.owed if n) >= _CPUS:
            return []
        self._spins += 1
        if self._spin_misses >= SPIN_MISSES and self._spins % 16:
            return []
        poll, end = self._poller.poll, time.perf_counter() + SPIN_S
        while True:
            events = poll(0)
            if events or time.perf_counter() >= end:
                self._spin_misses = 0 if events else self._spin_misses + 1
                return events

    def wait_any(
        self, workers: list[int], timeout: float | None, hang_timeout: float, doing: str
    ) -> None:
        """Read every reply already in; if none of ``workers`` has one, block (in poll,
        burning no CPU) until one arrives or ``timeout`` seconds pass (``None``: no limit).

        The watchdog is :meth:`collect`'s, kept across calls, so a worker that stands still
        is found even while the others keep replying and every single wait is short.
        """
        self.drain(doing)
        progress = self.shm.arrays["progress"]
        now = time.monotonic()
        watch = self._watch
        for w in list(watch):
            if w not in workers:
                del watch[w]
        for w in workers:
            if self.inbox[w] or w not in watch:  # it replied, or it just got work
                watch[w] = (int(progress[w]), now)
        self._watchdog(workers, watch, hang_timeout, doing)
        if timeout == 0 or any(self.inbox[w] for w in workers):
            return
        deadline = None if timeout is None else now + timeout
        period = min(1.0, hang_timeout / 4)
        while not any(self.inbox[w] for w in workers):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            wait = period if deadline is None else min(period, deadline - now)
            events = self._poller.poll(max(0, math.ceil(wait * 1000)))
            if events:
                self._read_events(events, doing)
            else:
                self._watchdog(workers, watch, hang_timeout, doing)
        now = time.monotonic()
        for w in workers:
            if self.inbox[w]:
                watch[w] = (int(progress[w]), now)

    def _read_events(self, events: list, doing: str) -> None:
        """Read the frame behind each readable socket into its worker's inbox; a fired
        sentinel (a dead worker) raises, after any reply it sent before dying is read."""
        died = None
        for fd, _ in events:
            what, w = self._fd_owner[fd]
            if what == "sentinel":
                died = w
            else:
                self.inbox[w].append(self.read_frame(w, doing))
        if died is not None:
            raise WorkerDiedError(self.death(died, doing), worker=died)

    def _watchdog(self, workers: list[int], seen: dict, hang_timeout: float, doing: str) -> None:
        """Note which workers' progress counters moved (``seen``: count and since when);
        raise for one that stood still for ``hang_timeout`` seconds."""
        progress, now = self.shm.arrays["progress"], time.monotonic()
        for w in workers:
            count, since = seen[w]
            if int(progress[w]) != count:
                seen[w] = (int(progress[w]), now)
            elif now - since >= hang_timeout:
                raise self._stuck(w, count, now - since, doing)

    def _stuck(self, w: int, count: int, idle_s: float, doing: str) -> WorkerStuckError:
        pid = self.procs[w].pid
        return WorkerStuckError(
            f"worker {w} (pid {pid}, envs {self.env_ids[w]}) is stuck: its progress counter "
            f"stayed at {count} for {idle_s:.1f} s while {doing}\n"
            f"--- worker {w} stack (py-spy dump) ---\n{dump_stacks(pid)}\n"
            f"--- inference loop stack ---\n{own_stacks()}",
            worker=w,
        )

    # -- failures ----------------------------------------------------------------------------
    def _account(self, w: int, exc: BaseException) -> None:
        proc = self.procs[w]
        self.budget.charge(w, exc, proc.pid if proc else -1, self.env_ids[w])

    def replace(self, w: int, exc: BaseException, start_timeout_s: float) -> list[int]:
        """Kill worker ``w`` and start a replacement attached to the same shared memory, or
        re-raise ``exc`` (see :meth:`RestartBudget.charge`). Returns the workers replaced;
        the caller re-issues commands to them."""
        self._account(w, exc)
        self.respawn(w, start_timeout_s)
        return [w]

    def respawn(self, w: int, start_timeout_s: float) -> None:
        """Kill worker ``w`` and start a replacement attached to the same shared memory,
        whatever the budget says (the caller accounted for it)."""
        self._kill(w)
        if not self._assign_spare(w):
            self._spawn(w)
        spec = self._hello_or_replace(w, start_timeout_s)
        if repr(spec) != repr(self.spec):
            raise EngineError(f"replacement worker {w} has another env spec: {spec}", worker=w)
        self._attach(w, start_timeout_s)
        if self.spare_wanted:
            self._spawn_spare()  # at idle priority: ready for the next failure

    def _kill(self, w: int) -> None:
        """Stop worker ``w`` at once and forget its pipe (its replies are lost)."""
        proc, conn = self.procs[w], self.conns[w]
        for fd in (conn.fileno() if conn is not None else None, getattr(proc, "sentinel", None)):
            if fd is not None and fd in self._fd_owner:
                self._poller.unregister(fd)
                del self._fd_owner[fd]
        if proc is not None and proc.is_alive():
            proc.kill()
        if proc is not None:
            proc.join(5.0)
            with contextlib.suppress(ValueError):  # still running: its finalizer closes it
                proc.close()  # releases the sentinel's descriptor now, not at collection
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()
        self.procs[w] = self.conns[w] = None
        self.inbox[w].clear()
        self.owed[w] = 0
        self._watch.pop(w, None)

    def worker_rings(self) -> list[SpanRing]:
        """Each worker's span ring, in shared memory."""
        a = self.shm.arrays
        return [SpanRing(a["spans"][w], a["span_head"][w]) for w in range(self.num_workers)]

    # -- shutdown ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every worker and release the shared memory. Idempotent."""
        spare, self._spare = self._spare, None
        procs = [p for p in self.procs if p is not None]
        conns = [c for c in self.conns if c is not None]
        if spare is not None:
            # Killed outright: it maps no shared memory and has served nothing, and one still
            # preparing at idle priority would read CLOSE only once its envs are built.
            with contextlib.suppress(OSError):
                spare.proc.kill()
            procs.append(spare.proc)
            conns.append(spare.conn)
        shm, self.shm = self.shm, None
        shutdown(procs, conns, shm)
