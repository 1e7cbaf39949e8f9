"""One turn of the loop, for one stage or a dynamic batch of them.

A turn: batch the observations straight from shared memory (:meth:`Turns.infer` via the
batcher, on CUDA through the side stream), run the policy, validate its output and land the
chunks (:class:`~pipeline.schedule.actions.ActionPath`), send one STEP frame per worker
(:class:`~pipeline.schedule.channel.Channel`), then record the decision while the workers
step (:meth:`Turns.dispatch`). The schedulers in :mod:`pipeline.schedule.runners` only
decide which stages take a turn when.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from pipeline.errors import EngineError
from pipeline.profiler.session import ProfileSession
from pipeline.record.plans import Plan
from pipeline.record.store import Dest
from pipeline.runtime import protocol as P
from pipeline.runtime.spans import PhaseSwitch
from pipeline.schedule.actions import ActionPath
from pipeline.schedule.channel import Channel
from pipeline.schedule.stages import Stage, StageBatcher, StageState
from pipeline.stats import EngineStats


class Turns:
    """The steps of a turn, shared by every scheduler.

    Example:
        >>> out = turns.infer([stage])            # batch, then the policy call
        >>> turns.dispatch([stage], out, plan)    # actions out, STEP sent, decision recorded
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        batcher: StageBatcher,
        actions: ActionPath,
        channel: Channel,
        stats: EngineStats,
        phase: PhaseSwitch,
        running_profiler: Callable[[], ProfileSession | None],
        auto_reset: bool,
    ) -> None:
        self.policy, self.batcher, self.actions, self.channel = policy, batcher, actions, channel
        self.stats, self.phase, self.running_profiler = stats, phase, running_profiler
        self.auto_reset, self.cuda = auto_reset, actions.cuda
        self.a = channel.a

    def prefetch(self, s: Stage) -> None:
        """If stage ``s``'s workers are done, collect it and build its next batch now (while
        another stage's policy call runs), so its host-to-device copy overlaps that compute."""
        if s.state is not StageState.STEPPING or not self.channel.done(s):
            return
        self.channel.await_turn(s)
        self.phase("preprocess")
        s.prepared = self.prepare([s])
        s.state = StageState.PREPARED

    def prepare(self, stages: list[Stage]) -> tuple:
        """The policy batch of one stage (zero-copy views) or of several (a gather), on the
        device; on CUDA the copy is queued on the side stream and not waited for here."""
        if len(stages) == 1:
            td = self.batcher.batch(stages[0])
        else:
            td = self.batcher.gather(stages)
        if self.cuda is None:
            return td, None
        return self.cuda.to_device(td, self.running_profiler())

    def infer(self, stages: list[Stage]):
        """Start a turn: the batch (built ahead if prefetched), then the policy call."""
        t0 = time.perf_counter_ns()
        self.phase("preprocess")
        s = stages[0]
        prepared = len(stages) == 1 and s.state is StageState.PREPARED
        td, copied = s.prepared if prepared else self.prepare(stages)
        s.prepared = None
        if copied is not None:
            self.cuda.wait(copied)
        self.phase("inference")
        profiler = self.running_profiler() if self.cuda is not None else None
        gpu = profiler.cuda_mark() if profiler else None
        t_policy = time.perf_counter_ns()
        out = self.policy(td)
        policy_ns = time.perf_counter_ns() - t_policy
        if gpu is not None:
            profiler.cuda_interval("inference", gpu, profiler.cuda_mark())
        for x in stages:
            x.turn_t0, x.turn_policy_ns = t0, policy_ns
        self.stats.batch_sizes.append(len(td))
        return out

    def dispatch(self, stages: list[Stage], out, plan: Plan) -> None:
        """End a turn: validate and send the actions, then record while the workers step.
        Several stages are a dynamic batch of single-env stages, queued and recorded by
        block copies over the batch, with no Python per row."""
        self.phase("dispatch")
        self.stats.policy_ns += stages[0].turn_policy_ns
        outputs = self.actions.take(stages, out)
        if len(stages) == 1:
            self.queue_episodes(stages[0], plan)
        else:
            slots = np.fromiter((c.slot for c in stages), np.int64, len(stages))
            envs = np.fromiter((c.lo for c in stages), np.int64, len(stages))
            self.queue_cell_episodes(envs, slots, plan)
        failed = self.channel.command(stages, P.STEP)
        self.phase("record")
        t_record = time.perf_counter_ns()
        if len(stages) == 1:
            self.record_results(stages[0], plan)  # the previous decision's, while workers step
            stages[0].pending = plan.record(stages[0], outputs)
        else:
            self.record_cell_results(stages, plan)
            plan.record_cells(stages, slots, envs, outputs)
        self.stats.record_ns += time.perf_counter_ns() - t_record
        self.phase("bookkeeping")
        if failed is not None:  # raised only now: the decision is recorded like any other
            raise failed

    def queue_episodes(self, s: Stage, plan: Plan) -> None:
        """Before a STEP: every env whose queued episode has already started gets the plan's
        next one, so an episode that ends during the chunk restarts at once in the worker."""
        if not self.auto_reset:
            return
        lo, hi = s.lo, s.hi
        started = self.a["next_episode"][lo:hi] == self.a["episode_id"][s.slot, lo:hi]
        for i in s.env_ids[started]:
            plan.next_episode(int(i))

    def queue_cell_episodes(self, envs: np.ndarray, slots: np.ndarray, plan: Plan) -> None:
        """:meth:`queue_episodes` for a dynamic batch (env ``envs[j]`` in ``slots[j]``)."""
        if not self.auto_reset:
            return
        started = self.a["next_episode"][envs] == self.a["episode_id"][slots, envs]
        for i in envs[started].tolist():
            plan.next_episode(i)

    def record_cell_results(self, cells: list[Stage], plan: Plan) -> None:
        """:meth:`record_results` for a dynamic batch: the cells' pending results, by block
        copies."""
        done = [c for c in cells if c.pending is not None]
        if not done:
            return
        slots = np.fromiter((c.slot for c in done), np.int64, len(done))
        envs = np.fromiter((c.lo for c in done), np.int64, len(done))
        live = [j for j, c in enumerate(done) if c.pending.n]
        rows, ts = np.array([done[j].pending.block for j in live], np.int64).reshape(-1, 2).T
        dest = Dest.scatter(rows, ts, np.array(live, np.int64))
        plan.store.record_gathered_results(dest, slots, envs)
        self.stats.log_turns([c.last_turn for c in done], self.a["results_raw"][slots, envs])
        for c in done:
            c.pending = None

    def record_results(self, s: Stage, plan: Plan) -> None:
        """Record the results of the stage's last decision, if not yet recorded."""
        if s.pending is None:
            return
        # Whether or not the stage's next STEP is out, its results sit in the current slot.
        plan.store.record_results(s.pending, s.slot, s.lo, s.hi)
        self.stats.log_turn(*s.last_turn, self.a["results_raw"][s.slot, s.lo : s.hi])
        s.pending = None

    def begin(
        self,
        stages: list[Stage],
        plan: Plan,
        started: np.ndarray,
        recover: Callable[[EngineError, Plan], None],
    ) -> None:
        """Queue each stage's first episodes and reset the envs that start one: all of them
        for ``collect_episodes``; for ``rollout``, those that never ran (``started`` False)
        or whose episode ended with no auto-reset (the others carry on with their episodes).
        Every stage's RESET goes out before any reply is awaited, so the workers reset in
        parallel."""
        resetting = []
        for s in stages:
            s.prepared, s.state = None, StageState.READY  # nothing built ahead survives a call
            if plan.restart_all:
                fresh = np.ones(s.size, bool)
            else:
                fresh = ~started[s.lo : s.hi] | (self.a["parked"][s.slot, s.lo : s.hi] == 1)
            for i in s.env_ids[fresh]:
                plan.next_episode(int(i))
            if fresh.any():
                self.a["reset_now"][s.lo : s.hi] = fresh
                resetting.append(s)
            started[s.lo : s.hi] = True
        self._reset(resetting, plan, recover, "resetting")
        now = time.perf_counter_ns()
        for s in stages:
            s.ready_ns = now

    def _reset(
        self,
        stages: list[Stage],
        plan: Plan,
        recover: Callable[[EngineError, Plan], None],
        doing: str,
    ) -> None:
        """Send every stage its RESET (as ``reset_now`` says), then await them all."""
        failed = self.channel.command(stages, P.RESET)
        if failed is not None:
            recover(failed, plan)  # completes the resets of the replaced worker's envs
        for s in stages:
            while s.state is StageState.STEPPING:
                try:
                    self.channel.collect(s, doing)
                except EngineError as exc:
                    recover(exc, plan)

    def hand_over(
        self,
        old: list[Stage],
        new: list[Stage],
        plan: Plan,
        recover: Callable[[EngineError, Plan], None],
    ) -> None:
        """Move the envs from one partition into stages to another (the adaptive rule's
        switch between single-env stages and fixed ones), between calls. A stage's rows
        must all sit in its slot, so the old stages whose rows are in the other slot than
        the new stage's are carried over by a RESET that resets nothing (the worker copies
        each row forward, as ``begin`` does for envs that go on), ``recover`` standing by
        as in ``begin``; then each new stage is READY in that slot."""
        slot = np.zeros(len(self.a["next_seed"]), np.int64)
        for s in old:
            slot[s.lo : s.hi] = s.slot
        target = slot.copy()
        for s in new:  # the slot most of its rows are in: the fewest carried
            target[s.lo : s.hi] = np.bincount(slot[s.lo : s.hi], minlength=2).argmax()
        carried = []
        for s in old:
            off = target[s.lo : s.hi] != s.slot
            if off.all():
                carried.append(s)
            elif off.any():
                raise EngineError(f"{s} straddles stages of the new partition (engine bug)")
        for s in carried:
            self.a["reset_now"][s.lo : s.hi] = 0
        self._reset(carried, plan, recover, "handing over")
        for s in new:
            s.slot, s.state, s.prepared = int(target[s.lo]), StageState.READY, None
