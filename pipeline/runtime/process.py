"""A worker in a process of its own: the hand-shake, the pipe loop and death with the parent.

:func:`worker_main` is the process's entry point. It creates the worker's envs, offers their
spec, maps the shared memory the parent sends, and then serves frames until CLOSE or EOF.
Any exception is reported to the parent as a :class:`~pipeline.runtime.protocol.WorkerFailure`
and the process exits. It also exits when its parent dies: the kernel kills it
(``PR_SET_PDEATHSIG``) and, as a second line, its command pipe reaches EOF.
:func:`spare_main` starts a process ahead of need (a spare): it prepares at idle priority,
then becomes whichever worker it is assigned.

Like the rest of :mod:`pipeline.runtime`, this imports no torch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from pipeline.runtime import protocol as P
from pipeline.runtime.layout import Layout, SharedBuffers
from pipeline.runtime.worker import (
    SpareConfig,
    Worker,
    WorkerConfig,
    close_quietly,
    prebuild_envs,
)


def _die_with_parent(parent_pid: int) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the pipe EOF still ends the worker
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def serve(worker: Worker, conn) -> None:
    """The process's loop: read a frame, handle it, reply, run the lookahead tails."""
    worker.follow_profiling()  # profiling from creation: time the wait for the first command
    while True:
        worker.idle()
        try:
            command = P.recv(conn)
        except (EOFError, OSError):
            return  # the parent is gone
        if command.kind == P.CLOSE:
            return
        P.send(conn, worker.handle(command))
        worker.run_tails()  # lookahead: execute on while the next chunks are inferred


def _start(worker: Worker, conn, prebuilt: list | None) -> bool:
    """The hand-shake, worker side: offer the spec, map the memory the parent sends, confirm.
    False when the parent abandoned start-up (another worker failed)."""
    spec = worker.create_envs(prebuilt)
    used = min(len(prebuilt or ()), len(worker.cfg.env_ids))
    P.send(conn, P.Frame(P.HELLO, stage=used))  # envs a spare built ahead
    conn.send(spec)
    attach = P.recv_attach(conn)
    if attach is None:
        return False
    fd, num_envs, chunk_len, num_workers = attach
    worker.bind(SharedBuffers.attach(Layout(spec, num_envs, chunk_len, num_workers), fd))
    P.send(conn, P.Frame(P.ATTACHED))
    return True


def _threads(pid: int | str = "self") -> list[int]:
    """Every thread of a process: what an env library started while a spare prepared must
    be scheduled and pinned as the worker is."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [0] if pid == "self" else []


def set_scheduler(policy: int, pid: int | str = "self") -> None:
    """``policy`` (``os.SCHED_*``) for every thread of process ``pid``; a thread that just
    ended, or a change not permitted, leaves that thread as it was."""
    for tid in _threads(pid):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(tid, policy, os.sched_param(0))


def _may_leave_idle() -> bool:
    """Whether this process could leave SCHED_IDLE again. Unprivileged, it may only if
    RLIMIT_NICE allows its nice value (``can_nice`` in the kernel), and that limit is 0 by
    default: without the way back a spare would serve at idle priority, starved."""
    if os.geteuid() == 0:
        return True
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    return soft == resource.RLIM_INFINITY or 20 - nice <= soft


def _idle_priority(on: bool) -> None:
    """SCHED_IDLE while a spare prepares: it takes only cycles no one else wants, so
    building it never slows the running workers or the loop; back to SCHED_OTHER, every
    thread, once it is a worker. Where the way back is not allowed it stays at normal
    priority throughout, which is slower to prepare but still correct."""
    if not hasattr(os, "SCHED_IDLE") or (on and not _may_leave_idle()):
        return
    set_scheduler(os.SCHED_IDLE if on else os.SCHED_OTHER)


def spare_main(spare: SpareConfig, conn) -> None:
    """Entry point of a spare: import the env's libraries and build its envs ahead (at idle
    priority), then wait to be assigned a worker's config and go on as that worker. An
    assignment that arrives while it prepares stops the preparing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(spare.parent_pid)
    if not conn.poll(0):
        _idle_priority(True)
    prebuilt = prebuild_envs(spare, assigned=lambda: conn.poll(0))
    try:
        P.send(conn, P.Frame(P.READY, stage=len(prebuilt)))
        frame = P.recv(conn)
        cfg = conn.recv() if frame.kind == P.ASSIGN else None
    except (EOFError, OSError):
        cfg = None  # the parent is gone
    if cfg is None:  # CLOSE: not needed after all
        close_quietly(prebuilt)
        return
    _idle_priority(False)
    worker_main(cfg, conn, prebuilt)


def worker_main(cfg: WorkerConfig, conn, prebuilt: list | None = None) -> None:
    """Process entry point (see the module docstring for the state machine); ``prebuilt``:
    the envs a spare built ahead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent(cfg.parent_pid)
    if cfg.cpu is not None and hasattr(os, "sched_setaffinity"):
        for tid in _threads():  # a spare's env libraries may have started threads
            with contextlib.suppress(OSError):  # a thread that just ended
                os.sched_setaffinity(tid, {cfg.cpu})
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    worker = Worker(cfg)
    try:
        if _start(worker, conn, prebuilt):
            serve(worker, conn)
    except BaseException as exc:  # report everything, including KeyboardInterrupt in an env
        failure = worker.failure(exc)
        try:
            P.send(conn, P.Frame(P.ERROR))
            conn.send(failure)
        except (OSError, EOFError):
            pass
        worker.close()
        sys.exit(1)
    worker.close()
