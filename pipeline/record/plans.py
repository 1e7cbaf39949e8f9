"""What a call asks of the loop: which episodes to run, when to stop, where each decision goes.

A plan queues episodes (writing the ``next_seed``/``next_episode`` control arrays the workers
read), says whether a stage still wants decisions, and records them in its trajectory store.
It never touches the engine: episode ids come from an :class:`EpisodeIds` allocator.

- :class:`RolloutPlan` (``rollout(T)``): every env makes ``T`` decisions; row = env.
- :class:`EpisodePlan` (``collect_episodes``): a group-major queue of episodes that envs pull
  from as they finish; row = episode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np
import torch
from tensordict import NonTensorData, TensorDict

from pipeline import schema
from pipeline.errors import EngineError
from pipeline.record.store import BufferPool, Dest, TrajectoryStore
from pipeline.runtime.layout import Layout
from pipeline.schedule.stages import Stage
from pipeline.seeding import GROUP, RESET, derive


class EpisodeIds:
    """Episode ids, unique over an engine's life, and independent of timing.

    An env's own episodes (``rollout``) are numbered per env, so the ids one env draws never
    depend on when the others finish theirs (or re-run one after a worker failure); blocks
    (``collect_episodes``) come from a separate counter. Even ids are per-env, odd ids are
    blocks.

    Example:
        >>> ids = EpisodeIds(num_envs=4)
        >>> ids.for_env(1), ids.for_env(1), ids.take(3)
        (2, 10, 1)
    """

    def __init__(self, num_envs: int) -> None:
        self.num_envs = num_envs
        self._per_env = np.zeros(num_envs, np.int64)
        self._blocks = 0

    def for_env(self, i: int) -> int:
        """The next episode id of env ``i``'s own sequence."""
        k = int(self._per_env[i])
        self._per_env[i] += 1
        return 2 * (k * self.num_envs + i)

    def state(self) -> dict[str, object]:
        """The counters, to continue the same ids elsewhere (:meth:`load`)."""
        return {"per_env": self._per_env.tolist(), "blocks": self._blocks}

    def load(self, state) -> None:
        per_env = np.asarray(state["per_env"], np.int64)
        if per_env.shape != self._per_env.shape:
            raise ValueError(
                f"episode counters for {len(per_env)} envs, but this engine has {self.num_envs}"
            )
        self._per_env[:], self._blocks = per_env, int(state["blocks"])

    def take(self, n: int = 1) -> int:
        """Reserve ``n`` consecutive block ids (stride 2: ``first + 2 * j``); return the first."""
        first = 2 * self._blocks + 1
        self._blocks += n
        return first


class Recording(NamedTuple):
    """What every plan of one engine records with: its memory, ids and seed."""

    layout: Layout
    arrays: dict[str, np.ndarray]
    ids: EpisodeIds
    seed: int
    pool: BufferPool | None = None  # trajectory memory, reused once a result is dropped
    obs_keys: tuple[str, ...] | None = None  # the observation keys kept (None: all)


class Plan(Protocol):
    """The interface the loop drives."""

    store: TrajectoryStore
    restart_all: bool  # every env starts a fresh episode at the call's start

    def next_episode(self, i: int) -> None: ...

    def wants(self, s: Stage) -> bool: ...

    def record(self, s: Stage, outputs: dict) -> Dest: ...

    def record_cells(
        self, cells: list[Stage], slots: np.ndarray, envs: np.ndarray, outputs: dict
    ) -> None: ...

    def abort(self, env_ids: np.ndarray, episodes: np.ndarray) -> None: ...

    def result(self, policy_version: int, texts: dict[int, NonTensorData]) -> TensorDict: ...


