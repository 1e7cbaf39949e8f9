"""The inline backend: every worker's envs in the calling process, stepped one after another.

For debugging an env: a breakpoint, a ``pdb.set_trace()`` or a print in the env runs in
the caller's process, as Gymnasium's ``SyncVectorEnv`` and PufferLib's ``Serial`` allow. It
runs the same :class:`~pipeline.runtime.worker.Worker` state machine over the same shared
memory and frames as the process backends, only driven frame by frame: a worker handles its
commands as they are sent and its reply is in its inbox when ``send`` returns (its
lookahead actions run right after), so trajectories are bitwise the other backends'.

What it cannot do, having no processes: there is no watchdog (an env that hangs stops the
caller, where a debugger can look at it) and no worker to kill; an env that raises is
"replaced" by creating the worker's envs again, under the same restart budget. Envs and
the policy share the process's cores, so it is the slowest backend, never a fast one.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from typing import Any

from envs.spec import EnvSpec
from pipeline.backends.base import PoolBase
from pipeline.backends.budget import RestartBudget
from pipeline.errors import EngineError, EnvError, ProtocolError
from pipeline.runtime.layout import Layout, SharedBuffers
from pipeline.runtime.protocol import Frame
from pipeline.runtime.spans import SpanRing
from pipeline.runtime.worker import Worker


class InlinePool(PoolBase):
    """``num_workers`` workers in this process, around one shared segment.

    Example:
        >>> pool = InlinePool("toy", {}, env_ids=[[0, 1]], env_stages=[(0,), (0,)],
        ...                   auto_reset=True, env_name="toy")
        >>> spec = pool.start(lambda spec: Layout(spec, 2, 8, 1), start_timeout_s=60)
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
    ) -> None:
        if pin_workers:
            raise ValueError("pin_workers applies to process backends, not backend='inline'")
        self.env, self.env_kwargs, self.env_name = env, env_kwargs, env_name
        self.env_ids, self.env_stages, self.auto_reset = env_ids, env_stages, auto_reset
        self.num_workers, self.profile = len(env_ids), profile
        self.budget = RestartBudget(max_restarts, self.num_workers)
        self.workers: list[Worker | None] = [None] * self.num_workers
        self.inbox: list[deque[Frame]] = [deque() for _ in range(self.num_workers)]
        # A worker whose env raised: the error its reply would have been, raised (as a
        # process worker's ERROR frame is) when that reply is looked for.
        self.failed: dict[int, EnvError] = {}
        self.shm: SharedBuffers | None = None
        self.spec: EnvSpec | None = None

    def _create(self, w: int) -> EnvSpec:
        """Create worker ``w``'s envs, replacing it while the restart budget lasts."""
        while True:
            worker = self.workers[w] = Worker(self.worker_config(w))
            try:
                return worker.create_envs()
            except Exception as exc:
                error = worker.failure(exc).to_error(self.env_name)
                worker.close(unmap=False)
                self.budget.charge(w, error, os.getpid(), self.env_ids[w])

    # -- start-up ----------------------------------------------------------------------------
    def start(self, make_layout: Callable[[EnvSpec], Layout], start_timeout_s: float) -> EnvSpec:
        try:
            specs = [self._create(w) for w in range(self.num_workers)]
            if any(repr(s) != repr(specs[0]) for s in specs):
                raise EngineError(f"workers disagree on the env spec: {specs}")
            self.spec = specs[0]
            self.layout = make_layout(self.spec)
            self.shm = SharedBuffers.create(self.layout)
            if self.profile:
                self.shm.arrays["profile_on"][0] = 1
            for worker in self.workers:
                worker.bind(self.shm)
        except BaseException:
            self.close()
            raise
        return self.spec

    # -- running -----------------------------------------------------------------------------
    def send(self, w: int, frames: list[Frame], doing: str) -> None:
        """Worker ``w`` handles ``frames`` now, in order; each reply goes into its inbox. An
        env's exception stops the worker: it is raised where its reply is looked for."""
        worker = self.workers[w]
        if w in self.failed:
            return  # as a process worker that has exited: it reads nothing more
        try:
            for frame in frames:
                self.inbox[w].append(worker.handle(frame))
            worker.run_tails()
            worker.idle()
        except ProtocolError:
            raise
        except Exception as exc:
            self.failed[w] = worker.failure(exc).to_error(self.env_name)

    def send_all(self, frames: dict[int, list[Frame]], doing: str) -> EngineError | None:
        for w, fs in frames.items():
            self.send(w, fs, doing)
        return None  # no worker can be gone before its envs ran

    def _raise_failed(self, workers: list[int]) -> None:
        for w in workers:
            if w in self.failed:
                raise self.failed[w]

    def ready(self, workers: list[int], match: Callable[[Frame], bool], doing: str) -> bool:
        self._raise_failed(workers)
        return all(any(match(f) for f in self.inbox[w]) for w in workers)

    def collect(
        self, workers: list[int], match: Callable[[Frame], bool], hang_timeout: float, doing: str
    ) -> None:
        """Take each worker's reply. It is in already: a command is handled when it is sent,
        so a missing one is an engine bug (there is nothing to wait for)."""
        self._raise_failed(workers)
        for w in workers:
            reply = next((f for f in self.inbox[w] if match(f)), None)
            if reply is None:
                raise ProtocolError(f"worker {w}: no reply in while {doing}: nothing was sent")
            self.inbox[w].remove(reply)
            self.budget.served(w)

    def wait_any(
        self, workers: list[int], timeout: float | None, hang_timeout: float, doing: str
    ) -> None:
        """Every reply is in by the time its command is sent: nothing to wait for."""
        if not any(self.inbox[w] for w in workers):
            self._raise_failed(workers)

    # -- failures ----------------------------------------------------------------------------
    def replace(self, w: int, exc: BaseException, start_timeout_s: float) -> list[int]:
        """Create worker ``w``'s envs again and bind them to the same memory, or re-raise
        ``exc`` (see :meth:`RestartBudget.charge`)."""
        self.budget.charge(w, exc, os.getpid(), self.env_ids[w])
        self.workers[w].close(unmap=False)
        self.inbox[w].clear()
        self.failed.pop(w, None)
        spec = self._create(w)
        if repr(spec) != repr(self.spec):
            raise EngineError(f"replacement worker {w} has another env spec: {spec}", worker=w)
        self.workers[w].bind(self.shm)
        return [w]

    # -- where the workers are ---------------------------------------------------------------
    def pids(self) -> list[int]:
        """This process, for every worker."""
        return [os.getpid()] * self.num_workers

    def local_pids(self) -> list[int | None]:
        """None: the workers are the caller's own process, which the sampler counts once."""
        return [None] * self.num_workers

    def placement(self) -> list[dict]:
        workers = list(range(self.num_workers))
        return [{"node": 0, "address": "inline", "workers": workers, "pids": self.pids()}]

    def worker_rings(self) -> list[SpanRing]:
        a = self.shm.arrays
        return [SpanRing(a["spans"][w], a["span_head"][w]) for w in range(self.num_workers)]

    def close(self) -> None:
        """Close every worker's envs and release the shared memory. Idempotent."""
        for worker in self.workers:
            if worker is not None:
                worker.close(unmap=False)
        shm, self.shm = self.shm, None
        if shm is not None:
            shm.close()
