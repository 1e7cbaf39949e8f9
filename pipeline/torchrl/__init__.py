"""The engine inside TorchRL: a real ``BaseCollector`` (:class:`RolloutCollector`).

Optional (``pip install -e '.[torchrl]'``): the rest of ``pipeline`` never imports torchrl,
and this package imports it only when one of its names is used.
"""

from __future__ import annotations

__all__ = ["RolloutCollector"]


def __getattr__(name: str):
    if name == "RolloutCollector":
        from pipeline.torchrl.collector import RolloutCollector

        return RolloutCollector
    raise AttributeError(f"module 'pipeline.torchrl' has no attribute {name!r}")
