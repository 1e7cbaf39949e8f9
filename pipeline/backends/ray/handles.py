"""The driver's handles on its Ray node actors, and the helpers around them: importing Ray
with a clear error, re-raising what a node reported, mirroring a node's span rings, and
waiting for a killed actor to be gone.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from pipeline import errors
from pipeline.errors import EngineError
from pipeline.runtime.spans import SpanRing


def import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError(
            "backend='ray' needs Ray: pip install -e '.[ray]' (or pip install ray)"
        ) from None
    return ray


def raise_payload(payload: tuple) -> None:
    """Raise the engine error a node reported as ``(class name, message, worker)``."""
    name, message, worker = payload
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, EngineError)):
        cls = EngineError
    raise cls(message, worker=worker)


class NodeRing(SpanRing):
    """A worker's span ring as last read from its node; clearing it clears the node's."""

    def __init__(self, buf: np.ndarray, head: np.ndarray, clear: Callable[[], None]) -> None:
        super().__init__(buf, head)
        self._clear_remote = clear

    def clear(self) -> None:
        super().clear()
        self._clear_remote()


class NodeHandle:
    """The driver's handle on one node: its actor, workers, and reply channel."""

    def __init__(self, index: int, workers: list[int], ray_node_id: str) -> None:
        self.index, self.workers, self.ray_node_id = index, workers, ray_node_id
        self.actor = None
        self.placed = False  # Ray placed the actor (its __ray_ready__ answered, or failed)
        self.conn = None  # the node's reply channel (multiprocessing.connection.Connection)
        self.heard_at = 0.0  # when the node last sent anything (replies or a heartbeat)
        self.commands = 0  # calls sent to this actor (it checks their order)
        self.pids: list[int] = []


def await_death(ray, actor, deadline: float) -> None:
    """Return once ``actor`` is dead (or at ``deadline``). ``ray.kill`` only asks the GCS to
    kill it: a call sent just after can still be served, so close() would return with the
    actor alive."""
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
        except ray.exceptions.RayActorError:
            return
        except Exception:  # a timeout: the deadline has passed
            return
        time.sleep(0.05)
