"""What every worker backend shares: its restart budget and its workers' configs."""

from __future__ import annotations

import os
from collections import deque
from typing import Any

from pipeline.backends.budget import Failure, RestartBudget
from pipeline.errors import EngineError
from pipeline.runtime.worker import WorkerConfig


class PoolBase:
    """The parts of a backend that do not depend on where its workers run: whether a failure
    may be recovered from, the replies that reset a worker's run of failures, what the engine
    reports as ``engine.failures``, and each worker's :class:`WorkerConfig`."""

    budget: RestartBudget
    inbox: list[deque]  # per worker, the replies read and not yet taken
    shm: object | None  # the shared memory; None once closed
    env: Any  # a registered env name or a factory
    env_kwargs: dict
    env_ids: list[list[int]]  # per worker, its envs' global ids
    env_stages: list[tuple[int, ...]]  # per env, the stages it belongs to
    auto_reset: bool
    profile: bool

    def worker_config(self, w: int, cpu: int | None = None) -> WorkerConfig:
        """What worker ``w`` is started with (``cpu``: the core to pin it to)."""
        mine = self.env_ids[w]
        return WorkerConfig(
            worker_id=w,
            env_fn=self.env,
            env_kwargs=self.env_kwargs,
            env_ids=mine,
            env_stages=[self.env_stages[i] for i in mine],
            auto_reset=self.auto_reset,
            parent_pid=os.getpid(),
            cpu=cpu,
            profile=self.profile,
        )

    def take_replies(self, w: int) -> list:
        """Every reply of worker ``w`` in its inbox, oldest first (and the inbox emptied)."""
        box = self.inbox[w]
        frames = list(box)
        box.clear()
        if frames:
            self.budget.served(w)  # it served a command: not a deterministic failure
        return frames

    def can_replace(self, exc: BaseException) -> bool:
        """Whether ``exc`` is about one worker that the restart budget lets the pool replace."""
        return (
            isinstance(exc, EngineError)
            and exc.worker is not None
            and self.budget.max_restarts > 0
            and self.shm is not None
        )

    @property
    def failures(self) -> deque[Failure]:
        return self.budget.failures

    @property
    def restarts(self) -> int:
        return self.budget.restarts
