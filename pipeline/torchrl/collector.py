"""RolloutCollector: the engine as a TorchRL collector (a real ``BaseCollector`` subclass).

Batches are the engine's own outputs, in the canonical VLA layout and with every field the
engine records (``episode_id``, ``policy_version``, ``sample_seed``, ``mask``, ``aborted``):

- ``frames_per_batch=F``: ``engine.rollout(F // num_envs)``, a ``[num_envs, T]`` batch.
  Episodes carry over from batch to batch (as a TorchRL collector's envs do); ``("next",
  "done")`` marks their ends, and ``("collector", "traj_ids")`` (the episode id) lets
  ``torchrl.collectors.utils.split_trajectories`` cut them apart.
- ``episodes_per_batch=E`` (with ``group_size``, GRPO groups): ``engine.collect_episodes``,
  a ``[E, T]`` batch of whole episodes, zero-padded, ``("collector", "mask")`` marking the
  valid steps as TorchRL's ``trajs_per_batch`` batches do.

A frame is one decision of one env (one action chunk), counted where ``mask`` is True.

Weights: ``update_policy_weights_`` (TorchRL's signature) hands them to the engine's weight
snapshots, loaded between calls and recorded as ``policy_version``. ``async_batches=True``
(episode batches) collects the next batch while the caller trains on this one, with the
engine's ``max_staleness``.

Seeds: ``set_seed`` replaces the engine's seed (a running engine is shut down and started
again); ``state_dict``/``load_state_dict`` carry the seed and the engine's episode counters,
so a collector resumed from them draws the same episodes next. For episode batches the
resumed batches are exactly the uninterrupted run's; frame batches restart the episodes that
were in flight at the checkpoint from their reset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any

import torch
from tensordict import TensorDictBase
from torchrl.collectors import BaseCollector

from pipeline.config import EngineConfig
from pipeline.engine import RolloutEngine


class RolloutCollector(BaseCollector):
    """The engine as a TorchRL collector.

    Example:
        >>> collector = RolloutCollector("tabletop/reach", policy, num_envs=8,
        ...                              episodes_per_batch=16, group_size=4, total_frames=4000)
        >>> for batch in collector:                    # [16, T] whole episodes
        ...     loss = loss_fn(batch); loss.backward(); optim.step()
        ...     collector.update_policy_weights_(trainer_policy)
        >>> collector.shutdown()

    Args:
        env: a registered env name or a factory, as for :class:`RolloutEngine`.
        policy: the rollout policy (give the collector its own copy when training).
        config: an :class:`EngineConfig`; ``options`` replace its fields.
        frames_per_batch: decisions per batch (a multiple of ``num_envs``).
        episodes_per_batch: whole episodes per batch instead (a multiple of ``group_size``).
        group_size: episodes sharing a reset seed in an episode batch (GRPO groups).
        total_frames: stop after this many decisions (-1: never).
        async_batches: collect the next episode batch while the caller uses this one.
        **options: :class:`EngineConfig` fields (``num_envs`` at least).

    Raises:
        ValueError: not exactly one of ``frames_per_batch`` and ``episodes_per_batch``, a
            batch that does not divide evenly, or ``async_batches`` with frame batches.
    """

    def __init__(
        self,
        env: str | Callable[..., Any],
        policy: torch.nn.Module,
        config: EngineConfig | None = None,
        *,
        frames_per_batch: int | None = None,
        episodes_per_batch: int | None = None,
        group_size: int = 1,
        total_frames: int = -1,
        async_batches: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        self.env, self.policy = env, policy
        self.config = EngineConfig.build(config, options)
        n = self.config.num_envs
        if (frames_per_batch is None) == (episodes_per_batch is None):
            raise ValueError("pass exactly one of frames_per_batch and episodes_per_batch")
        if frames_per_batch is not None and (frames_per_batch < n or frames_per_batch % n):
            raise ValueError(
                f"frames_per_batch={frames_per_batch} must be a multiple of num_envs={n}"
            )
        if episodes_per_batch is not None and (
            group_size < 1 or episodes_per_batch < group_size or episodes_per_batch % group_size
        ):
            raise ValueError(
                f"episodes_per_batch={episodes_per_batch} must be a multiple of "
                f"group_size={group_size}"
            )
        if async_batches and episodes_per_batch is None:
            raise ValueError("async_batches collects whole episodes: pass episodes_per_batch")
        self.frames_per_batch = frames_per_batch
        self.requested_frames_per_batch = frames_per_batch or 0
        self.episodes_per_batch, self.group_size = episodes_per_batch, group_size
        self.total_frames, self.async_batches = total_frames, async_batches
        self.trajs_per_batch = None  # BaseCollector's own episode batching is not used
        self.frames = self.batches = 0
        self._engine: RolloutEngine | None = None
        self._pending: Future | None = None
        self._counters: Mapping[str, object] | None = None  # to restore at the next start
        self._version: int | None = None  # a version handed over before the engine started

    # -- the engine ---------------------------------------------------------------------------
    @property
    def engine(self) -> RolloutEngine:
        """The running engine (started on first use)."""
        if self._engine is None or self._engine.closed:
            self._engine = RolloutEngine(self.env, self.policy, self.config)
            if self._counters is not None:
                self._engine.restore_counters(self._counters)
                self._counters = None
            if self._version is not None:
                self._engine.set_policy_version(self._version)
        return self._engine

    def _collect(self) -> TensorDictBase | Future:
        e = self.engine
        if self.frames_per_batch is not None:
            return e.rollout(self.frames_per_batch // e.num_envs)
        groups = self.episodes_per_batch // self.group_size
        if self.async_batches:
            return e.collect_episodes_async(groups, self.group_size)
        return e.collect_episodes(groups, self.group_size)

    def iterator(self) -> Iterator[TensorDictBase]:
        """Batches until ``total_frames`` decisions have been collected."""
        while self.total_frames < 0 or self.frames < self.total_frames:
            if self.async_batches:
                pending = self._pending or self._collect()
                self._pending = None
                batch = pending.result()
            else:
                batch = self._collect()
            self.frames += int(batch["mask"].sum())
            self.batches += 1
            if self.async_batches and (self.total_frames < 0 or self.frames < self.total_frames):
                self._pending = self._collect()  # overlaps the caller's use of this batch
            yield self._for_torchrl(batch)

    @staticmethod
    def _for_torchrl(batch: TensorDictBase) -> TensorDictBase:
        """TorchRL's names for what the engine records: the valid steps and the trajectory
        ids (views of ``mask`` and ``episode_id``, no copies)."""
        batch.set(("collector", "mask"), batch["mask"])
        batch.set(("collector", "traj_ids"), batch["episode_id"])
        return batch

    def __len__(self) -> int:
        if self.frames_per_batch is None:
            raise RuntimeError(
                "a collector of whole episodes has no length: how many batches make "
                "total_frames depends on the episodes' lengths"
            )
        return super().__len__()

    # -- weights ----------------------------------------------------------------------------
    def update_policy_weights_(
        self,
        policy_or_weights: TensorDictBase | torch.nn.Module | dict | None = None,
        *,
        weights: TensorDictBase | dict | None = None,
        policy: torch.nn.Module | None = None,
        worker_ids: Any = None,
        model_id: str | None = None,
        weights_dict: dict[str, Any] | None = None,
        version: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Hand the rollout policy new weights (TorchRL's signature): loaded between engine
        calls, and recorded as ``policy_version`` ``version`` (default: one more than now).

        Raises:
            ValueError: no weights given, or options this collector has no use for
                (``worker_ids``, ``model_id`` other than ``"policy"``, ``weights_dict``).
        """
        given = [x for x in (policy_or_weights, weights, policy) if x is not None]
        if len(given) != 1:
            raise ValueError("pass the weights once: a module, a state dict or a TensorDict")
        if worker_ids is not None or weights_dict is not None or model_id not in (None, "policy"):
            raise ValueError(
                "RolloutCollector has one policy in one process: worker_ids, weights_dict and "
                "model_id do not apply"
            )
        source = given[0]
        if isinstance(source, TensorDictBase):
            source = source.flatten_keys(".").to_dict()
        current = self._engine.policy_version if self._engine is not None else self._version
        version = (current or 0) + 1 if version is None else int(version)
        if self._engine is not None and not self._engine.closed:
            self._engine.update_weights(source, version)
        else:  # not started: load now
            state = source.state_dict() if isinstance(source, torch.nn.Module) else source
            with torch.no_grad():
                self.policy.load_state_dict(state)
            self._version = version

    # -- seeds, state, shutdown ------------------------------------------------------------------
    def set_seed(self, seed: int, static_seed: bool = False) -> int:
        """Use ``seed`` for every episode from now on (a running engine is restarted)."""
        self.shutdown()
        self.config = dataclasses.replace(self.config, seed=int(seed))
        self._counters = None
        return int(seed)

    def state_dict(self) -> dict[str, Any]:
        """The seed, the progress and the engine's episode counters, with the policy's
        weights and version: enough to resume with the same seeds."""
        e = self._engine
        counters = e.counters() if e is not None and not e.closed else self._counters
        version = e.policy_version if e is not None else self._version
        return {
            "seed": self.config.seed,
            "frames": self.frames,
            "batches": self.batches,
            "counters": counters,
            "policy_version": version,
            "policy_state_dict": self.policy.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next batch draws the episodes the saved
        collector would have drawn next."""
        self.set_seed(state_dict["seed"])
        self.frames, self.batches = int(state_dict["frames"]), int(state_dict["batches"])
        self._counters = state_dict["counters"]
        with torch.no_grad():
            self.policy.load_state_dict(state_dict["policy_state_dict"])
        self._version = state_dict["policy_version"]

    def shutdown(
        self, timeout: float | None = None, close_env: bool = True, raise_on_error: bool = True
    ) -> None:
        """Stop the engine and its workers; safe to call more than once."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result(timeout)  # a running call finishes before the engine closes
            except Exception:
                if raise_on_error:
                    raise
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def __repr__(self) -> str:
        per = (
            f"frames_per_batch={self.frames_per_batch}"
            if self.frames_per_batch is not None
            else f"episodes_per_batch={self.episodes_per_batch}, group_size={self.group_size}"
        )
        return f"RolloutCollector({self.env!r}, num_envs={self.config.num_envs}, {per})"
