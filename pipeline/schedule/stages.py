"""Stages and their policy batches.

The envs are split into fixed groups, the stages. A stage's envs are contiguous rows of the
shared arrays, so its batch is a block of zero-copy views per field. :class:`StageBatcher`
turns a stage's current slot into the policy's TensorDict: observations, sample seeds and
instructions; or, for dynamic batching (single-env stages, each in its own slot), gathers
any set of stages into one batch.
"""

from __future__ import annotations

import enum

import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict

from pipeline import schema
from pipeline.record.store import Dest
from pipeline.runtime.layout import Layout
from pipeline.schedule.lookahead import prefix_fields
from pipeline.seeding import sample_seeds


class StageState(enum.Enum):
    """Where a stage is in its turn.

    ``READY`` -> (decide: policy, STEP sent) -> ``STEPPING`` -> (results in) -> ``READY``;
    ``READY`` becomes ``PREPARED`` when its next batch is built ahead, during another stage's
    policy call.
    """

    READY = "ready"  # observations in `slot` await a decision; no command in flight
    PREPARED = "prepared"  # READY, and the policy batch for `slot` is already built
    STEPPING = "stepping"  # a STEP is in flight: the workers are writing `1 - slot`


class Stage:
    """A fixed group of envs: ids ``lo..hi`` and the workers holding them."""

    def __init__(self, index: int, lo: int, hi: int, workers: list[int]) -> None:
        self.index, self.lo, self.hi, self.workers = index, lo, hi, workers
        self.env_ids = np.arange(lo, hi)
        self.state = StageState.READY
        self.slot = 0  # slot holding the stage's current observations
        self.seq = 0  # sequence number of the last command sent
        self.in_flight = 0  # the kind of that command (protocol.STEP or RESET)
        self.pending: Dest | None = None  # a decision whose results are not yet recorded
        self.prepared: tuple | None = None  # (batch, copy event) when PREPARED
        # Recovery: workers replaced whose envs here are not restarted yet, whether the
        # healthy workers' replies to the command in flight are in, episodes to abort.
        self.lost: set[int] = set()
        self.healthy_in = False
        self.aborts: list[tuple[np.ndarray, np.ndarray]] = []
        self.turn_t0 = self.turn_policy_ns = 0  # the turn in progress
        self.last_turn = (0, 0)  # (turn ns, policy ns) of the last turn whose results are in
        self.ready_ns = 0  # when it last became READY (dynamic batching: longest-waiting first)

    @property
    def size(self) -> int:
        return self.hi - self.lo

    def __repr__(self) -> str:
        return f"Stage({self.index}, envs {self.lo}..{self.hi - 1}, {self.state.value})"


def make_stages(
    num_envs: int, num_workers: int, num_stages: int | None, first: int = 0
) -> list[Stage]:
    """The loop's stages: ``num_stages`` contiguous groups of envs, every worker holding envs
    of every stage (env ``i`` lives on worker ``i % num_workers``; the partition is checked
    by :class:`~pipeline.config.EngineConfig`), or, with ``None`` (dynamic batching), one
    single-env stage per env: each has its own slot, sequence and command, so it is ready
    the moment its worker finishes it, whatever the other envs do. Their indices (the
    workers' names for them) start at ``first``."""
    if num_stages is None:
        return [Stage(first + i, i, i + 1, [i % num_workers]) for i in range(num_envs)]
    per = num_envs // num_stages
    workers = list(range(num_workers))
    return [Stage(first + g, g * per, (g + 1) * per, workers) for g in range(num_stages)]


def memberships(num_envs: int, *partitions: list[Stage]) -> list[tuple[int, ...]]:
    """Per env, the indices of the stages it belongs to, one per partition: what each worker
    is told, so that it answers a command to any of them.

    Example:
        >>> memberships(4, make_stages(4, 2, None), make_stages(4, 2, 2, first=4))
        [(0, 4), (1, 4), (2, 5), (3, 5)]
    """
    out: list[list[int]] = [[] for _ in range(num_envs)]
    for stages in partitions:
        for s in stages:
            for e in range(s.lo, s.hi):
                out[e].append(s.index)
    return [tuple(x) for x in out]


