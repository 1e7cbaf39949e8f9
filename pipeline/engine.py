"""RolloutEngine: the public calls, wired over the parts that do the work.

The envs are split into stages (:mod:`pipeline.schedule.stages`); every worker holds envs of
every stage. A call builds a plan of what to record (:mod:`pipeline.record.plans`), and a
scheduler (:mod:`pipeline.schedule.runners`) runs turns (:mod:`pipeline.schedule.turns`):
batch a stage's observations from shared memory, run the policy, validate and land its
actions (:mod:`pipeline.schedule.actions`), send the STEP (:mod:`pipeline.schedule.channel`)
and record the decision while the workers step. A failed worker is replaced
(:mod:`pipeline.schedule.recovery`) and the scheduler resumes. The workers run where the
backend puts them (:mod:`pipeline.backends`); the options are one :class:`EngineConfig`.
"""

from __future__ import annotations

import contextlib
import gc
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict

from pipeline.backends import open_backend
from pipeline.config import EngineConfig
from pipeline.errors import EngineClosedError, EngineError
from pipeline.profiler.session import ProfileSession
from pipeline.record.plans import EpisodeIds, EpisodePlan, Plan, Recording, RolloutPlan
from pipeline.record.store import BufferPool
from pipeline.runtime.layout import Layout
from pipeline.runtime.spans import PhaseClock, PhaseSwitch, SpanRing
from pipeline.schedule.actions import ActionPath
from pipeline.schedule.channel import Channel
from pipeline.schedule.recovery import Recovery
from pipeline.schedule.runners import PipelinedRunner, Schedule, make_runner
from pipeline.schedule.stages import StageBatcher, make_stages, memberships
from pipeline.schedule.turns import Turns
from pipeline.stats import EngineStats
from pipeline.weights import Background, PolicyVersion, RolloutFuture, in_background


def _release(cuda_path, pool) -> None:
    """The engine's finalizer: unregister CUDA memory first, then unmap it and stop workers."""
    if cuda_path is not None:
        cuda_path.release()
    pool.close()


