"""The engine inside TorchRL: a real ``BaseCollector`` (:class:`RolloutCollector`), and
TorchRL's VLA policies as the engine's policy (:class:`TorchRLPolicy`).

Optional (``pip install -e '.[torchrl]'``): the rest of ``pipeline`` never imports torchrl,
and this package imports it only when one of its names is used.
"""

from __future__ import annotations

__all__ = ["RolloutCollector", "TorchRLPolicy"]


def __getattr__(name: str):
    if name == "RolloutCollector":
        from pipeline.torchrl.collector import RolloutCollector

        return RolloutCollector
    if name == "TorchRLPolicy":
        from pipeline.torchrl.policy import TorchRLPolicy

        return TorchRLPolicy
    raise AttributeError(f"module 'pipeline.torchrl' has no attribute {name!r}")
