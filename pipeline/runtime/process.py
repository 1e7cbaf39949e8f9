"""A worker in a process of its own: the hand-shake, the pipe loop and death with the parent.

:func:`worker_main` is the process's entry point. It creates the worker's envs, offers their
spec, maps the shared memory the parent sends, and then serves frames until CLOSE or EOF.
Any exception is reported to the parent as a :class:`~pipeline.runtime.protocol.WorkerFailure`
and the process exits. It also exits when its parent dies: the kernel kills it
(``PR_SET_PDEATHSIG``) and, as a second line, its command pipe reaches EOF.

Like the rest of :mod:`pipeline.runtime`, this imports no torch.
"""

from __future__ import annotations

import os
import signal
import sys

from pipeline.runtime import protocol as P
from pipeline.runtime.layout import Layout, SharedBuffers
from pipeline.runtime.worker import Worker, WorkerConfig


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


def _start(worker: Worker, conn) -> bool:
    """The hand-shake, worker side: offer the spec, map the memory the parent sends, confirm.
    False when the parent abandoned start-up (another worker failed)."""
    spec = worker.create_envs()
    P.send(conn, P.Frame(P.HELLO))
    conn.send(spec)
    attach = P.recv_attach(conn)
    if attach is None:
        return False
    fd, num_envs, chunk_len, num_workers = attach
    worker.bind(SharedBuffers.attach(Layout(spec, num_envs, chunk_len, num_workers), fd))
    P.send(conn, P.Frame(P.ATTACHED))
    return True


def worker_main(cfg: WorkerConfig, conn) -> None:
    """Process entry point (see the module docstring for the state machine)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent(cfg.parent_pid)
    if cfg.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cfg.cpu})
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    worker = Worker(cfg)
    try:
        if _start(worker, conn):
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
