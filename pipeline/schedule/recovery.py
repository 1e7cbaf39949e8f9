"""Recovery: replace a failed worker and bring every stage back to a consistent state.

Every other env goes on exactly as it would have: the healthy workers finish the commands
they have, their results are recorded as usual, and no seed or episode id of theirs changes.
The failed worker's running episodes end as aborted (masked) and are re-run from their reset
with the same ids and seeds, so their retries are the trajectories the fault interrupted.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.backends import WorkerBackend
from pipeline.errors import EngineError
from pipeline.record.plans import Plan
from pipeline.runtime import protocol as P
from pipeline.runtime.spans import PhaseSwitch
from pipeline.schedule.stages import Stage, StageState
from pipeline.schedule.turns import Turns


class Recovery:
    """Replaces failed workers under the backend's restart budget.

    Example:
        >>> try:
        ...     runner.run(plan)
        ... except EngineError as exc:
        ...     recovery.recover(exc, plan)     # or re-raises exc
    """

    def __init__(
        self,
        pool: WorkerBackend,
        turns: Turns,
        stages: list[Stage],
        env_worker: np.ndarray,
        start_timeout_s: float,
        phase: PhaseSwitch,
    ) -> None:
        self.pool, self.turns, self.stages, self.env_worker = pool, turns, stages, env_worker
        self.channel, self.a = turns.channel, turns.a
        self.start_timeout_s, self.phase = start_timeout_s, phase

    def recover(self, exc: EngineError, plan: Plan) -> None:
        """Replace the worker ``exc`` is about and restart the episodes that ran on its envs,
        or re-raise ``exc`` (``on_worker_failure="raise"``, budget spent, not one worker).
        Another worker failing meanwhile is replaced too."""
        while True:
            if not self.pool.can_replace(exc):
                raise exc
            self.phase("bookkeeping")
            try:
                t0 = time.perf_counter_ns()
                try:
                    replaced = self.pool.replace(exc.worker, exc, self.start_timeout_s)
                finally:
                    self.turns.stats.replace_ns += time.perf_counter_ns() - t0
                self.turns.stats.restarts += 1
                for s in self.stages:
                    s.lost.update(w for w in replaced if w in s.workers)
                for s in self.stages:
                    self.resync(s, plan)
                return
            except EngineError as again:
                if again is exc:  # not replaced: the budget is spent, or it always fails
                    raise
                exc = again

    def resync(self, s: Stage, plan: Plan) -> None:
        """Bring stage ``s`` back to READY after its workers in ``s.lost`` were replaced.
        Safe to call again after a failure half-way: each step is done once."""
        a = self.a
        if not s.lost:
            return
        if s.state is StageState.STEPPING:
            if not s.healthy_in:  # the healthy workers' replies to the command in flight
                self.channel.collect_healthy(s)
                s.healthy_in = True
            target = 1 - s.slot
        else:
            self.turns.record_results(s, plan)  # the current slot's rows are rewritten below
            s.prepared, s.state = None, StageState.READY
            target = s.slot
        for w in sorted(s.lost):
            mine = s.env_ids[self.env_worker[s.lo : s.hi] == w]
            # An env the in-flight RESET was starting keeps its queued episode; one running
            # an episode re-runs it from its reset (same id and seed); the others stay parked.
            starting = np.zeros(len(mine), bool)
            if s.state is StageState.STEPPING and s.in_flight == P.RESET:
                starting = a["reset_now"][mine] == 1
            retry = (a["parked"][s.slot, mine] == 0) & ~starting
            saved = a["next_seed"][mine].copy(), a["next_episode"][mine].copy()
            a["next_seed"][mine] = np.where(
                retry, a["reset_seed"][s.slot, mine], np.where(starting, saved[0], -1)
            )
            a["next_episode"][mine] = np.where(
                retry, a["episode_id"][s.slot, mine], np.where(starting, saved[1], -1)
            )
            a["reset_now"][mine] = 1
            try:
                self.channel.reset_one(w, s, target)
            finally:
                # What was queued after the retried episodes is queued again (the worker
                # has read the control arrays, or will be replaced and read them again).
                a["next_seed"][mine], a["next_episode"][mine] = saved
            s.aborts.append((mine[retry], a["episode_id"][s.slot, mine][retry]))
            s.lost.discard(w)
        if target != s.slot:
            self.channel.finish(s)
            s.last_turn = (time.perf_counter_ns() - s.turn_t0, s.turn_policy_ns)
            self.turns.record_results(s, plan)
        s.healthy_in = False
        for envs, episodes in s.aborts:
            plan.abort(envs, episodes)
        s.aborts.clear()
