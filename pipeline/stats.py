"""The engine's counters: cheap to keep per turn, folded once per call."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from pipeline.runtime.layout import RESULT_DTYPE

TURN_SAMPLES = 1 << 16  # bounded: an engine may live for millions of turns


@dataclass
class EngineStats:
    """Cumulative counters of an engine (``engine.stats``; ``reset()`` to start a window).

    Worker times come from the workers themselves (per env, through shared memory); the
    others are measured in the inference loop with ``perf_counter_ns``.

    Example:
        >>> engine.stats.reset(); engine.rollout(8)
        >>> engine.stats.env_steps, np.median(engine.stats.turn_ns)
    """

    num_workers: int
    decisions: int = 0
    env_steps: int = 0
    policy_ns: int = 0
    # Per stage turn (the most recent TURN_SAMPLES): decide start -> results in, the policy's
    # share of it, and the slowest worker's env time in it.
    turn_ns: deque = field(default_factory=deque)
    turn_policy_ns: deque = field(default_factory=deque)
    turn_env_ns: deque = field(default_factory=deque)
    batch_sizes: deque = field(default_factory=deque)  # rows of each policy call
    record_ns: int = 0  # copying decisions into the trajectory store
    restarts: int = 0  # workers replaced (``engine.failures`` says why)
    replace_ns: int = 0  # the loop's time inside those replacements (a spare shortens it)
    async_calls: int = 0  # collect_episodes_async calls started
    stale_dropped: int = 0  # episodes dropped as older than max_staleness, collected again
    fixed_stage_calls: int = 0  # calls of schedule="dynamic" run on its rule's fixed stages
    worker_env_ns: np.ndarray = None
    worker_write_ns: np.ndarray = None
    # Per stage turn: (turn ns, policy ns, the stage's result records); folded into the
    # counters once per call, so the turn itself only copies the records.
    _turns: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.decisions = self.env_steps = self.policy_ns = 0
        self.record_ns = self.restarts = self.async_calls = self.stale_dropped = 0
        self.replace_ns = self.fixed_stage_calls = 0
        self.turn_ns, self.turn_policy_ns, self.turn_env_ns, self.batch_sizes = (
            deque(maxlen=TURN_SAMPLES) for _ in range(4)
        )
        self.worker_env_ns = np.zeros(self.num_workers, np.int64)
        self.worker_write_ns = np.zeros(self.num_workers, np.int64)

    def log_turn(self, turn_ns: int, policy_ns: int, raw_records: np.ndarray) -> None:
        """One stage turn: its timings and a copy of its result records (raw items)."""
        self._turns.append((turn_ns, policy_ns, raw_records.copy()))

    def log_turns(self, turns: list[tuple[int, int]], raw_records: np.ndarray) -> None:
        """Turns of single-env stages (a dynamic batch): ``(turn ns, policy ns)`` each, and
        their result records ``[turns]``, already a copy."""
        self._turns.extend((t, p, r) for (t, p), r in zip(turns, raw_records[:, None], strict=True))

    def fold(self, decisions: int, env_worker: np.ndarray) -> None:
        """Add this call's turns: per-worker env and write times, the slowest worker's env
        time per turn, env steps and decisions, all from the result records."""
        log, self._turns = self._turns, []
        self.decisions += decisions
        if not log:
            return
        records = np.stack([r for _, _, r in log]).view(RESULT_DTYPE)  # [turns, stage envs]
        owner = env_worker[records["env_id"]][..., None] == np.arange(self.num_workers)
        env_ns = (records["env_ns"][..., None] * owner).sum(1)  # [turns, workers]
        self.worker_env_ns += env_ns.sum(0)
        self.worker_write_ns += (records["write_ns"][..., None] * owner).sum((0, 1))
        self.env_steps += int(records["steps"].sum())
        self.turn_ns.extend(t for t, _, _ in log)
        self.turn_policy_ns.extend(p for _, p, _ in log)
        self.turn_env_ns.extend(env_ns.max(1).tolist())
