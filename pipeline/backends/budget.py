"""How many worker failures an engine may still recover from, and the record of those it did:
one budget per engine, whichever backend runs its workers."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

log = logging.getLogger("pipeline")

# A worker that fails this many times in a row, with no command served in between, fails
# deterministically (a factory that always raises): replacing it again cannot help.
MAX_CONSECUTIVE_FAILURES = 3


@dataclass
class Failure:
    """One worker failure the pool recovered from (``engine.failures``)."""

    time: float  # time.time() when it was handled
    worker: int
    pid: int
    env_ids: list[int]
    error: str  # the exception's class and message: signal, traceback or stacks included
    restart: int  # the restart it caused (1-based, over the pool's life)


class RestartBudget:
    """How many worker failures a pool may still recover from, and the record of those it
    did. One budget per engine, whichever backend runs its workers.

    Example:
        >>> budget = RestartBudget(max_restarts=2, num_workers=4)
        >>> budget.charge(1, WorkerDiedError("worker 1 died", worker=1), pid=123, env_ids=[1, 5])
        >>> budget.restarts
        1
    """

    def __init__(self, max_restarts: int, num_workers: int) -> None:
        self.max_restarts = max_restarts  # 0: every failure raises
        self.restarts = 0
        self.failures: deque[Failure] = deque(maxlen=1000)
        self._consecutive = [0] * num_workers

    def served(self, w: int) -> None:
        """Worker ``w`` answered a command: its next failure is not a deterministic one."""
        self._consecutive[w] = 0

    def charge(self, w: int, exc: BaseException, pid: int, env_ids: list[int]) -> None:
        """Count a failure of worker ``w`` and log it, or re-raise ``exc`` when the budget is
        spent or the worker keeps failing before serving anything."""
        if self.max_restarts <= 0:
            raise exc
        if self.restarts >= self.max_restarts:
            exc.add_note(f"(not replaced: the restart budget of {self.max_restarts} is spent)")
            raise exc
        self._consecutive[w] += 1
        if self._consecutive[w] >= MAX_CONSECUTIVE_FAILURES:
            exc.add_note(
                f"(not replaced: worker {w} failed {self._consecutive[w]} times in a row "
                "without serving a command, so replacing it again cannot help)"
            )
            raise exc
        self.restarts += 1
        record = Failure(
            time.time(), w, pid, list(env_ids), f"{type(exc).__name__}: {exc}", self.restarts
        )
        self.failures.append(record)
        log.warning(
            "replacing worker %d (pid %s, envs %s), restart %d of %d: %s",
            w, record.pid, record.env_ids, self.restarts, self.max_restarts, record.error,
        )  # fmt: skip
