"""The rule of first-ready dynamic batching (``schedule="dynamic"``): when to infer, for whom.

With fixed stages a turn waits for the slowest env of its stage (an episode end, a reset, a
contact-heavy chunk). Dynamic batching has no partition: every env is ready on its own the
moment its worker has stepped it, and the loop infers for whichever envs are ready, as
EnvPool does. :class:`Batching` decides when a batch is worth inferring:

- at once when ``max_batch`` envs are ready, or when no other env can become ready;
- never for fewer than ``min_batch`` envs while more can come;
- otherwise after ``max_wait_us`` from the moment the longest-waiting env became ready
  (waits block in ``poll``, whose resolution is a millisecond: a shorter wait lasts a
  millisecond unless an env becomes ready first).

``min_batch=1`` (with the other two left out) is first-ready batching: infer as soon as the
policy is free, for every env ready by then. Left to itself that forms small batches, each
paying the policy's per-call cost again, so the loop ends up bound by the device where fixed
stages are not. With none of the three given, :class:`AdaptiveBatching` sizes batches from
measurements instead. Which envs share a batch never changes a trajectory, because every
row's sampling seed depends only on its own episode and decision, and a batch-invariant policy
computes each row alike in any batch (see ``RolloutEngine``).
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np

WAIT_FOR_REPLY = -1  # wait for the next env to become ready, however long (watchdog aside)


@dataclass(frozen=True)
class Batching:
    """The batch-size window and the wait. Build it with :meth:`check`.

    Example:
        >>> rule = Batching.check(num_envs=16, min_batch=4, max_batch=8, max_wait_us=500)
        >>> rule.wait_ns(ready=5, oldest_ns=0, now_ns=200_000, more_coming=True)
        300000
    """

    min_batch: int
    max_batch: int
    max_wait_ns: int
    learns: ClassVar[bool] = False  # no measurements to observe (AdaptiveBatching does)
    quickest_step_ns: ClassVar[float] = 0.0  # no step times known (see AdaptiveBatching)

    @classmethod
    def check(
        cls,
        num_envs: int,
        min_batch: int | None,
        max_batch: int | None,
        max_wait_us: float | None,
    ) -> Batching:
        """The rule for ``num_envs`` envs; ``None`` takes the default; bad values raise."""
        lo = 1 if min_batch is None else min_batch
        hi = num_envs if max_batch is None else max_batch
        wait = 0.0 if max_wait_us is None else max_wait_us
        if isinstance(lo, bool) or not isinstance(lo, int) or not 1 <= lo <= num_envs:
            raise ValueError(f"min_batch={min_batch!r} must be an int in [1, num_envs={num_envs}]")
        if isinstance(hi, bool) or not isinstance(hi, int) or not lo <= hi <= num_envs:
            raise ValueError(
                f"max_batch={max_batch!r} must be an int in [min_batch={lo}, num_envs={num_envs}]"
            )
        if not wait >= 0:  # also rejects NaN
            raise ValueError(f"max_wait_us={max_wait_us!r} must be >= 0")
        return cls(lo, hi, int(wait * 1000))

    def wait_ns(self, ready: int, oldest_ns: int, now_ns: int, more_coming: bool) -> int | None:
        """``None`` to infer now for up to ``max_batch`` of the ``ready`` envs; otherwise how
        long to wait for more (:data:`WAIT_FOR_REPLY`: until the next env is ready).

        ``oldest_ns`` is when the longest-waiting ready env became ready; ``more_coming``
        says whether any env is still stepping."""
        if ready >= self.max_batch or (ready and not more_coming):
            return None
        if ready < self.min_batch:
            return WAIT_FOR_REPLY
        remaining = oldest_ns + self.max_wait_ns - now_ns
        return None if remaining <= 0 else remaining


class Simulated(NamedTuple):
    """What :func:`simulate` found: decisions per second and the mean batch size."""

    rate: float
    batch: float


def simulate(
    num_envs: int,
    num_workers: int,
    latency: tuple[float, float],
    step_ns: np.ndarray,
    batch: int,
    wait_ns: float,
    rounds: int = 12,
    seed: int = 0,
) -> Simulated:
    """Decisions per second (and the mean batch) of dynamic batching with batches of up to
    ``batch`` and a partial batch waiting ``wait_ns`` after the policy is free, in a small
    event simulation: env ``i`` on worker ``i % num_workers``, each worker stepping its
    commanded envs in order, each chunk's time drawn from the measured ``step_ns``, calls of
    ``a + b * B``. What the runner does, without its own cost.

    Example:
        >>> simulate(16, 2, (8e6, 3e6), np.full(64, 8e6), batch=8, wait_ns=8e6).rate
    """
    # Plain Python over a handful of envs: numpy's per-call cost made each event 3x slower,
    # and a refit runs dozens of these in the loop. The stepping envs wait in a heap by
    # (ready time, env), so an event costs a pop, not a scan of the fleet; they leave it in
    # that order, so the ready queue is longest-waiting first (ties: the lower env first).
    rng = np.random.default_rng(seed)
    a, b = float(latency[0]), float(latency[1])
    inf = math.inf
    ready_at = [0.0] * num_envs  # when each env became (or will become) ready
    ready = deque(range(num_envs))
    stepping: list[tuple[float, int]] = []
    worker_free = [0.0] * num_workers
    warm, target = 2 * num_envs, (rounds + 2) * num_envs  # the first rounds are a transient
    draws = rng.choice(step_ns, size=target + num_envs).tolist()
    now = free = t_warm = 0.0
    decisions = calls = 0
    while decisions < target:
        while stepping and stepping[0][0] <= now:
            ready.append(heapq.heappop(stepping)[1])
        since = max(ready_at[ready[0]], free) if ready else inf
        if len(ready) >= batch or now >= since + wait_ns:
            n = min(batch, len(ready))
            now = free = now + a + b * n
            calls += decisions >= warm
            for _ in range(n):  # dispatched in order; a worker steps its envs one by one
                env = ready.popleft()
                w = env % num_workers
                worker_free[w] = max(worker_free[w], now) + draws[decisions]
                ready_at[env] = worker_free[w]
                heapq.heappush(stepping, (ready_at[env], env))
                decisions += 1
                if decisions == warm:
                    t_warm = now
            continue
        nxt = stepping[0][0] if stepping else inf  # when the next stepping env is ready
        now = max(now, min(nxt, since + wait_ns))
    made = decisions - warm
    rate = made / (now - t_warm) * 1e9 if now > t_warm else 0.0
    return Simulated(rate, made / calls if calls else 0.0)


def simulate_stages(
    num_envs: int,
    num_workers: int,
    latency: tuple[float, float],
    step_ns: np.ndarray,
    stages: int = 2,
    rounds: int = 12,
    seed: int = 0,
) -> float:
    """Decisions per second of ``stages`` fixed stages (contiguous groups of envs) in the
    event model of :func:`simulate`: a stage is inferred once the device is free and its
    last env is stepped, and each worker steps its envs of a commanded stage in order.

    Example:
        >>> simulate_stages(16, 2, (8e6, 3e6), np.full(64, 8e6))
    """
    rng = np.random.default_rng(seed)
    a, b = float(latency[0]), float(latency[1])
    size = num_envs // stages
    # per stage, how many of its envs each worker holds (env i on worker i % num_workers)
    held = [
        [sum(1 for i in range(g * size, (g + 1) * size) if i % num_workers == w)
         for w in range(num_workers)]
        for g in range(stages)
    ]  # fmt: skip
    calls, warm = (rounds + 2) * stages, 2 * stages  # the first rounds are a transient
    draws = iter(rng.choice(step_ns, size=calls * size).tolist())
    worker_free, ready = [0.0] * num_workers, [0.0] * stages
    device = t_warm = 0.0
    for r in range(calls):
        g = r % stages
        device = max(device, ready[g]) + a + b * size
        done = device
        for w, n in enumerate(held[g]):
            if n:
                t = max(worker_free[w], device)
                for _ in range(n):
                    t += next(draws)
                worker_free[w] = t
                done = max(done, t)
        ready[g] = done
        if r == warm:
            t_warm = device
    return (calls - warm - 1) * size / (device - t_warm) * 1e9


def rule_candidates(
    num_envs: int, num_workers: int, base_ns: float, step_ns: np.ndarray
) -> list[tuple[int, float]]:
    """The ``(max_batch, wait_ns)`` pairs :class:`AdaptiveBatching` simulates: every batch
    size with a partial batch inferred at once or after waiting the per-call cost
    ``base_ns``; and the full batch waiting a sixteenth to a half of a worker's round (the
    mean chunk time of ``step_ns`` times its envs).

    While the workers have envs queued a wait idles nothing, so the simulation rates such
    waits like inferring at once. The real loop does not: each turn costs it CPU per call
    and per row (for 256 envs, first-ready's batches of 2.6 cost 0.4 ms of loop CPU per
    decision, 12x the stages'), and a host with no core to spare takes that from the
    workers.

    Example:
        >>> rule_candidates(4, 2, 1e6, np.full(8, 2e6))[-1]   # the cap, waiting half a round
        (4, 2000000.0)
    """
    per_size = [(B, w) for B in range(1, num_envs + 1) for w in (0.0, float(base_ns))]
    round_ns = float(np.mean(step_ns)) * num_envs / num_workers
    waits = [(num_envs, round_ns / 2**j) for j in (4, 3, 2, 1)]
    return list(dict.fromkeys(per_size + waits))


class AdaptiveBatching:
    """The default rule of ``schedule="dynamic"``: batches of the size the measurements say
    gives the most decisions per second.

    It fits the policy's latency ``L(B) = a + b * B`` online from its own calls and keeps
    the envs' measured chunk times (their spread included), then replays them in
    :func:`simulate` for each of :func:`rule_candidates` (every batch size, a partial batch
    inferred at once or after waiting ``a``, the per-call cost; and the full batch waiting
    part of a worker's round), and keeps, of those within 2% of the fastest, the one whose
    simulated batches are largest (the fewest turns, which the simulation does not charge
    for); the choice in force is kept while it is among those. With spread step times it
    does not wait for a stage's stragglers; with workers that have many envs queued and a
    device to spare, it waits for large batches. Until it has
    calls of two sizes to fit it batches first-ready (which forms batches of many sizes);
    then it refits every 2 s, backing off to every 32 s while its choice holds.

    Given ``stages``, it may also choose fixed stages (``fixed_stages``), which the engine
    runs from its next call on: when :func:`simulate_stages` rates them within
    ``STAGES_MARGIN`` of the best dynamic candidate. Little spread leaves dynamic batching
    nothing to absorb, and then its own machinery (a gather, a reply per env) costs more
    than it gains. Nothing it chooses changes a trajectory.

    Example:
        >>> rule = AdaptiveBatching(num_envs=16, num_workers=2, stages=2)
        >>> rule.observe(batch=8, policy_ns=4_000_000, env_ns=np.full(8, 1_000_000))
    """

    learns: ClassVar[bool] = True  # the runner hands it every turn (observe)
    SIMULATION_TIE: ClassVar[float] = 0.02  # simulated rates this close count as equal
    SIM_ENVS: ClassVar[int] = 16  # the largest fleet a refit simulates (see refit)
    SIM_ROUNDS: ClassVar[int] = 24  # at 12, transients alone moved rates by 2%
    REFIT_NS: ClassVar[tuple[int, int]] = (2 * 10**9, 32 * 10**9)  # refit interval range
    # Of their event simulations, the real stages keep 92-98% and dynamic batching 88-93%
    # (`bench.py scheduler --against-simulation`, 16 envs, CV 0 to 1): dynamic's gather and
    # per-env replies cost it about 5% more, so the stages win unless dynamic simulates more
    # than that faster.
    STAGES_MARGIN: ClassVar[float] = 0.05
    # Chunk times measured before a first fit, and the fewest it keeps (4 per env for larger
    # fleets): from 16 chunks of a CV 0.5 fleet it measured CV 0.36 and chose the stages,
    # which 64 undid.
    FIRST_FIT_CHUNKS: ClassVar[int] = 64

    def __init__(self, num_envs: int, num_workers: int, stages: int | None = None) -> None:
        self.num_envs, self.num_workers, self.stages = num_envs, num_workers, stages
        self.max_batch, self.max_wait_ns = num_envs, 0
        self.fixed_stages = False  # the choice for the next call: `stages` fixed stages
        # The quickest chunk measured (of the recent ones at each refit, lowered by every
        # quicker one in between): the runner takes no env to step faster, and need not
        # wake for replies that cannot arrive in time to change its decision. 0: unknown.
        self.quickest_step_ns = 0.0
        self.fitted = False
        self._free_ns = 0  # when the last policy call returned
        # Per batch size: [calls, mean latency ns]; the sizes of the first-ready warm-up stay
        # in the fit after the rule settles on a few sizes.
        self._latency: dict[int, list[float]] = {}
        self._env_ns: deque[float] = deque(maxlen=max(4 * num_envs, self.FIRST_FIT_CHUNKS))
        self._since_fit = self._next_fit_ns = 0
        self._fit_every_ns = self.REFIT_NS[0]

    def observe(
        self, batch: int, policy_ns: int, env_ns: np.ndarray, free_ns: int | None = None
    ) -> None:
        """One turn: its batch size, the policy call's latency, the batch's envs' last
        stepping (``env_ns`` per env, 0 where nothing was stepped yet) and when the policy
        call returned (``free_ns``, ``perf_counter_ns``; None: now). A refit, when one is
        due, runs here: call it after the batch's actions are out, so its envs step
        meanwhile."""
        now = time.perf_counter_ns()
        self._free_ns = now if free_ns is None else free_ns
        calls, mean = self._latency.get(batch, (0, 0.0))
        calls = min(calls + 1, 32)  # a running mean that follows a drifting latency
        self._latency[batch] = [calls, mean + (policy_ns - mean) / calls]
        stepped = [float(x) for x in env_ns if x > 0]
        self._env_ns.extend(stepped)
        if self.quickest_step_ns > 0 and stepped:  # between refits, only ever lower
            self.quickest_step_ns = min(self.quickest_step_ns, min(stepped))
        self._since_fit += batch
        # Refit after every env decided once, then at most every 20 times what a refit
        # costs, and every 2 s while the choice moves, backing off to every 32 s while it
        # holds: a refit stops the loop (0.05-0.1 s for 16 envs on a busy 2-core machine),
        # so refits every 2 s would take a few percent of its time for good.
        if self._since_fit >= self.num_envs and now >= self._next_fit_ns:
            self._since_fit = 0
            before = (self.max_batch, self.max_wait_ns, self.fitted, self.fixed_stages)
            self.refit()
            if not self.fitted:  # too little measured yet: again after the next round
                return
            cost = time.perf_counter_ns() - now
            held = self._same_choice(*before)
            lo, hi = self.REFIT_NS
            self._fit_every_ns = min(2 * self._fit_every_ns, hi) if held else lo
            self._next_fit_ns = time.perf_counter_ns() + max(self._fit_every_ns, 20 * cost)

    def _same_choice(
        self, max_batch: int, max_wait_ns: int, fitted: bool, fixed_stages: bool
    ) -> bool:
        """Whether a refit kept the choice: the same schedule, the same cap, and a wait
        within a quarter of the one before. Waits are fractions of measured times (the
        per-call cost, a worker's round), so they never repeat exactly; compared exactly, a
        choice that waits never held, and the rule refitted every 2 s for good."""
        if not fitted or fixed_stages != self.fixed_stages or max_batch != self.max_batch:
            return False
        return abs(self.max_wait_ns - max_wait_ns) <= 0.25 * max(self.max_wait_ns, max_wait_ns)

    def latency_model(self) -> tuple[float, float] | None:
        """``(a, b)`` of ``L(B) = a + b * B`` in ns, or None before two sizes were seen."""
        if len(self._latency) < 2:
            return None
        sizes = np.array(list(self._latency), float)
        calls, lat = np.array(list(self._latency.values()), float).T
        w = calls / calls.sum()
        mb, ml = (w * sizes).sum(), (w * lat).sum()
        var = (w * (sizes - mb) ** 2).sum()
        b = max(0.0, (w * (sizes - mb) * (lat - ml)).sum() / var)
        a = ml - b * mb
        if a < 0:  # no per-call base: all proportional
            a, b = 0.0, (w * lat * sizes).sum() / (w * sizes**2).sum()
        return a, b

    def refit(self) -> None:
        """Fit ``L(B)`` and choose the batch size and wait now (``observe`` calls this)."""
        model = self.latency_model()
        if model is None or len(self._env_ns) < self.FIRST_FIT_CHUNKS:
            return
        a, b = model
        # The simulated fleet has at most SIM_ENVS envs standing for the real n: with k = n/m,
        # m envs whose chunks take k times as long and whose calls cost a + k * b * B' step
        # and infer a round in the same time as n envs with calls of a + b * B (B = k * B'),
        # so the rate is k times the simulated one. Without this a refit for 1,024 envs
        # simulated each candidate on a fleet of 1,024 and stalled the loop for seconds.
        n = self.num_envs
        m = min(n, max(self.SIM_ENVS, self.num_workers))
        k = n / m
        steps = np.array(self._env_ns) * k
        candidates = rule_candidates(m, self.num_workers, a, steps)
        # The choice in force is a candidate too, kept while it ties with the fastest: a
        # choice that flipped between near-equal candidates refitted every 2 s (at 256
        # envs refits took 43% of the loop's CPU).
        in_force = (min(m, max(1, round(self.max_batch / k))), float(self.max_wait_ns))
        if self.fitted and in_force not in candidates:
            candidates.append(in_force)
        sims = {
            (B, w): simulate(m, self.num_workers, (a, b * k), steps, B, w, self.SIM_ROUNDS)
            for B, w in candidates
        }
        # Candidates within SIMULATION_TIE of the fastest are equal as far as the simulation
        # can tell (its sampling noise at these rounds); of those, the one forming the
        # largest batches costs the real loop the fewest turns, which the simulation leaves
        # out (then the larger cap, then the shorter wait). A strict argmax picked among
        # near-equal candidates by noise: batches of up to 6 gave 1.01x the 2-stage
        # throughput where up to 16 gave 1.11x, at CV 1.
        best = max(r.rate for r in sims.values())
        if self.stages:
            staged = simulate_stages(
                m, self.num_workers, (a, b * k), steps, self.stages, self.SIM_ROUNDS
            )
            # The choice in force holds within the simulation's tie, as for batch sizes.
            share = 1 - self.STAGES_MARGIN - (self.SIMULATION_TIE if self.fixed_stages else 0)
            self.fixed_stages = staged >= share * best
        floor = (1 - self.SIMULATION_TIE) * best
        if self.fitted and sims[in_force].rate >= floor:
            size, wait = in_force
        else:
            tied = [(r.batch, B, -w) for (B, w), r in sims.items() if r.rate >= floor]
            _, size, neg_wait = max(tied)
            wait = -neg_wait
        self.max_batch = min(n, max(1, round(size * k)))
        self.max_wait_ns = int(wait)
        self.quickest_step_ns = float(min(self._env_ns))
        self.fitted = True

    def wait_ns(self, ready: int, oldest_ns: int, now_ns: int, more_coming: bool) -> int | None:
        """``None`` to infer now for up to ``max_batch`` of the ``ready`` envs, otherwise how
        long to wait for more (see :meth:`Batching.wait_ns`); the wait runs from when the
        policy became free or the first env became ready, whichever is later."""
        if ready >= self.max_batch or (ready and not more_coming):
            return None
        if not ready:
            return WAIT_FOR_REPLY
        remaining = max(oldest_ns, self._free_ns) + self.max_wait_ns - now_ns
        return None if remaining <= 0 else remaining
