"""The loop's strategies, siblings behind one ``run(plan)``: which stages take a turn when.

- :class:`SyncRunner` (``mode="sync"``): each stage is inferred, stepped and awaited in turn;
  with one stage that is the SimpleVLA-RL lock-step baseline.
- :class:`PipelinedRunner` (``mode="pipelined"``): infer for stage g while the workers step
  the others, and build the next stage's batch during g's policy call.
- :class:`DynamicRunner` (``schedule="dynamic"``): every env is a stage; infer for whichever
  are ready, longest-waiting first, as the :class:`~pipeline.schedule.dynamic.Batching` rule
  allows. The adaptive rule may choose fixed stages instead; the engine then runs the
  pipelined strategy over them from its next call on, and hands the rule every turn there too.

Every strategy makes the same decisions for each stage in the same order, and every seed is
derived from ids, so their trajectories are bitwise identical (dynamic: for a batch-invariant
policy). A runner returns when the plan wants no more decisions and nothing is in flight; an
:class:`~pipeline.errors.EngineError` leaves the stages' states as they are, so after a
recovery ``run`` resumes from them.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from typing import NamedTuple, Protocol

import numpy as np

from pipeline.record.plans import Plan
from pipeline.runtime import protocol as P
from pipeline.schedule.dynamic import WAIT_FOR_REPLY, AdaptiveBatching, Batching
from pipeline.schedule.recovery import Recovery
from pipeline.schedule.stages import Stage, StageState
from pipeline.schedule.turns import Turns


class Runner(Protocol):
    def run(self, plan: Plan) -> None: ...


class SyncRunner:
    """One stage at a time: infer, step, await."""

    def __init__(self, turns: Turns, stages: list[Stage]) -> None:
        self.turns, self.stages = turns, stages

    def run(self, plan: Plan) -> None:
        turns, stages = self.turns, self.stages
        while any(plan.wants(s) for s in stages):
            for s in stages:
                if plan.wants(s):
                    turns.dispatch([s], turns.infer([s]), plan)
                    turns.channel.await_turn(s)


class PipelinedRunner:
    """Round-robin over the stages; a stage's turn runs while the others step. Given the
    adaptive rule (whose fallback these stages are), it hands it every turn."""

    def __init__(
        self, turns: Turns, stages: list[Stage], rule: AdaptiveBatching | None = None
    ) -> None:
        self.turns, self.stages, self.rule = turns, stages, rule

    def run(self, plan: Plan) -> None:
        turns, stages, rule = self.turns, self.stages, self.rule
        results = turns.a["results"]
        while True:
            progressed = False
            for g, s in enumerate(stages):
                if s.state is StageState.STEPPING:
                    turns.channel.await_turn(s)
                if not plan.wants(s):
                    continue
                env_ns = _chunk_ns(results, [s]) if rule else None
                out = turns.infer([s])
                free_ns = time.perf_counter_ns()
                # While this stage's policy call runs (asynchronously on CUDA), collect the
                # next stage if its workers are done and build its batch, so that its
                # host-to-device copy overlaps this stage's compute.
                turns.prefetch(stages[(g + 1) % len(stages)])
                if rule is None:
                    turns.dispatch([s], out, plan)
                else:
                    _dispatch_observed(turns, rule, [s], out, plan, env_ns, free_ns)
                progressed = True
            if not progressed and not any(s.state is StageState.STEPPING for s in stages):
                return


class DynamicRunner:
    """Dynamic batching over single-env stages, as its rule allows; an adaptive rule is
    handed every turn's measurements.

    Its bookkeeping is per reply and per batch row, never per env of the fleet: the ready
    envs wait in a queue in the order their replies were read, and each worker's envs in flight
    are counted. Scanning every env at every reply cost 0.14 ms per decision at 256 envs.
    """

    def __init__(
        self, turns: Turns, stages: list[Stage], rule: Batching | AdaptiveBatching
    ) -> None:
        self.turns, self.stages, self.rule = turns, stages, rule

    def run(self, plan: Plan) -> None:
        turns, rule, channel = self.turns, self.rule, self.turns.channel
        results = turns.a["results"]
        # Rebuilt at every call (a recovery ends one): the envs that want a decision now,
        # longest-waiting first, and how many envs each worker is stepping.
        ready = deque(
            sorted(
                (c for c in self.stages if c.state is StageState.READY and plan.wants(c)),
                key=lambda c: c.ready_ns,
            )
        )
        in_flight = Counter(c.workers[0] for c in self.stages if c.state is StageState.STEPPING)
        # Sleeping through replies (below) relies on no env replying quicker than a chunk
        # is measured to take. An env that ended with no auto-reset replies at once, and
        # with lookahead a reply may come with no stepping (the episode ended within the
        # prefix), whose readiness automatic lookahead also times: no sleeping then.
        may_sleep = turns.auto_reset and not channel.lookahead.enabled
        wait = 0
        while True:
            busy = sorted(w for w, n in in_flight.items() if n)
            for c in channel.harvest(busy, wait):  # in the order read, worker by worker
                in_flight[c.workers[0]] -= 1
                if plan.wants(c):
                    ready.append(c)
            more = any(in_flight.values())
            if not ready and not more:
                return
            oldest = ready[0].ready_ns if ready else 0
            wait = rule.wait_ns(len(ready), oldest, time.perf_counter_ns(), more)
            if wait is not None:
                quiet = _quiet_ns(len(ready), in_flight, rule) if may_sleep else 0.0
                if wait != WAIT_FOR_REPLY and quiet > 0:
                    # Until then no reply can fill the batch or end the stepping (as far as
                    # the measured chunk times tell): sleep instead of waking for each (a
                    # wake-up per reply was most of the loop's CPU at 256 envs), then take
                    # them all. Their readiness is stamped when taken, so a turn's measured
                    # time includes up to this sleep.
                    channel.phase("wait_obs")
                    time.sleep(min(wait, quiet) / 1e9)
                    wait = 0
                continue
            wait = 0
            batch = [ready.popleft() for _ in range(min(rule.max_batch, len(ready)))]
            for c in batch:
                in_flight[c.workers[0]] += 1
            if not rule.learns:
                turns.dispatch(batch, turns.infer(batch), plan)
                continue
            env_ns = _chunk_ns(results, batch)
            out = turns.infer(batch)
            _dispatch_observed(turns, rule, batch, out, plan, env_ns, time.perf_counter_ns())


def _chunk_ns(results: np.ndarray, stages: list[Stage]) -> np.ndarray:
    """The stages' envs' last chunk times, for the rule: 0 where their last command was a
    RESET, whose time is a reset's, not a chunk's (at 0.5 ms against 8 ms chunks, the first
    round's resets made a CV 0.5 fleet look like CV 1.2 to the rule's first fit)."""
    if len(stages) == 1:
        s = stages[0]
        ns = np.array(results[s.slot, s.lo : s.hi]["env_ns"])
        return ns if s.in_flight == P.STEP else np.zeros_like(ns)
    return np.array(
        [results[c.slot, c.lo]["env_ns"] if c.in_flight == P.STEP else 0 for c in stages]
    )


def _dispatch_observed(
    turns: Turns,
    rule: AdaptiveBatching,
    stages: list[Stage],
    out,
    plan: Plan,
    env_ns: np.ndarray,
    free_ns: int,
) -> None:
    """Dispatch a turn, then hand the rule its measurements: the batch's last stepping
    (``env_ns``, read before the turn: the slot holding it is rewritten by the STEP after)
    and when the policy call returned."""
    try:
        turns.dispatch(stages, out, plan)
    finally:  # a worker failure raised by the dispatch still leaves the measurement
        # After the dispatch: a refit (0.1-0.3 s with the workers busy) then stalls only the
        # loop, while this batch's envs step. One chunk time per row: the batch's size.
        rule.observe(len(env_ns), stages[0].turn_policy_ns, env_ns, free_ns)


def _quiet_ns(ready: int, in_flight: Counter, rule: Batching | AdaptiveBatching) -> float:
    """How long no reply can change a waiting batch's fate, taking no env to step faster
    than ``rule.quickest_step_ns`` and each worker to step its envs one at a time: filling
    the batch needs ``max_batch - ready`` more replies, at most one per worker at once;
    ending the stepping needs every worker's last one. 0 when the rule knows no step time."""
    step = rule.quickest_step_ns
    counts = [n for n in in_flight.values() if n]
    if step <= 0 or not counts:
        return 0.0
    done = (max(counts) - 1) * step
    need = rule.max_batch - ready
    if need > sum(counts):  # cannot fill: only the stepping's end or the deadline counts
        return done
    return min(done, (math.ceil(need / len(counts)) - 1) * step)


def make_runner(
    mode: str, rule: Batching | AdaptiveBatching | None, turns: Turns, stages: list[Stage]
) -> Runner:
    """The strategy for ``mode`` and the batching rule (``None``: fixed stages)."""
    if rule is not None:
        return DynamicRunner(turns, stages, rule)
    return SyncRunner(turns, stages) if mode == "sync" else PipelinedRunner(turns, stages)


class Schedule(NamedTuple):
    """A partition of the envs into stages, the strategy that turns over them, and the
    recovery that brings them back after a worker failure."""

    stages: list[Stage]
    runner: Runner
    recovery: Recovery