class RolloutEngine:
    """Pipelined rollouts of ``policy`` over ``num_envs`` envs in ``num_workers`` processes.

    Example:
        >>> from pipeline import RolloutEngine
        >>> from pipeline.policies import LatencyPolicy
        >>> policy = LatencyPolicy(state_dim=16, chunk_len=8, base_ms=5)
        >>> with RolloutEngine("toy", policy, num_envs=8, num_workers=2, num_stages=2) as engine:
        ...     td = engine.rollout(num_decisions=4)          # TensorDict [8, 4]
        ...     eps = engine.collect_episodes(num_groups=2, group_size=4)

    Args:
        env: a registered name (``envs.names()``) or a picklable factory (lambdas work:
            ``multiprocess`` pickles with dill).
        policy: a ``torch.nn.Module`` from the canonical VLA TensorDict to one with
            ``("vla_action", "chunk")`` ``[B, chunk_len, action_dim]``.
        config: an :class:`~pipeline.config.EngineConfig`; ``options`` replace its fields.
        **options: :class:`~pipeline.config.EngineConfig` fields (``num_envs`` at least).

    Raises:
        ValueError: a bad option (named), a policy on another device than ``device``, or
            ``record_obs`` keys the env does not have.
        TypeError: an option :class:`~pipeline.config.EngineConfig` does not have.
        EngineError: the workers failed to start (a subclass says how).

    A failed worker is replaced and its episodes re-run (``engine.failures``); an error not
    recovered closes the engine, leaving nothing running. ``docs/engine.md`` has the
    schedules, lookahead, faults and the inline and Ray backends.
    """

    def __init__(
        self,
        env: str | Callable[..., Any],
        policy: torch.nn.Module,
        config: EngineConfig | None = None,
        **options: Any,
    ) -> None:
        self._closed = True  # until start-up completes
        cfg = self.config = EngineConfig.build(config, options)
        self.chunk_len = cfg.chunk_len_for(policy)
        self.lookahead = cfg.lookahead_for(self.chunk_len)
        self.exec_len = self.lookahead.exec_len
        self.device = cfg.device_for(policy)
        self.inference_threads = cfg.threads_for(self.device)
        self.policy, self.mode, self.schedule = policy, cfg.mode, cfg.schedule
        self.num_envs, self.num_workers = cfg.num_envs, cfg.num_workers
        self.num_stages, self.seed, self.backend = cfg.stage_count, int(cfg.seed), cfg.backend
        self.env_name = env if isinstance(env, str) else getattr(env, "__name__", repr(env))
        self.batching = cfg.batching()
        self.stages = make_stages(
            self.num_envs, self.num_workers, None if self.batching else self.num_stages
        )
        # The adaptive rule's fallback: fixed stages over the same envs, numbered after the
        # single-env ones, so that every worker knows both partitions from the start.
        fallback = getattr(self.batching, "stages", None)
        self._fallback = (
            make_stages(self.num_envs, self.num_workers, fallback, first=len(self.stages))
            if fallback
            else []
        )
        self._env_worker = np.arange(self.num_envs) % self.num_workers
        self._version = PolicyVersion(policy)
        self._background = Background(policy, cfg.max_staleness, self._version.set)
        self._buffers = BufferPool()  # trajectory memory, reused once a result is dropped
        self._calls = 0
        self._started = np.zeros(self.num_envs, bool)  # env has run at least one episode
        self.stats = EngineStats(self.num_workers)
        self._phase = PhaseSwitch()  # the loop's phase clock while profiling
        self.profiler: ProfileSession | None = None  # the profile running now, if any
        self._life_profile: ProfileSession | None = None  # profile=True's, from creation
        self._cuda = None
        self._created_ns = time.perf_counter_ns()
        self._pool = open_backend(
            cfg.backend,
            env,
            dict(cfg.env_kwargs),
            env_ids=[
                np.flatnonzero(self._env_worker == w).tolist() for w in range(self.num_workers)
            ],
            env_stages=memberships(self.num_envs, self.stages, self._fallback),
            auto_reset=cfg.auto_reset,
            env_name=self.env_name,
            **cfg.backend_options(),
        )
        # From here on a finalizer stops the workers even if the user never calls close().
        self._finalizer = weakref.finalize(self, _release, None, self._pool)
        layout = lambda spec: Layout(spec, self.num_envs, self.chunk_len, self.num_workers)
        self.spec = self._pool.start(layout, cfg.start_timeout_s)
        self.layout, self.a = self._pool.layout, self._pool.shm.arrays
        try:
            self.record_obs = cfg.record_obs_for(list(self.spec.obs))
        except ValueError:
            self.close()
            raise
        # episode ids are unique over the engine's life
        ids = EpisodeIds(self.num_envs)
        self._recording = Recording(
            self.layout, self.a, ids, self.seed, self._buffers, self.record_obs
        )
        self.a["n_exec"][:] = self.exec_len
        self.a["lookahead"][:] = self.lookahead.delay()
        if self.device.type == "cuda":
            from pipeline.cuda import CudaPath

            self._cuda = CudaPath(self.device, self._pool.shm.address, self.layout.nbytes)
            self._finalizer.detach()  # the CUDA memory is unregistered before it is unmapped
            self._finalizer = weakref.finalize(self, _release, self._cuda, self._pool)
        self._wire()
        self._closed = False
        if cfg.profile:  # profile the whole life of the engine, env creation included
            self._life_profile = self.profiler = ProfileSession(self, since=self._created_ns)
            self.profiler.start()
        if cfg.freeze_gc:
            # Full collections scan every tracked object, and torch and tensordict create
            # hundreds of thousands: that was ~80 us of every turn. Collect once, then move
            # what is alive now to the permanent generation (process-wide, as servers do).
            gc.collect()
            gc.freeze()
        self._froze_gc = cfg.freeze_gc

    def _wire(self) -> None:
        """The loop's parts, over the started backend's shared arrays."""
        cfg, la = self.config, self.lookahead
        self._batcher = StageBatcher(
            self.layout,
            self.a,
            self.seed,
            pin_memory=self.device.type == "cuda",
            overlap=la.overlap if la.enabled else None,
        )
        every = self.stages + self._fallback
        channel = Channel(self._pool, self.a, every, la, cfg.hang_timeout_s, self._phase)
        # A policy that conditions on the frozen prefix; any other runs "naive async".
        conditions = bool(getattr(self.policy, "conditions_on_prefix", False))
        actions = ActionPath(self.a, self.spec.action_dim, la, conditions, self._cuda)
        self._turns = Turns(
            self.policy,
            self._batcher,
            actions,
            channel,
            self.stats,
            self._phase,
            self._running_profiler,
            cfg.auto_reset,
        )
        recovery = lambda stages: Recovery(
            self._pool, self._turns, stages, self._env_worker, cfg.start_timeout_s, self._phase
        )
        runner = make_runner(self.mode, self.batching, self._turns, self.stages)
        # [0]: the configured schedule; [1]: the adaptive rule's fixed stages, if it has them
        self._schedules = [Schedule(self.stages, runner, recovery(self.stages))]
        if self._fallback:
            fixed = PipelinedRunner(self._turns, self._fallback, self.batching)
            self._schedules.append(Schedule(self._fallback, fixed, recovery(self._fallback)))
        self._schedule = self._schedules[0]

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the workers and release shared memory. Safe to call more than once.

        A call running in the background (``collect_episodes_async``) is finished first."""
        if hasattr(self, "_background"):
            self._background.shutdown()
        if self.profiler is not None and self.profiler.running:
            self.profiler.stop()  # read the workers' spans while the memory is still mapped
        self._closed = True
        self.a = {}
        self._batcher = self._turns = self._schedule = None
        self._schedules = []
        if hasattr(self, "_finalizer"):
            self._finalizer()
        self._cuda = None
        if getattr(self, "_froze_gc", False):
            # Hand what was frozen back to the collector, so engines created and closed in a
            # loop cannot make each other's garbage permanent.
            self._froze_gc = False
            gc.unfreeze()

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("the engine is closed; create a new RolloutEngine")

    def worker_pids(self) -> list[int]:
        return self._pool.pids()

    def local_worker_pids(self) -> list[int | None]:
        """Per worker, its pid if it runs on this machine, else None (a Ray node elsewhere):
        what the profiler's CPU sampler can watch."""
        return self._pool.local_pids()

    def placement(self) -> list[dict]:
        """Where the workers run, per node: ``{"node", "address", "workers", "pids"}`` (and
        ``"ray_node_id"`` on the Ray backend). The local backend is one node.

        Example:
            >>> [(n["node"], n["address"], n["workers"]) for n in engine.placement()]
            [(0, '127.0.0.1', [0, 1]), (1, '127.0.0.1', [2, 3])]
        """
        return self._pool.placement()

    # -- profiling (the narrow hook ProfileSession uses) ---------------------------------------
    def profile(self) -> contextlib.AbstractContextManager[ProfileSession]:
        """Profile every process of the engine for the duration of the block.

        Example:
            >>> with engine.profile() as prof:
            ...     engine.rollout(16)
            >>> report = prof.report()        # per-process, per-phase wall and CPU time
            >>> report.save("profile_out/")   # summary.json, trace.json, timeline.png, report.html
        """
        self._check_open()
        return ProfileSession.window(self)

    def profile_report(self):
        """The report of the engine-long profile started by ``profile=True``."""
        if self._life_profile is None:
            raise EngineError("this engine was not created with profile=True")
        self._life_profile.stop()
        if self.profiler is self._life_profile:
            self.profiler = None
        return self._life_profile.report()

    def set_profiling(self, clock: PhaseClock | None) -> None:
        """Switch every process's phase clock: the loop's to ``clock``, the workers' on when
        it is set (they check the switch after each wait)."""
        self._phase.clock = clock
        self.a["profile_on"][0] = clock is not None

    def worker_rings(self) -> list[SpanRing]:
        """Each worker's span ring, in shared memory."""
        return self._pool.worker_rings()

    def describe(self) -> dict:
        """The configuration, as a profile records it."""
        names = ("mode", "num_envs", "num_workers", "backend", "num_stages", "schedule")
        return {
            "env": self.env_name,
            **{k: getattr(self, k) for k in (*names, "chunk_len", "exec_len")},
            "worker_nodes": [n["node"] for n in self.placement() for _ in n["workers"]],
            "lookahead": "auto" if self.lookahead.fixed is None else self.lookahead.fixed,
            "device": str(self.device),
            "policy": type(self.policy).__name__,
            # False: the policy samples from a shared RNG, so a schedule change changes rollouts
            "policy_reproducible": bool(getattr(self.policy, "reproducible", True)),
        }

    def _running_profiler(self) -> ProfileSession | None:
        p = self.profiler
        return p if p is not None and p.running else None

    # -- seeds and versions ------------------------------------------------------------------
    def counters(self) -> dict[str, object]:
        """Where the engine's seeds stand: the episode ids handed out and the calls made. A new
        engine of the same config given them (:meth:`restore_counters`) draws the same seeds
        from its next call on, as this one would have."""
        return {"calls": self._calls, **self._recording.ids.state()}

    def restore_counters(self, counters: Mapping[str, object]) -> None:
        """Continue the seed sequence of :meth:`counters` (before this engine's first call)."""
        self._check_idle()
        self._calls = int(counters["calls"])
        self._recording.ids.load(counters)

    @property
    def policy_version(self) -> int:
        """The version recorded with the next decisions."""
        return self._version.value

    def set_policy_version(self, version: int) -> None:
        """Set the version recorded with the next decisions (otherwise it counts weight updates)."""
        self._version.set(version)

    # -- public calls ------------------------------------------------------------------------
    def rollout(self, num_decisions: int) -> TensorDict:
        """Every env makes ``num_decisions`` decisions; returns a TensorDict ``[num_envs, T]``.

        Envs carry their episodes over from the previous call; with ``auto_reset`` an ended
        episode restarts at once with the next seed, else the env idles (``mask`` False).
        """
        self._check_idle()
        stages = len(self.stages) + len(self._fallback)
        return self._call(RolloutPlan(self._recording, stages, num_decisions))

    def collect_episodes(
        self,
        num_groups: int,
        group_size: int,
        reset_seeds: Sequence[int] | None = None,
    ) -> TensorDict:
        """Run ``num_groups * group_size`` complete episodes, GRPO style.

        Members of a group share the reset seed (the same initial state) and have their own
        sampling seeds. Envs that finish early take the next queued episode. Returns a
        TensorDict ``[E]`` (episodes, group-major) whose trajectory fields are ``[E, T, ...]``
        padded to the longest, with ``mask`` ``[E, T]`` and per-episode ``success``,
        ``length`` (decisions), ``env_steps`` and ``group_id``.

        Args:
            num_groups: groups of episodes; each group shares one reset seed.
            group_size: episodes per group, each with its own sampling seeds.
            reset_seeds: one reset seed per group (a fixed, held-out evaluation set);
                default: derived from the engine seed and the call count.

        Raises:
            ValueError: fewer than one group or member, or not one seed >= 0 per group.
            EngineError: the engine runs without ``auto_reset``, or a call is in flight.

        Example:
            >>> eps = engine.collect_episodes(num_groups=4, group_size=8)
            >>> held_out = engine.collect_episodes(16, 1, reset_seeds=range(10**6, 10**6 + 16))
        """
        if not self.config.auto_reset:
            raise EngineError("collect_episodes needs auto_reset=True")
        self._check_idle()
        plan = EpisodePlan(
            self._recording, self._calls, self.exec_len, num_groups, group_size, reset_seeds
        )
        return self._call(plan)

    # -- training overlapped with rollouts ------------------------------------------------------
    def update_weights(self, source: torch.nn.Module | Mapping[str, torch.Tensor], version: int):
        """Hand the rollout policy new weights, recorded as ``policy_version`` ``version``.

        The weights are copied when this is called (the trainer may step its optimizer right
        after) and loaded into the engine's policy between calls, never during one: a call
        running in the background finishes with the weights it started with. Give the
        engine its own copy of the policy when training overlaps rollouts.

        Example:
            >>> engine = RolloutEngine("toy", copy.deepcopy(policy), num_envs=8)
            >>> fut = engine.collect_episodes_async(4, 8)
            >>> loss.backward(); opt.step()              # on the trainer's policy
            >>> engine.update_weights(policy, version=1)  # used from the next call on
        """
        self._check_open()
        self._background.update(source, version)

    def collect_episodes_async(
        self, num_groups: int, group_size: int, reset_seeds: Sequence[int] | None = None
    ) -> RolloutFuture:
        """``collect_episodes`` in a background thread; returns a future of its TensorDict.

        One call runs at a time: take the previous future's ``result()`` first. With
        ``max_staleness=N`` a result whose ``policy_version`` is more than ``N`` versions
        behind the newest ``update_weights`` is dropped and collected again, with the newest
        weights, when taken (``engine.stats.stale_dropped`` counts the dropped episodes). The
        background call leaves torch's thread count alone (it is process-wide and the
        trainer's). Args and Raises: as :meth:`collect_episodes` (raised by ``result()``).

        Example:
            >>> fut = engine.collect_episodes_async(num_groups=8, group_size=8)
            >>> train_on(previous_batch)           # overlaps the rollout
            >>> batch = fut.result()
        """
        self._check_idle()
        job = lambda: self.collect_episodes(num_groups, group_size, reset_seeds)
        self.stats.async_calls += 1
        return self._background.submit(job, on_drop=self._count_stale)

    def _count_stale(self, episodes: int) -> None:
        self.stats.stale_dropped += episodes

    def _check_idle(self) -> None:
        self._check_open()
        if self._background.busy():
            raise EngineError(
                "a collect_episodes_async call is still running: take its result() first"
            )

    def _call(self, plan: Plan) -> TensorDict:
        # A background call (collect_episodes_async) runs with the weights it was started
        # with, and leaves torch's process-wide thread count to the trainer.
        foreground = not in_background()
        if foreground:
            self._background.apply()
        self._version.refresh()
        self._phase("bookkeeping")
        self._batcher.new_call()
        threads = torch.get_num_threads()
        if foreground and self.inference_threads is not None:
            torch.set_num_threads(self.inference_threads)
        try:
            sched = self._choose_schedule(plan)
            self._turns.begin(sched.stages, plan, self._started, sched.recovery.recover)
            while True:  # the scheduler resumes from the stages' states after a recovery
                try:
                    sched.runner.run(plan)
                    break
                except EngineError as exc:
                    sched.recovery.recover(exc, plan)
            self._phase("record")
            for s in sched.stages:
                self._turns.record_results(s, plan)
            self.stats.fold(int(plan.store.valid.sum()), self._env_worker)
            return plan.result(self.policy_version, self._batcher.episode_text)
        except BaseException:
            self.close()  # a half-finished pipeline cannot be resumed safely
            raise
        finally:
            if foreground:
                torch.set_num_threads(threads)
            self._calls += 1
            self._phase("outside")

    def _choose_schedule(self, plan: Plan) -> Schedule:
        """The schedule this call runs: the adaptive rule's fixed stages while it chooses
        them, else the configured one; a change hands the envs over first."""
        chosen = self._schedules[-1 if getattr(self.batching, "fixed_stages", False) else 0]
        if chosen is not self._schedule:
            old = self._schedule
            self._turns.hand_over(old.stages, chosen.stages, plan, old.recovery.recover)
            self._schedule = chosen
        self.stats.fixed_stage_calls += chosen is not self._schedules[0]
        return chosen

    # -- recovery ----------------------------------------------------------------------------
    @property
    def failures(self) -> list:
        """Every worker failure recovered from, oldest first
        (:class:`pipeline.backends.budget.Failure`)."""
        return list(self._pool.failures)
