"""Worker processes from the parent's side: how they are spawned, how they end, and how a
parent learns how they ended.

Nothing here knows frames beyond CLOSE; :class:`~pipeline.backends.local.WorkerPool` uses these
for its processes, and a Ray node's pool for its own.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from pipeline.runtime import protocol as P
from pipeline.runtime.layout import SharedBuffers

_WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@contextlib.contextmanager
def worker_environ():
    """Children inherit the environment at spawn: one BLAS/OpenMP thread per worker, so
    physics processes never oversubscribe the cores."""
    saved = {k: os.environ.get(k) for k in _WORKER_ENV}
    os.environ.update(_WORKER_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def without_main(env: Any):
    """Spawn children without re-running the parent's ``__main__``, unless the env factory
    lives there. Spawn re-imports the main script in every child so that objects pickled
    from it resolve; a trainer script imports torch and more at its top, which cost each
    worker hundreds of MiB for nothing when the env is a registered name or an importable
    factory."""
    factory_in_main = not isinstance(env, str) and getattr(env, "__module__", "") == "__main__"
    if factory_in_main:
        yield
        return
    from multiprocess import spawn

    real = spawn.get_preparation_data

    def prepare(name):
        data = real(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    spawn.get_preparation_data = prepare
    try:
        yield
    finally:
        spawn.get_preparation_data = real


def _load_sched_getcpu():
    try:
        import ctypes

        fn = ctypes.CDLL("libc.so.6", use_errno=True).sched_getcpu
        fn.restype = ctypes.c_int
        return fn if fn() >= 0 else None
    except (OSError, AttributeError):
        return None


sched_getcpu = _load_sched_getcpu()  # None where libc has none


def shutdown(procs: list, conns: list, shm: SharedBuffers | None) -> None:
    """Stop workers (politely, then firmly) and release shared memory. Idempotent, and
    references no pool, so a finalizer can call it."""
    for conn in conns:
        with contextlib.suppress(OSError, ValueError):
            P.send(conn, P.Frame(P.CLOSE))
    deadline = time.monotonic() + 2.0
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(2.0)
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.close()
    if shm is not None:
        shm.close()


def exit_status(proc, timeout: float) -> int | None:
    """A child's exit code (``-signal`` when killed), or None if it is still running after
    ``timeout`` seconds; the child is not reaped.

    ``os.waitid(..., WNOWAIT)`` reads the status and leaves the zombie in place, so any number
    of threads can ask (on the Ray backend a node's command thread and its reply thread can
    both find the same death). ``Process.join`` reaps instead: the second of two joining
    threads then got ECHILD and reported ``exit code None`` while the first, which had the
    status, had not yet stored it."""
    deadline = time.monotonic() + timeout
    while True:
        code = proc._popen.returncode if proc._popen is not None else None
        if code is not None:  # reaped already, by this Process object
            return code
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        except ChildProcessError:
            info = None  # just reaped by a join in another thread: its returncode is next
        if info is not None:
            return -info.si_status if info.si_code != os.CLD_EXITED else info.si_status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.001)
