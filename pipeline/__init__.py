"""The engine: moves observations, batches them, runs the policy, dispatches actions and
records trajectories.

Example:
    >>> from pipeline import RolloutEngine
    >>> from pipeline.policies import TinyVLA

Attributes are imported lazily: worker processes import ``pipeline.runtime.worker`` and must not pay
for torch.
"""

from __future__ import annotations

__all__ = [
    "EngineClosedError",
    "EngineConfig",
    "EngineError",
    "EngineTimeout",
    "EnvError",
    "NodeLostError",
    "ObservationError",
    "PlacementError",
    "PolicyOutputError",
    "ProtocolError",
    "RolloutEngine",
    "WorkerDiedError",
    "WorkerStuckError",
]


def __getattr__(name: str):
    if name == "RolloutEngine":
        from pipeline.engine import RolloutEngine

        return RolloutEngine
    if name == "EngineConfig":
        from pipeline.config import EngineConfig

        return EngineConfig
    if name in __all__:
        from pipeline import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
