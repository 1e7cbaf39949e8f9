"""The engine's errors. Every one is an :class:`EngineError`; catching that catches them all."""

from __future__ import annotations


class EngineError(RuntimeError):
    """Base class of the engine's errors. The engine is closed when one is raised.

    ``worker`` is the index of the worker the error is about, when there is one: with
    ``on_worker_failure="restart"`` the engine replaces that worker instead of raising.
    """

    def __init__(self, message: str, worker: int | None = None) -> None:
        super().__init__(message)
        self.worker = worker


class EnvError(EngineError):
    """An env (or env factory) raised inside a worker; carries the original traceback."""


class ObservationError(EnvError, ValueError):
    """An env produced an observation that does not match its spec (shape, dtype, a missing
    key, or a non-finite float); nothing of it reached shared memory."""


class WorkerDiedError(EngineError):
    """A worker process exited without being asked to (killed, crashed)."""


class NodeLostError(WorkerDiedError):
    """A Ray node's actor was lost (killed, crashed, or its node went away): every worker on
    it is gone. ``worker`` is its first worker, ``workers`` all of them."""

    def __init__(self, message: str, node: int, workers: list[int]) -> None:
        super().__init__(message, worker=workers[0])
        self.node, self.workers = node, list(workers)


class PlacementError(EngineError):
    """The Ray cluster cannot hold the engine's node actors (1 CPU per worker, all at once):
    the message names the demand, the CPUs Ray reports per node, and the option to change."""


class ProtocolError(EngineError):
    """A frame arrived that the protocol does not allow there: a bug in the engine or the
    worker, never the env's doing, so it is not recovered from."""


class EngineTimeout(EngineError, TimeoutError):
    """Workers did not answer within the timeout."""


class WorkerStuckError(EngineTimeout):
    """A worker's progress counter did not move for ``hang_timeout_s``: it is stuck, not
    slow. The message carries its live Python stack and the inference loop's."""


class PolicyOutputError(EngineError, ValueError):
    """The policy returned something that must not reach the physics."""


class EngineClosedError(EngineError):
    """The engine was used after close()."""
