"""Stages and their policy batches.

The envs are split into fixed groups, the stages. A stage's envs are contiguous rows of the
shared arrays, so its batch is a block of zero-copy views per field. :class:`StageBatcher`
turns a stage's current slot into the policy's TensorDict: observations, sample seeds and
instructions.
"""

from __future__ import annotations

import enum

import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict

from pipeline import schema
from pipeline.layout import SLOTS, Layout
from pipeline.recorder import Dest
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

    @property
    def size(self) -> int:
        return self.hi - self.lo

    def __repr__(self) -> str:
        return f"Stage({self.index}, envs {self.lo}..{self.hi - 1}, {self.state.value})"


class StageBatcher:
    """Builds a stage's policy batch straight from shared memory.

    Example:
        >>> batcher = StageBatcher(layout, shm.arrays, stages, seed=0)
        >>> td = batcher.batch(stage)   # observation views, sample_seed, language_instruction
    """

    def __init__(
        self, layout: Layout, arrays: dict[str, np.ndarray], stages: list[Stage], seed: int
    ) -> None:
        self.a, self.seed = arrays, seed
        n = layout.num_envs
        self._seed_base = np.zeros(n, np.int64)  # sample_seeds(seed, episode, 0) cache
        self._seed_episode = np.full(n, -2, np.int64)
        self._instruction_cache: dict[int, NonTensorStack] = {}  # per stage, until a reset
        self.episode_text: dict[int, NonTensorData] = {}  # this call's episodes' instructions
        self._sources = self._make_sources(layout, arrays, stages)

    @staticmethod
    def _make_sources(layout, arrays, stages) -> dict[tuple[int, int], TensorDict]:
        """Per (stage, slot), the observation TensorDict of zero-copy views a policy batch
        is made of. Built once: each turn only wraps it with the seeds and instructions."""
        sources = {}
        for s in stages:
            for slot in range(SLOTS):
                obs = TensorDict({}, batch_size=[s.size])
                for key in layout.obs_keys:
                    x = torch.from_numpy(arrays[f"obs/{key}"][slot, s.lo : s.hi])
                    if key.startswith("image/"):
                        obs.set(("image", key.split("/", 1)[1]), x.permute(0, 3, 1, 2))
                    else:
                        obs.set(key, x)
                sources[s.index, slot] = obs
        return sources

    def new_call(self) -> None:
        """Forget instructions: each call returns the texts of its own episodes."""
        self._instruction_cache.clear()
        self.episode_text = {}

    def batch(self, s: Stage) -> TensorDict:
        # Every value is already checked (shared views of the right shapes), so skip the
        # constructor's validation, which costs more than the rest of the turn's bookkeeping.
        obs = self._sources[s.index, s.slot]
        source = {
            # a shallow copy, so a policy that adds observation keys cannot alter the cache
            schema.OBSERVATION: obs._new_unsafe(dict(obs._tensordict), obs.batch_size),
            schema.SAMPLE_SEED: torch.from_numpy(self._sample_seeds(s)),
            schema.INSTRUCTION: self._instructions(s),
        }
        return TensorDict._new_unsafe(source, batch_size=obs.batch_size)

    def _sample_seeds(self, s: Stage) -> np.ndarray:
        """One seed per (episode, decision) (``seeding.sample_seeds``), with the per-episode
        bases cached."""
        lo, hi = s.lo, s.hi
        episode = self.a["episode_id"][s.slot, lo:hi]
        stale = episode != self._seed_episode[lo:hi]
        if stale.any():
            self._seed_base[lo:hi][stale] = sample_seeds(self.seed, episode[stale], 0)
            self._seed_episode[lo:hi][stale] = episode[stale]
        return self._seed_base[lo:hi] + self.a["t"][s.slot, lo:hi]

    def _instructions(self, s: Stage) -> NonTensorStack:
        """The stage's instructions as the batch's NonTensorStack. An instruction changes only
        when an episode starts (``is_init``), so the stack is cached per stage until then.
        Each episode's text is also kept for the trajectory store."""
        a, lo, hi = self.a, s.lo, s.hi
        cached = self._instruction_cache.get(s.index)
        if cached is not None and not a["is_init"][s.slot, lo:hi].any():
            return cached
        raw, n = a["instruction"][s.slot, lo:hi], a["instruction_len"][s.slot, lo:hi]
        items = []
        for i, episode in enumerate(a["episode_id"][s.slot, lo:hi].tolist()):
            item = self.episode_text.get(episode)
            if item is None:
                text = bytes(raw[i, : n[i]]).decode("utf-8", "replace")
                item = self.episode_text[episode] = NonTensorData(text)
            items.append(item)
        stack = self._instruction_cache[s.index] = NonTensorStack(*items)
        return stack