class RolloutPlan:
    """``rollout(T)``: record decision r of env i at ``[i, r]``."""

    restart_all = False  # envs carry their episodes over from the previous call

    def __init__(self, rec: Recording, num_stages: int, num_decisions: int) -> None:
        if (
            isinstance(num_decisions, bool)
            or not isinstance(num_decisions, int)
            or num_decisions < 1
        ):
            raise ValueError(f"num_decisions={num_decisions!r} must be an int >= 1")
        self.a, self.ids, self.seed, self.T = rec.arrays, rec.ids, rec.seed, num_decisions
        self.made = np.zeros(num_stages, np.int64)
        rows = rec.layout.num_envs
        self.store = TrajectoryStore(
            rec.layout, rec.arrays, rows, num_decisions, rec.pool, rec.obs_keys
        )

    def next_episode(self, i: int) -> None:
        """Queue a fresh episode (a new id and reset seed) for env ``i``."""
        uid = self.ids.for_env(i)
        self.a["next_episode"][i] = uid
        self.a["next_seed"][i] = derive(self.seed, RESET, uid)

    def wants(self, s: Stage) -> bool:
        return self.made[s.index] < self.T

    def record(self, s: Stage, outputs: dict) -> Dest:
        # The whole stage at column t: a parked env's entry is recorded too, and its record
        # says it is parked (no decision; the store masks it).
        dest = Dest.block_at(s.lo, int(self.made[s.index]), s.size)
        self.store.record_decision(dest, s.slot, s.lo, s.hi, outputs)
        self.made[s.index] += 1
        return dest

    def record_cells(
        self, cells: list[Stage], slots: np.ndarray, envs: np.ndarray, outputs: dict
    ) -> None:
        """:meth:`record` for a dynamic batch (single-env stages; env ``envs[j]`` in
        ``slots[j]``) by block copies; each cell's ``pending`` says where its results go."""
        index = np.fromiter((c.index for c in cells), np.int64, len(cells))
        ts = self.made[index]
        self.made[index] += 1
        dest = Dest.scatter(envs, ts, np.arange(len(cells)))
        self.store.record_gathered(dest, slots, envs, outputs)
        for c, row, t in zip(cells, envs.tolist(), ts.tolist(), strict=True):
            c.pending = Dest.block_at(row, t, 1)

    def abort(self, env_ids: np.ndarray, episodes: np.ndarray) -> None:
        """A worker failure ended these episodes: their decisions so far stay in the output,
        masked and flagged ``aborted``; the episodes run again from their reset."""
        self.store.abort(env_ids, episodes)

    def result(self, policy_version: int, texts: dict[int, NonTensorData]) -> TensorDict:
        return self.store.to_tensordict(seed=self.seed, policy_version=policy_version, texts=texts)


