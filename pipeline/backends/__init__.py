"""Where the env workers run, behind one interface (:class:`WorkerBackend`).

* ``local`` (:mod:`pipeline.backends.local`): worker processes on this machine, one pipe each.
* ``inline`` (:mod:`pipeline.backends.inline`): the workers' envs in the calling process,
  stepped one after another, for debugging an env (a breakpoint in it works).
* ``ray`` (:mod:`pipeline.backends.ray`): each node's workers in a Ray actor.

The engine speaks only this interface: frames out (``send``/``send_all``), replies into
per-worker inboxes (``collect``/``ready``/``wait_any``/``take_replies``), the shared arrays
(``shm.arrays``) and recovery (``can_replace``/``replace``). ``tests/test_backends.py``
checks that every backend implements it. Nothing here imports torch: a Ray node imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Protocol, get_args, runtime_checkable

from envs.spec import EnvSpec
from pipeline.backends.budget import Failure
from pipeline.errors import EngineError
from pipeline.runtime.layout import Layout, SharedBuffers
from pipeline.runtime.protocol import Frame
from pipeline.runtime.spans import SpanRing

BackendName = Literal["local", "inline", "ray"]
BACKENDS: tuple[str, ...] = get_args(BackendName)

ReplyMatch = Callable[[Frame], bool]


@runtime_checkable
class WorkerBackend(Protocol):
    """What the engine needs of the place its workers run.

    Example:
        >>> pool = open_backend("inline", "toy", {}, env_ids=[[0, 1]], env_stages=[(0,), (0,)],
        ...                     auto_reset=True, env_name="toy")
        >>> spec = pool.start(lambda spec: Layout(spec, 2, 8, 1), start_timeout_s=60)
        >>> failed = pool.send_all({0: [Frame(RESET, stage=0, slot=1, seq=1)]}, "resetting")
        >>> pool.collect([0], lambda f: f.seq == 1, 60.0, "resetting"); pool.close()
    """

    spec: EnvSpec | None
    layout: Layout
    shm: SharedBuffers | None

    def start(self, make_layout: Callable[[EnvSpec], Layout], start_timeout_s: float) -> EnvSpec:
        """Create every worker's envs, agree on their spec, create the shared memory from the
        layout ``make_layout`` gives and bind every worker to it."""
        ...

    def send(self, w: int, frames: list[Frame], doing: str) -> None:
        """Send worker ``w`` its frames; raise the :class:`EngineError` of a worker gone.

        Args:
            w: the worker's index (``0 .. num_workers - 1``).
            frames: its commands (:class:`Frame`), in the order it handles them.
            doing: what the engine is doing (``"resetting"``), for error messages.

        Raises:
            WorkerDiedError: worker ``w`` is gone (the local backend: its pipe is broken). A
                backend that learns of a failure only later (inline, ray) raises it from the
                calls that look for the reply instead.
        """
        ...

    def send_all(self, frames: dict[int, list[Frame]], doing: str) -> EngineError | None:
        """Send each worker its frames; a worker that is gone does not stop the others from
        getting theirs: its error is returned, not raised."""
        ...

    def collect(
        self, workers: list[int], match: ReplyMatch, hang_timeout: float, doing: str
    ) -> None:
        """Wait until each of ``workers`` has the reply ``match`` accepts, and take those.

        Args:
            workers: the workers to wait for.
            match: accepts the reply waited for; the first reply it accepts in each
                worker's inbox is taken, the ones it rejects (another stage's) stay there.
            hang_timeout: seconds a worker's progress counter may stand still before it is
                stuck; there is no overall deadline: a worker that progresses is waited for.
            doing: what the engine is doing, for error messages.

        Raises:
            WorkerStuckError: a worker of ``workers`` made no progress for ``hang_timeout``
                seconds (the message carries its stack).
            WorkerDiedError: a worker's process exited or its pipe closed (the local backend
                reads every worker's pipe, so any worker's); ``NodeLostError`` on Ray.
            EnvError: a worker reported that its env raised (``ObservationError``: a bad
                observation).
            ProtocolError: a frame the protocol does not allow (inline: no reply in, as
                nothing was sent).
        """
        ...

    def ready(self, workers: list[int], match: ReplyMatch, doing: str) -> bool:
        """Whether each of ``workers`` has the reply ``match`` accepts (never blocks).

        Args:
            workers: the workers to check.
            match: accepts the reply looked for; nothing is taken from the inboxes.
            doing: what the engine is doing, for error messages.

        Returns:
            True when every one of ``workers`` has such a reply (so also for none).

        Raises:
            EngineError: as :meth:`collect`'s, for a failure found while reading the replies
                already in (an ``EnvError``, a closed pipe's ``WorkerDiedError``, ...).
        """
        ...

    def wait_any(
        self, workers: list[int], timeout: float | None, hang_timeout: float, doing: str
    ) -> None:
        """Wait until one of ``workers`` has a reply in, or ``timeout`` seconds pass.

        Reads every reply already in first and takes none (see :meth:`take_replies`);
        returning at ``timeout`` is not an error.

        Args:
            workers: the workers with a command outstanding, watched for replies and hangs.
            timeout: the longest wait in seconds; 0: never block; None: no limit.
            hang_timeout: as :meth:`collect`'s; the watchdog's record of each worker's
                progress is kept across calls, so a worker standing still is found even
                when every single wait is short.
            doing: what the engine is doing, for error messages.

        Raises:
            WorkerStuckError: a worker of ``workers`` made no progress for ``hang_timeout``.
            EngineError: the other failures of :meth:`collect` (``WorkerDiedError``,
                ``EnvError``, ``ProtocolError``).
        """
        ...

    def take_replies(self, w: int) -> list[Frame]:
        """Every reply in worker ``w``'s inbox, oldest first (the inbox emptied)."""
        ...

    def can_replace(self, exc: BaseException) -> bool:
        """Whether ``exc`` is about one worker that the restart budget lets it replace."""
        ...

    def replace(self, w: int, exc: BaseException, start_timeout_s: float) -> list[int]:
        """Replace worker ``w`` (or re-raise ``exc``); returns every worker replaced.

        The replacement is attached to the same shared memory.

        Args:
            w: the failed worker (``exc.worker``).
            exc: the error it failed with, charged to the restart budget.
            start_timeout_s: seconds the replacement has for each start-up step (creating
                its envs, attaching the memory).

        Returns:
            The workers replaced: ``[w]``, or on Ray every worker of a lost node. The caller
            re-issues their commands.

        Raises:
            EngineError: ``exc`` itself, the same object, when the restart budget refuses:
                it is spent (``max_restarts=0`` included) or the worker keeps failing before
                serving a command (a note on ``exc`` says which). A replacement whose envs
                fail to start is replaced again while the budget lasts, else its own
                ``EnvError``/``WorkerDiedError`` is raised. An ``EngineError`` also when the
                replacement reports another env spec.
            EngineTimeout: the replacement did not finish a start-up step in time.
        """
        ...

    @property
    def failures(self) -> Sequence[Failure]:
        """The failures recovered from, oldest first."""
        ...

    def pids(self) -> list[int]: ...

    def local_pids(self) -> list[int | None]:
        """Per worker, its pid where this machine's CPU sampler can watch it, else None."""
        ...

    def placement(self) -> list[dict]: ...

    def worker_rings(self) -> list[SpanRing]: ...

    def close(self) -> None:
        """Stop every worker and release the shared memory. Idempotent."""
        ...


def open_backend(
    name: BackendName,
    env,
    env_kwargs: dict,
    *,
    hang_timeout_s: float = 60.0,
    workers_per_node: int | None = None,
    ray_address: str | None = None,
    **pool_args,
) -> WorkerBackend:
    """The backend ``name``, not yet started.

    Args:
        name: ``"local"``, ``"inline"`` or ``"ray"``.
        env: a registered env name or an env factory, for every worker.
        env_kwargs: the keyword arguments each env is created with.
        hang_timeout_s: the Ray backend's only (its nodes' watchdog); the others get the
            hang timeout with each ``collect``/``wait_any``.
        workers_per_node: the Ray backend's only; None: every worker on one node.
        ray_address: the Ray backend's only: the cluster ``ray.init`` connects to, when
            Ray is not initialized yet.
        **pool_args: the workers' envs and options, the same for every backend (``env_ids``,
            ``env_stages``, ``auto_reset``, ``env_name``, ...; see
            :class:`pipeline.backends.local.WorkerPool`).

    Raises:
        ValueError: ``name`` is not a backend, or ``pin_workers=True`` with ``"inline"``.
        ImportError: ``"ray"`` without Ray installed.
    """
    if name == "ray":
        from pipeline.backends.ray.pool import RayPool  # Ray is imported for this backend only

        return RayPool(
            env,
            env_kwargs,
            workers_per_node=workers_per_node or len(pool_args["env_ids"]),
            ray_address=ray_address,
            hang_timeout_s=hang_timeout_s,
            **pool_args,
        )
    if name == "inline":
        from pipeline.backends.inline import InlinePool

        return InlinePool(env, env_kwargs, **pool_args)
    if name == "local":
        from pipeline.backends.local import WorkerPool

        return WorkerPool(env, env_kwargs, **pool_args)
    raise ValueError(f"backend={name!r}: choose one of {', '.join(map(repr, BACKENDS))}")