class StageBatcher:
    """Builds a stage's policy batch straight from shared memory.

    Example:
        >>> batcher = StageBatcher(layout, shm.arrays, seed=0)
        >>> td = batcher.batch(stage)   # observation views, sample_seed, language_instruction
    """

    def __init__(
        self,
        layout: Layout,
        arrays: dict[str, np.ndarray],
        seed: int,
        pin_memory: bool = False,
        overlap: int | None = None,
    ) -> None:
        self.a, self.seed, self.layout, self.pin_memory = arrays, seed, layout, pin_memory
        self.overlap = overlap  # with lookahead: the prefix keys go into every batch
        n = self.num_envs = layout.num_envs
        # gather()'s reused buffers (pinned on CUDA); per field, the shared array as a
        # [slots * envs, ...] view and the buffer's numpy view, the pair each gather copies
        # between; per batch size, the observation TensorDict over the buffers' first rows.
        self._gathered: dict[str, torch.Tensor] | None = None
        self._gather_pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self._gathered_obs: dict[int, TensorDict] = {}
        self._seed_base = np.zeros(n, np.int64)  # sample_seeds(seed, episode, 0) cache
        self._seed_episode = np.full(n, -2, np.int64)
        # Per stage: (the episode ids its rows held, their instructions' stack).
        self._instruction_cache: dict[int, tuple[bytes, NonTensorStack]] = {}
        self.episode_text: dict[int, NonTensorData] = {}  # this call's episodes' instructions
        self._text_items: dict[str, NonTensorData] = {}  # this call's texts, one item each
        # Per (stage, slot), the observation TensorDict of zero-copy views a stage batch is
        # made of, built on first use; each turn only wraps it with seeds and instructions.
        self._sources: dict[tuple[int, int], TensorDict] = {}

    @staticmethod
    def _observation(fields: dict[str, torch.Tensor], b: int) -> TensorDict:
        """Observation tensors ``[b, ...]`` by spec key, in the canonical layout (images as
        ``[b, C, H, W]`` views of the ``[b, H, W, C]`` memory)."""
        obs = TensorDict({}, batch_size=[b])
        for key, x in fields.items():
            if key.startswith("image/"):
                obs.set(("image", key.split("/", 1)[1]), x.permute(0, 3, 1, 2))
            else:
                obs.set(key, x)
        return obs

    def _source(self, s: Stage) -> TensorDict:
        obs = self._sources.get((s.index, s.slot))
        if obs is None:
            views = {
                key: torch.from_numpy(self.a[f"obs/{key}"][s.slot, s.lo : s.hi])
                for key in self.layout.obs_keys
            }
            obs = self._sources[s.index, s.slot] = self._observation(views, s.size)
        return obs

    def new_call(self) -> None:
        """Forget instructions: each call returns the texts of its own episodes."""
        self._instruction_cache.clear()
        self.episode_text, self._text_items = {}, {}

    def batch(self, s: Stage) -> TensorDict:
        # Every value is already checked (shared views of the right shapes), so skip the
        # constructor's validation, which costs more than the rest of the turn's bookkeeping.
        obs = self._source(s)
        source = {
            schema.OBSERVATION: _shallow(obs),
            schema.SAMPLE_SEED: torch.from_numpy(self._sample_seeds(s)),
            schema.INSTRUCTION: self._instructions(s.slot, s.env_ids, stage=s.index),
        }
        if self.overlap is not None:
            source["vla_action"] = self._prefix(s.slot, s.env_ids)
        return TensorDict._new_unsafe(source, batch_size=obs.batch_size)

    def gather(self, stages: list[Stage]) -> TensorDict:
        """One batch of the current observations of any stages (dynamic batching's envs,
        each in its own slot): one ``numpy.take`` per field into reused buffers (pinned on
        CUDA), since rows from anywhere cannot be a single view. The next gather rewrites
        the buffers; on CUDA their host-to-device copy is over by then, because the loop
        waits for the batch's action chunk, which the device computes after that copy.

        Example:
            >>> td = batcher.gather([stages[5], stages[2]])   # rows: env 5, env 2
        """
        b = len(stages)
        envs = np.fromiter((s.lo for s in stages), np.int64, b)
        slots = np.fromiter((s.slot for s in stages), np.int64, b)
        rows = slots * self.num_envs + envs
        if self._gathered is None:
            self._allocate_gather()
        for flat, out in self._gather_pairs:
            # numpy's take: cold (as after each policy wait) a third of index_select's cost;
            # "clip" since the rows are in range, and "raise" would buffer the copy
            np.take(flat, rows, axis=0, out=out[:b], mode="clip")
        obs = self._gathered_obs.get(b)
        if obs is None:
            views = {key: out[:b] for key, out in self._gathered.items()}
            obs = self._gathered_obs[b] = self._observation(views, b)
        source = {
            schema.OBSERVATION: _shallow(obs),
            schema.SAMPLE_SEED: torch.from_numpy(self._seeds_at(slots, envs)),
            schema.INSTRUCTION: self._instructions(slots, envs),
        }
        if self.overlap is not None:
            source["vla_action"] = self._prefix(slots, envs)
        return TensorDict._new_unsafe(source, batch_size=obs.batch_size)

    def _allocate_gather(self) -> None:
        self._gathered = {}
        for key, fs in self.layout.spec.obs.items():
            dtype = torch.from_numpy(np.zeros(0, fs.dtype)).dtype
            buf = torch.empty((self.num_envs, *fs.shape), dtype=dtype, pin_memory=self.pin_memory)
            self._gathered[key] = buf
            shared = self.a[f"obs/{key}"]
            flat = shared.reshape(-1, *shared.shape[2:])
            if not np.may_share_memory(flat, shared):  # a copy, kept, would go stale
                raise RuntimeError(f"obs/{key} is not one [slots, envs, ...] block of memory")
            self._gather_pairs.append((flat, buf.numpy()))

    def _prefix(self, slots: int | np.ndarray, envs: np.ndarray) -> TensorDict:
        """The lookahead prefix of the observations in ``[slots, envs]`` (small copies)."""
        fields = prefix_fields(self.a, slots, envs, self.overlap)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in fields.items()}
        return TensorDict._new_unsafe(tensors, batch_size=torch.Size([len(envs)]))

    def _sample_seeds(self, s: Stage) -> np.ndarray:
        return self._seeds_at(s.slot, s.env_ids)

    def _seeds_at(self, slots: int | np.ndarray, envs: np.ndarray) -> np.ndarray:
        """One seed per (episode, decision) (``seeding.sample_seeds``) for the observations
        in ``[slots, envs]``, with the per-episode bases cached."""
        episode = self.a["episode_id"][slots, envs]
        known = self._seed_episode[envs]
        if episode.tobytes() != known.tobytes():  # a tenth of `(episode != known).any()`
            stale = episode != known
            self._seed_base[envs[stale]] = sample_seeds(self.seed, episode[stale], 0)
            self._seed_episode[envs[stale]] = episode[stale]
        return self._seed_base[envs] + self.a["t"][slots, envs]

    def _text(self, slot: int, env: int, episode: int) -> NonTensorData:
        """The instruction of ``episode``, read from ``[slot, env]`` the first time the call
        meets it (and kept for the trajectory store): an episode's text is written with its
        reset and never changes, so the episode id is the whole key. Episodes with the same
        text share one item (making one costs ~20 us, and tasks repeat their texts)."""
        item = self.episode_text.get(episode)
        if item is None:
            n = self.a["instruction_len"][slot, env]
            text = bytes(self.a["instruction"][slot, env, :n]).decode("utf-8", "replace")
            item = self._text_items.get(text)
            if item is None:
                item = self._text_items[text] = NonTensorData(text)
            self.episode_text[episode] = item
        return item

    def _instructions(
        self, slots: int | np.ndarray, envs: np.ndarray, stage: int | None = None
    ) -> NonTensorStack:
        """The instructions of the observations in ``[slots, envs]``, the one path for stage
        batches and gathers. A stage's stack is reused while its rows hold the same episodes
        (compared by id, whatever batches met them in between), so a turn without a new
        episode builds nothing."""
        episodes = self.a["episode_id"][slots, envs]
        key = episodes.tobytes()  # comparing bytes: a tenth of np.array_equal's cost
        if stage is not None:
            cached = self._instruction_cache.get(stage)
            if cached is not None and cached[0] == key:
                return cached[1]
        slot_list = [int(slots)] * len(envs) if np.ndim(slots) == 0 else slots.tolist()
        stack = schema.text_stack(
            [
                self._text(slot, env, episode)
                for slot, env, episode in zip(
                    slot_list, envs.tolist(), episodes.tolist(), strict=True
                )
            ]
        )
        if stage is not None:
            self._instruction_cache[stage] = (key, stack)
        return stack


def _shallow(obs: TensorDict) -> TensorDict:
    """A shallow copy of a cached observation TensorDict, so that a policy that adds
    observation keys cannot alter the cache."""
    return obs._new_unsafe(dict(obs._tensordict), obs.batch_size)