class EpisodePlan:
    """``collect_episodes``: a queue of episodes, group-major; envs pull the next one."""

    restart_all = True

    def __init__(
        self,
        rec: Recording,
        call: int,
        exec_len: int,
        num_groups: int,
        group_size: int,
        group_seeds: Sequence[int] | None = None,
    ) -> None:
        """``group_seeds`` gives each group's reset seed (default: derived from the seed and
        the ``call`` count).

        Raises:
            ValueError: fewer than one group or member, or not one non-negative seed per group.
        """
        if num_groups < 1 or group_size < 1:
            raise ValueError("num_groups and group_size must be >= 1")
        if group_seeds is None:
            group_seeds = derive(rec.seed, GROUP, call, np.arange(num_groups))
        else:
            given = np.asarray(list(group_seeds), np.int64)
            if given.shape != (num_groups,) or (given < 0).any():
                raise ValueError(
                    f"reset_seeds: need {num_groups} non-negative seeds (one per group), got "
                    f"{given.tolist()}"
                )
            group_seeds = given
        self.a, self.seed = rec.arrays, rec.seed
        self.E = num_groups * group_size
        self.group_size = group_size
        self.seeds = np.repeat(group_seeds, group_size)
        self.uid0 = rec.ids.take(self.E)
        self.queue = 0  # next episode index to hand out
        self.restarts = np.zeros(self.E, np.int64)  # aborted attempts per episode
        self.max_t = math.ceil(rec.layout.spec.max_steps / exec_len) + 1
        self.store = TrajectoryStore(
            rec.layout, rec.arrays, self.E, self.max_t, rec.pool, rec.obs_keys
        )

    def next_episode(self, i: int) -> None:
        """Queue the next episode of the group-major queue for env ``i``; -1 parks it."""
        if self.queue < self.E:
            self.a["next_seed"][i] = self.seeds[self.queue]
            self.a["next_episode"][i] = self.uid0 + 2 * self.queue
            self.queue += 1
        else:
            self.a["next_seed"][i] = -1
            self.a["next_episode"][i] = -1

    def wants(self, s: Stage) -> bool:
        return bool((self.a["parked"][s.slot, s.lo : s.hi] == 0).any())

    def record(self, s: Stage, outputs: dict) -> Dest:
        a = self.a
        live = a["parked"][s.slot, s.lo : s.hi] == 0
        src = np.flatnonzero(live)
        rows = (a["episode_id"][s.slot, s.lo : s.hi][src] - self.uid0) // 2
        ts = a["t"][s.slot, s.lo : s.hi][src]
        if len(ts) and ts.max() >= self.max_t:
            raise EngineError(f"an episode exceeded {self.max_t} decisions (spec.max_steps)")
        dest = Dest(rows, ts, src, s.size)
        self.store.record_decision(dest, s.slot, s.lo, s.hi, outputs)
        return dest

    def record_cells(
        self, cells: list[Stage], slots: np.ndarray, envs: np.ndarray, outputs: dict
    ) -> None:
        """:meth:`record` for a dynamic batch (see :meth:`RolloutPlan.record_cells`)."""
        a = self.a
        src = np.flatnonzero(a["parked"][slots, envs] == 0)
        rows = (a["episode_id"][slots, envs][src] - self.uid0) // 2
        ts = a["t"][slots, envs][src]
        if len(ts) and ts.max() >= self.max_t:
            raise EngineError(f"an episode exceeded {self.max_t} decisions (spec.max_steps)")
        self.store.record_gathered(Dest.scatter(rows, ts, src), slots, envs, outputs)
        for c in cells:
            c.pending = Dest.block_at(0, 0, 0)  # parked: nothing recorded, nothing to come
        for j, row, t in zip(src.tolist(), rows.tolist(), ts.tolist(), strict=True):
            cells[j].pending = Dest.block_at(row, t, 1)

    def abort(self, env_ids: np.ndarray, episodes: np.ndarray) -> None:
        """A worker failure ended these episodes: each runs again from its reset (same id,
        seeds and row), so its group still comes back complete; ``restarts`` counts it."""
        offset = np.asarray(episodes, np.int64) - self.uid0
        rows = offset[(offset % 2 == 0) & (offset >= 0) & (offset < 2 * self.E)] // 2
        # (Others are episodes of an earlier call still held at this call's start: the
        # reset of every env that begins a call replaces them.)
        self.store.forget(rows)
        np.add.at(self.restarts, rows, 1)

    def result(self, policy_version: int, texts: dict[int, NonTensorData]) -> TensorDict:
        store, E = self.store, self.E
        length = store.valid.sum(1)  # episodes are recorded from their first decision on
        T = int(length.max()) if E else 0
        traj = store.to_tensordict(seed=self.seed, policy_version=policy_version, texts=texts, t=T)
        out = TensorDict({}, batch_size=[E])
        for key, value in traj.items(include_nested=True, leaves_only=True):
            out.set(key, value)
        out.set(schema.INSTRUCTION, traj.get(schema.INSTRUCTION))
        done = store.next_field("terminated", T) | store.next_field("truncated", T)
        last = np.maximum(length - 1, 0)
        out.set("length", torch.from_numpy(length.astype(np.int64)))
        out.set("env_steps", torch.from_numpy(store.next_field("steps", T).sum(1).astype(np.int64)))
        out.set("success", torch.from_numpy(store.next_field("success", T)[np.arange(E), last]))
        out.set("group_id", torch.from_numpy(np.arange(E) // self.group_size))
        out.set("restarts", torch.from_numpy(self.restarts))
        if not done[np.arange(E), last].all():
            raise EngineError("collect_episodes returned an unfinished episode (engine bug)")
        return out
