"""RolloutEngine: configuration, lifecycle and the inference loop.

The envs are split into ``num_stages`` fixed groups (:mod:`pipeline.schedule.stages`). Every worker
holds envs of every stage. In ``mode="pipelined"`` the loop infers for stage g while the
workers step the other stages; in ``mode="sync"`` each stage is inferred, stepped and awaited
in turn (with ``num_stages=1`` that is the SimpleVLA-RL lock-step baseline). Both modes make
the same decisions in the same order for every stage, and every seed is derived from ids, so
their trajectories are bitwise identical. ``schedule="dynamic"`` makes every env a stage of
its own and infers for whichever are ready (:mod:`pipeline.schedule.dynamic`); a batch-invariant
policy then gives the same trajectories too, in whatever batches.

A stage turn: batch the stage's observations straight from shared memory, run the policy,
validate its output, write the action chunks into shared memory, send one 16-byte STEP frame
to each worker, then record the decision while the workers step. Around it the parts are:
:mod:`pipeline.backends.local` (processes and frames), :mod:`pipeline.record.plans` (what a
call records), :mod:`pipeline.schedule.stages` (batches), :mod:`pipeline.cuda` (device
copies) and :mod:`pipeline.stats`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict

from pipeline import schema
from pipeline.backends import BACKENDS, open_backend
from pipeline.errors import (
    EngineClosedError,
    EngineError,
    PolicyOutputError,
    ProtocolError,
)
from pipeline.profiler.session import ProfileSession
from pipeline.record.plans import EpisodeIds, EpisodePlan, Plan, RolloutPlan
from pipeline.record.store import BufferPool
from pipeline.runtime import protocol as P
from pipeline.runtime.layout import Layout
from pipeline.runtime.spans import PhaseClock, SpanRing
from pipeline.schedule.dynamic import WAIT_FOR_REPLY, Batching
from pipeline.schedule.lookahead import Lookahead, prefix_fields
from pipeline.schedule.stages import Stage, StageBatcher, StageState, fixed_stages
from pipeline.stats import EngineStats
from pipeline.weights import RolloutFuture, WeightSync


def _release(cuda_path, pool) -> None:
    """The engine's finalizer: unregister CUDA memory first, then unmap it and stop workers."""
    if cuda_path is not None:
        cuda_path.release()
    pool.close()


def _host(t: torch.Tensor) -> np.ndarray:
    """A policy output as a host array; half-precision floats widen to float32 (numpy has no
    bfloat16)."""
    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.cpu().numpy()


_ASYNC_THREAD = "rollout-async"


def _in_async_thread() -> bool:
    return threading.current_thread().name.startswith(_ASYNC_THREAD)


def _inference_threads(
    value: int | str | None, num_workers: int, device: torch.device
) -> int | None:
    """torch's intra-op threads in this process for the duration of a call.

    A trainer runs with torch's default (one thread per core). During a rollout those
    threads compete with the env workers for the same cores, and OpenMP's idle threads spin
    after every parallel op: that cost the pipelined engine a third of its speed-up.
    ``"auto"`` leaves the workers their cores: one thread when inference runs on an
    accelerator (the host only launches kernels), else the cores the workers do not use.
    """
    if value is None:
        return None
    if value == "auto":
        if device.type != "cpu":
            return 1
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        return max(1, (cores or os.cpu_count() or 1) - num_workers)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"inference_threads={value!r}: pass an int >= 1, 'auto' or None")
    return value


class RolloutEngine:
    """Pipelined rollouts of ``policy`` over ``num_envs`` envs in ``num_workers`` processes.

    Example:
        >>> from pipeline import RolloutEngine
        >>> from pipeline.policies import LatencyPolicy
        >>> policy = LatencyPolicy(state_dim=16, chunk_len=8, base_ms=5)
        >>> with RolloutEngine("toy", policy, num_envs=8, num_workers=2, num_stages=2) as engine:
        ...     td = engine.rollout(num_decisions=4)          # TensorDict [8, 4]
        ...     eps = engine.collect_episodes(num_groups=2, group_size=4)

    ``env`` is a registered name (``envs.names()``) or a picklable factory (lambdas work:
    ``multiprocess`` pickles with dill). ``freeze_gc`` (default on) runs ``gc.collect()`` then
    ``gc.freeze()`` once at start-up, so the per-turn path does not pay for full garbage
    collections over torch's objects; it affects the whole process. ``inference_threads``
    sets torch's intra-op threads in this process for the duration of each call and restores
    them after: ``"auto"`` (default) leaves the workers their cores, an int sets it, ``None``
    leaves torch's setting alone.

    ``record_obs`` names the observation keys the returned trajectories keep (default: all).
    Every observation still reaches the policy in place; a key left out is never copied
    again, which is most of a call's memory traffic when cameras are large and a trainer
    only needs, say, the state and one camera.

    Faults: with ``on_worker_failure="restart"`` (default) a worker that dies, whose env
    raises, whose factory fails, or whose progress counter stands still for
    ``hang_timeout_s`` is replaced, up to ``max_restarts`` times over the engine's life; its
    running episodes end as ``aborted`` and re-run with the same seeds, and every other env
    is unaffected (see ``engine.failures``). ``"raise"`` raises instead. Errors not recovered
    raise an :class:`EngineError` subclass and close the engine; nothing is left running,
    and the shared memory (an anonymous memfd) is gone with the last process.

    Debugging: ``backend="inline"`` steps every worker's envs in this process, one after
    another (a breakpoint in an env works), with bitwise the same trajectories
    (:mod:`pipeline.backends.inline`).

    Scale-out: ``backend="ray"`` runs the workers on the nodes of a Ray cluster,
    ``workers_per_node`` to a node (default: all on one), each node's share in a Ray actor
    with its own shared memory; inference stays in this process, and the output is bitwise
    the local backend's (:mod:`pipeline.backends.ray.pool`). It connects to ``ray_address`` unless
    Ray is already initialized. A lost node actor is replaced like a dead worker (its
    workers' episodes aborted and re-run), under the same ``max_restarts``.

    Example:
        >>> ray.init(address="auto")
        >>> engine = RolloutEngine("tabletop/pick-place", policy, num_envs=256,
        ...                        num_workers=64, backend="ray", workers_per_node=16)
    """

    def __init__(
        self,
        env: str | Callable[..., Any],
        policy: torch.nn.Module,
        *,
        num_envs: int,
        num_workers: int = 2,
        num_stages: int | None = None,
        mode: str = "pipelined",
        schedule: str = "stages",
        min_batch: int | None = None,
        max_batch: int | None = None,
        max_wait_us: float | None = None,
        seed: int = 0,
        env_kwargs: dict | None = None,
        device: str | torch.device = "auto",
        chunk_len: int | None = None,
        exec_len: int | None = None,
        lookahead: int | str = 0,
        auto_reset: bool = True,
        on_worker_failure: str = "restart",
        max_restarts: int = 10,
        hang_timeout_s: float = 60.0,
        start_timeout_s: float = 300.0,
        pin_workers: bool = False,
        freeze_gc: bool = True,
        inference_threads: int | str | None = "auto",
        max_staleness: int | None = None,
        record_obs: Sequence[str] | None = None,
        profile: bool = False,
        backend: str = "local",
        ray_address: str | None = None,
        workers_per_node: int | None = None,
    ) -> None:
        self._closed = True  # until start-up completes
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: choose one of {', '.join(map(repr, BACKENDS))}")
        if backend != "ray" and (ray_address, workers_per_node) != (None, None):
            raise ValueError("ray_address and workers_per_node apply to backend='ray'")
        if workers_per_node is not None and workers_per_node < 1:
            raise ValueError(f"workers_per_node={workers_per_node} must be >= 1")
        if mode not in ("sync", "pipelined"):
            raise ValueError(f"mode={mode!r}: choose 'sync' or 'pipelined'")
        if num_envs < 1 or num_workers < 1:
            raise ValueError("num_envs and num_workers must be >= 1")
        if num_workers > num_envs:
            raise ValueError(f"num_workers={num_workers} > num_envs={num_envs}")
        self._env_worker = np.arange(num_envs) % num_workers
        if schedule == "stages":
            num_stages = 2 if num_stages is None else num_stages
            if (min_batch, max_batch, max_wait_us) != (None, None, None):
                raise ValueError("min_batch, max_batch and max_wait_us apply to schedule='dynamic'")
            self.stages = fixed_stages(num_envs, num_workers, num_stages)
            self.batching = None
        elif schedule == "dynamic":
            if mode != "pipelined":
                raise ValueError(
                    "schedule='dynamic' runs pipelined; mode='sync' (with stages) is its reference"
                )
            if num_stages is not None:
                raise ValueError("num_stages applies to schedule='stages' (dynamic has none)")
            self.batching = Batching.check(num_envs, min_batch, max_batch, max_wait_us)
            # One single-env stage per env: each has its own slot, sequence and command, so
            # it is ready the moment its worker finishes it, whatever the other envs do.
            self.stages = [Stage(i, i, i + 1, [int(self._env_worker[i])]) for i in range(num_envs)]
            num_stages = num_envs
        else:
            raise ValueError(f"schedule={schedule!r}: choose 'stages' or 'dynamic'")
        self.schedule = schedule
        chunk_len = chunk_len if chunk_len is not None else getattr(policy, "chunk_len", None)
        if chunk_len is None or chunk_len < 1:
            raise ValueError("chunk_len: pass it, or give the policy a 'chunk_len' attribute")
        self.lookahead = Lookahead.check(lookahead, chunk_len, exec_len)
        exec_len = self.lookahead.exec_len
        if not 1 <= exec_len <= chunk_len:
            raise ValueError(f"exec_len={exec_len} must be in [1, chunk_len={chunk_len}]")
        if hang_timeout_s <= 0:
            raise ValueError(f"hang_timeout_s={hang_timeout_s} must be > 0")
        if on_worker_failure not in ("restart", "raise"):
            raise ValueError(
                f"on_worker_failure={on_worker_failure!r}: choose 'restart' or 'raise'"
            )
        if max_restarts < 0:
            raise ValueError(f"max_restarts={max_restarts} must be >= 0")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness={max_staleness} must be >= 0 (or None)")
        self.max_staleness = max_staleness
        self.env_name = env if isinstance(env, str) else getattr(env, "__name__", repr(env))
        self.policy, self.mode, self.seed = policy, mode, int(seed)
        self.num_envs, self.num_workers, self.num_stages = num_envs, num_workers, num_stages
        self.chunk_len, self.exec_len, self.auto_reset = chunk_len, exec_len, auto_reset
        self.hang_timeout_s, self.start_timeout_s = hang_timeout_s, start_timeout_s
        self.on_worker_failure = on_worker_failure
        self.device = self._resolve_device(device, policy)
        self.inference_threads = _inference_threads(inference_threads, num_workers, self.device)
        param = next(iter(policy.parameters()), None)
        if param is not None and param.device.type != self.device.type:
            raise ValueError(
                f"the policy's parameters are on {param.device} but device={self.device}: move "
                f"the policy (policy.to('{self.device}')) or pass device='auto'"
            )
        self.policy_version = 0
        self._param_versions = self._fingerprint()
        self._weights = WeightSync(policy)
        self._executor: ThreadPoolExecutor | None = None  # runs collect_episodes_async
        self._in_flight: Future | None = None
        self._ids = EpisodeIds(num_envs)  # episode ids are unique over the engine's life
        self._buffers = BufferPool()  # trajectory memory, reused once a result is dropped
        self._calls = 0
        self._started = np.zeros(num_envs, bool)  # env has run at least one episode
        self.stats = EngineStats(num_workers)
        self._clock: PhaseClock | None = None  # the loop's phase clock while profiling
        self.profiler: ProfileSession | None = None  # the profile running now, if any
        self._life_profile: ProfileSession | None = None  # profile=True's, from creation
        self._cuda = None
        self._created_ns = time.perf_counter_ns()
        self.backend = backend
        pool_args = dict(
            env_ids=[np.flatnonzero(self._env_worker == w).tolist() for w in range(num_workers)],
            env_stage=[s.index for s in self.stages for _ in range(s.size)],
            auto_reset=auto_reset,
            env_name=self.env_name,
            pin_workers=pin_workers,
            profile=profile,
            max_restarts=max_restarts if on_worker_failure == "restart" else 0,
        )
        if backend == "ray":
            pool_args.update(
                workers_per_node=workers_per_node,
                ray_address=ray_address,
                hang_timeout_s=hang_timeout_s,
            )
        self._pool = open_backend(backend, env, env_kwargs or {}, **pool_args)
        # From here on a finalizer stops the workers even if the user never calls close().
        self._finalizer = weakref.finalize(self, _release, None, self._pool)
        self.spec = self._pool.start(
            lambda spec: Layout(spec, num_envs, self.chunk_len, num_workers), start_timeout_s
        )
        self.layout = self._pool.layout
        self.record_obs = self._check_record_obs(record_obs)
        self.a = self._pool.shm.arrays
        self.a["n_exec"][:] = self.exec_len
        self.a["lookahead"][:] = self.lookahead.delay()
        # A policy that conditions on the frozen prefix; any other runs "naive async".
        self._conditions = bool(getattr(policy, "conditions_on_prefix", False))
        self._actions = torch.from_numpy(self.a["actions"])
        self._batcher = StageBatcher(
            self.layout,
            self.a,
            self.seed,
            pin_memory=self.device.type == "cuda",
            overlap=self.lookahead.overlap if self.lookahead.enabled else None,
        )
        self._action_staging: torch.Tensor | None = None  # dynamic batches' chunks, on CUDA
        if self.device.type == "cuda":
            from pipeline.cuda import CudaPath

            shm = self._pool.shm
            self._cuda = CudaPath(self.device, shm.address, self.layout.nbytes)
            self._finalizer.detach()  # the CUDA memory is unregistered before it is unmapped
            self._finalizer = weakref.finalize(self, _release, self._cuda, self._pool)
        self._closed = False
        if profile:  # profile the whole life of the engine, env creation included
            self._life_profile = self.profiler = ProfileSession(self, since=self._created_ns)
            self.profiler.start()
        if freeze_gc:
            # Full collections scan every tracked object, and torch and tensordict create
            # hundreds of thousands: that was ~80 us of every turn. Collect once, then move
            # what is alive now to the permanent generation (process-wide, as servers do).
            gc.collect()
            gc.freeze()
        self._froze_gc = freeze_gc

    def _check_record_obs(self, keys: Sequence[str] | None) -> tuple[str, ...] | None:
        if keys is None:
            return None
        keys = (keys,) if isinstance(keys, str) else tuple(keys)
        unknown = [k for k in keys if k not in self.spec.obs]
        if unknown or len(set(keys)) != len(keys):
            self.close()
            raise ValueError(
                f"record_obs={list(keys)}: each must be one of the env's observation keys "
                f"{list(self.spec.obs)}, once (unknown: {unknown})"
            )
        return keys

    @staticmethod
    def _resolve_device(device, policy) -> torch.device:
        if str(device) == "auto":
            param = next(iter(policy.parameters()), None)
            if param is not None:
                return param.device
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(device)

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the workers and release shared memory. Safe to call more than once.

        A call running in the background (``collect_episodes_async``) is finished first."""
        if getattr(self, "_executor", None) is not None:
            if threading.current_thread().name.startswith(_ASYNC_THREAD):
                # an error in the background call closes the engine from that thread
                self._executor.shutdown(wait=False)
            else:
                self._executor.shutdown(wait=True)
            self._executor = None
        if self.profiler is not None and self.profiler.running:
            self.profiler.stop()  # read the workers' spans while the memory is still mapped
        self._closed = True
        self.a = {}
        self._actions = None
        self._batcher = None
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
    @contextlib.contextmanager
    def profile(self):
        """Profile every process of the engine for the duration of the block.

        Example:
            >>> with engine.profile() as prof:
            ...     engine.rollout(16)
            >>> report = prof.report()        # per-process, per-phase wall and CPU time
            >>> report.save("profile_out/")   # summary.json, trace.json, timeline.png, report.html
        """
        self._check_open()
        if self.profiler is not None and self.profiler.running:
            raise EngineError("a profile is already running (profile=True or a nested profile())")
        session = self.profiler = ProfileSession(self)
        session.start()
        try:
            yield session
        finally:
            session.stop()  # a no-op when close() already stopped it (an error in the block)
            self.profiler = None

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
        self._clock = clock
        self.a["profile_on"][0] = clock is not None

    def worker_rings(self) -> list[SpanRing]:
        """Each worker's span ring, in shared memory."""
        return self._pool.worker_rings()

    def describe(self) -> dict:
        """The configuration, as a profile records it."""
        return {
            "env": self.env_name,
            "mode": self.mode,
            "num_envs": self.num_envs,
            "num_workers": self.num_workers,
            "backend": self.backend,
            "worker_nodes": [n["node"] for n in self.placement() for _ in n["workers"]],
            "num_stages": self.num_stages,
            "schedule": self.schedule,
            "chunk_len": self.chunk_len,
            "exec_len": self.exec_len,
            "lookahead": "auto" if self.lookahead.fixed is None else self.lookahead.fixed,
            "device": str(self.device),
            "policy": type(self.policy).__name__,
        }

    def _phase(self, name: str) -> None:
        if self._clock is not None:
            self._clock.switch(name)

    def _running_profiler(self) -> ProfileSession | None:
        p = self.profiler
        return p if p is not None and p.running else None

    # -- policy versions ---------------------------------------------------------------------
    def _fingerprint(self) -> int:
        # In-place updates (optimizer steps, load_state_dict) bump each tensor's version.
        return sum(p._version for p in self.policy.parameters())

    def set_policy_version(self, version: int) -> None:
        """Set the version recorded with the next decisions (otherwise it counts weight updates)."""
        self.policy_version = int(version)
        self._param_versions = self._fingerprint()

    def _refresh_policy_version(self) -> None:
        fp = self._fingerprint()
        if fp != self._param_versions:
            self._param_versions = fp
            self.policy_version += 1

    # -- public calls ------------------------------------------------------------------------
    def rollout(self, num_decisions: int) -> TensorDict:
        """Every env makes ``num_decisions`` decisions; returns a TensorDict ``[num_envs, T]``.

        Envs carry their episodes over from the previous call; with ``auto_reset`` an ended
        episode restarts at once with the next seed, else the env idles (``mask`` False).
        """
        if num_decisions < 1:
            raise ValueError("num_decisions must be >= 1")
        self._check_idle()
        plan = RolloutPlan(
            self.layout,
            self.a,
            self._ids,
            self.seed,
            len(self.stages),
            num_decisions,
            self._buffers,
            self.record_obs,
        )
        return self._call(plan)

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

        Group reset seeds are derived from the engine seed and the call count, unless
        ``reset_seeds`` gives one per group (a fixed, held-out evaluation set).

        Example:
            >>> eps = engine.collect_episodes(num_groups=4, group_size=8)
            >>> held_out = engine.collect_episodes(16, 1, reset_seeds=range(10**6, 10**6 + 16))
        """
        if num_groups < 1 or group_size < 1:
            raise ValueError("num_groups and group_size must be >= 1")
        if reset_seeds is not None:
            reset_seeds = np.asarray(list(reset_seeds), np.int64)
            if reset_seeds.shape != (num_groups,) or (reset_seeds < 0).any():
                raise ValueError(
                    f"reset_seeds: need {num_groups} non-negative seeds (one per group), got "
                    f"{reset_seeds.tolist()}"
                )
        if not self.auto_reset:
            raise EngineError("collect_episodes needs auto_reset=True")
        self._check_idle()
        plan = EpisodePlan(
            self.layout,
            self.a,
            self._ids,
            self.seed,
            self._calls,
            self.exec_len,
            num_groups,
            group_size,
            reset_seeds,
            self._buffers,
            self.record_obs,
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
        self._weights.stage(source, version)
        if self._in_flight is None or self._in_flight.done():
            self._apply_weights()

    def _apply_weights(self) -> None:
        version = self._weights.apply()
        if version is not None:
            self.set_policy_version(version)

    def collect_episodes_async(
        self, num_groups: int, group_size: int, reset_seeds: Sequence[int] | None = None
    ) -> RolloutFuture:
        """``collect_episodes`` in a background thread; returns a future of its TensorDict.

        One call runs at a time: take the previous future's ``result()`` first. With
        ``max_staleness=N`` a result whose ``policy_version`` is more than ``N`` versions
        behind the newest ``update_weights`` is dropped and collected again, with the newest
        weights, when taken (``engine.stats.stale_dropped`` counts the dropped episodes). The
        background call leaves torch's thread count alone (it is process-wide and the
        trainer's).

        Example:
            >>> fut = engine.collect_episodes_async(num_groups=8, group_size=8)
            >>> train_on(previous_batch)           # overlaps the rollout
            >>> batch = fut.result()
        """
        self._check_idle()
        self._apply_weights()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=_ASYNC_THREAD)
        job = lambda: self.collect_episodes(num_groups, group_size, reset_seeds)
        self._in_flight = self._executor.submit(job)
        self.stats.async_calls += 1
        return RolloutFuture(
            self._in_flight,
            latest_version=lambda: self._weights.latest,
            max_staleness=self.max_staleness,
            recollect=lambda: self.collect_episodes(num_groups, group_size, reset_seeds),
            on_drop=self._count_stale,
        )

    def _count_stale(self, episodes: int) -> None:
        self.stats.stale_dropped += episodes

    def _check_idle(self) -> None:
        self._check_open()
        f = self._in_flight
        if f is not None and not f.done() and not _in_async_thread():
            raise EngineError(
                "a collect_episodes_async call is still running: take its result() first"
            )

    def _call(self, plan: Plan) -> TensorDict:
        # A background call (collect_episodes_async) runs with the weights it was started
        # with, and leaves torch's process-wide thread count to the trainer.
        foreground = not _in_async_thread()
        if foreground:
            self._apply_weights()
        self._refresh_policy_version()
        self._phase("bookkeeping")
        self._batcher.new_call()
        threads = torch.get_num_threads()
        if foreground and self.inference_threads is not None:
            torch.set_num_threads(self.inference_threads)
        try:
            self._begin(plan)
            while True:  # the loop resumes from the stages' states after a recovery
                try:
                    self._loop(plan)
                    break
                except EngineError as exc:
                    self._recover(exc, plan)
            self._phase("record")
            for s in self.stages:
                self._record_results(s, plan)
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

    def _begin(self, plan: Plan) -> None:
        """Queue each stage's first episodes and reset the envs that start one: all of them
        for ``collect_episodes``; for ``rollout``, those that never ran or whose episode ended
        with no auto-reset (the others carry on with their episodes). Every stage's RESET
        goes out before any reply is awaited, so the workers reset in parallel."""
        resetting = []
        for s in self.stages:
            s.prepared, s.state = None, StageState.READY  # nothing built ahead survives a call
            if plan.restart_all:
                fresh = np.ones(s.size, bool)
            else:
                fresh = ~self._started[s.lo : s.hi] | (self.a["parked"][s.slot, s.lo : s.hi] == 1)
            for i in s.env_ids[fresh]:
                plan.next_episode(int(i))
            if fresh.any():
                self.a["reset_now"][s.lo : s.hi] = fresh
                resetting.append(s)
            self._started[s.lo : s.hi] = True
        failed = self._command(resetting, P.RESET)
        if failed is not None:
            self._recover(failed, plan)  # completes the resets of the replaced worker's envs
        for s in resetting:
            while s.state is StageState.STEPPING:
                try:
                    self._collect(s, "resetting")
                except EngineError as exc:
                    self._recover(exc, plan)
        now = time.perf_counter_ns()
        for s in self.stages:
            s.ready_ns = now

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self, plan: Plan) -> None:
        stages = self.stages
        if self.batching is not None:
            return self._loop_dynamic(plan)
        if self.mode == "sync":
            while any(plan.wants(s) for s in stages):
                for s in stages:
                    if plan.wants(s):
                        self._dispatch([s], self._infer([s]), plan)
                        self._await(s)
            return
        while True:
            progressed = False
            for g, s in enumerate(stages):
                if s.state is StageState.STEPPING:
                    self._await(s)
                if not plan.wants(s):
                    continue
                out = self._infer([s])
                # While this stage's policy call runs (asynchronously on CUDA), collect the
                # next stage if its workers are done and build its batch, so that its
                # host-to-device copy overlaps this stage's compute.
                self._prefetch(stages[(g + 1) % len(stages)])
                self._dispatch([s], out, plan)
                progressed = True
            if not progressed and not any(s.state is StageState.STEPPING for s in stages):
                return

    def _loop_dynamic(self, plan: Plan) -> None:
        """First-ready batching (:mod:`pipeline.schedule.dynamic`): every stage is one env;
        infer for the envs that are ready, longest-waiting first, as the batching rule allows."""
        rule, cells = self.batching, self.stages
        while True:
            self._harvest(0)
            ready = [c for c in cells if c.state is StageState.READY and plan.wants(c)]
            busy = any(c.state is StageState.STEPPING for c in cells)
            if not ready and not busy:
                return
            oldest = min((c.ready_ns for c in ready), default=0)
            wait = rule.wait_ns(len(ready), oldest, time.perf_counter_ns(), busy)
            if wait is not None:
                self._harvest(wait)
                continue
            ready.sort(key=lambda c: c.ready_ns)
            batch = ready[: rule.max_batch]
            self._dispatch(batch, self._infer(batch), plan)

    def _harvest(self, wait_ns: int) -> None:
        """Take every reply that is in; with none in, wait up to ``wait_ns`` for one
        (``dynamic.WAIT_FOR_REPLY``: as long as it takes, under the watchdog). Each env
        whose reply came is READY from now."""
        busy = sorted({c.workers[0] for c in self.stages if c.state is StageState.STEPPING})
        if not busy:
            return
        if wait_ns:
            self._phase("wait_obs")
        timeout = None if wait_ns == WAIT_FOR_REPLY else wait_ns / 1e9
        self._pool.wait_any(busy, timeout, self.hang_timeout_s, "stepping")
        now = time.perf_counter_ns()
        for w in busy:
            for frame in self._pool.take_replies(w):
                c = self.stages[frame.stage]
                if c.state is not StageState.STEPPING or frame.seq != c.seq:
                    raise ProtocolError(  # an engine bug, not the worker's: not "recovered"
                        f"worker {w}: reply {frame} matches no command in flight (env {c.lo}, "
                        f"seq {c.seq}, {c.state.value})"
                    )
                self._finish_command(c)
                c.last_turn = (now - c.turn_t0, c.turn_policy_ns)
                c.ready_ns = now
        self._phase("bookkeeping")

    def _prefetch(self, s: Stage) -> None:
        if s.state is not StageState.STEPPING:
            return
        if not self._pool.ready(s.workers, self._reply(s), f"stepping stage {s.index}"):
            return
        self._await(s)
        self._phase("preprocess")
        s.prepared = self._prepare([s])
        s.state = StageState.PREPARED

    def _prepare(self, stages: list[Stage]) -> tuple:
        """The policy batch of one stage (zero-copy views) or of several (a gather), on the
        device; on CUDA the copy is queued on the side stream and not waited for here."""
        if len(stages) == 1:
            td = self._batcher.batch(stages[0])
        else:
            td = self._batcher.gather(stages)
        if self._cuda is None:
            return td, None
        return self._cuda.to_device(td, self._running_profiler())

    def _infer(self, stages: list[Stage]):
        """Start a turn of one stage, or of a dynamic batch of them: the batch, then the
        policy call."""
        t0 = time.perf_counter_ns()
        self._phase("preprocess")
        s = stages[0]
        prepared = len(stages) == 1 and s.state is StageState.PREPARED
        td, copied = s.prepared if prepared else self._prepare(stages)
        s.prepared = None
        if copied is not None:
            self._cuda.wait(copied)
        self._phase("inference")
        profiler = self._running_profiler() if self._cuda is not None else None
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

    def _dispatch(self, stages: list[Stage], out, plan: Plan) -> None:
        """End a turn: validate and send the actions, then record while the workers step."""
        self._phase("dispatch")
        self.stats.policy_ns += stages[0].turn_policy_ns
        outputs = self._take_outputs(stages, out)
        for s in stages:
            self._queue_episodes(s, plan)
        failed = self._command(stages, P.STEP)
        self._phase("record")
        t_record = time.perf_counter_ns()
        row = 0
        for s in stages:
            self._record_results(s, plan)  # the previous decision's, while workers step
            mine = (
                outputs
                if len(stages) == 1
                else {key: value[row : row + s.size] for key, value in outputs.items()}
            )
            s.pending = plan.record(s, mine)
            row += s.size
        self.stats.record_ns += time.perf_counter_ns() - t_record
        self._phase("bookkeeping")
        if failed is not None:  # raised only now: the decision is recorded like any other
            raise failed

    def _take_outputs(self, stages: list[Stage], out) -> dict[object, np.ndarray]:
        """Validate the policy's output and land the action chunks in shared memory.

        The workers read a chunk only after its STEP frame, which is sent only if every
        check passes: a bad output never reaches the physics. Returns host arrays to record
        (rows in the order of ``stages``).
        """
        batch = sum(s.size for s in stages)
        if not hasattr(out, "get"):
            raise PolicyOutputError(f"policy returned {type(out).__name__}, not a TensorDict")
        chunk = out.get(schema.ACTION_CHUNK, None)
        want = (batch, self.chunk_len, self.spec.action_dim)
        if not isinstance(chunk, torch.Tensor):
            raise PolicyOutputError(f"policy output has no tensor at {schema.ACTION_CHUNK}")
        if tuple(chunk.shape) != want:
            raise PolicyOutputError(f"action chunk has shape {tuple(chunk.shape)}, expected {want}")
        if not chunk.dtype.is_floating_point:
            raise PolicyOutputError(f"action chunk has dtype {chunk.dtype}, expected a float dtype")
        # torch's copy converts any float dtype (bfloat16 included) into the float32 slots.
        if len(stages) == 1:
            rows = slice(stages[0].lo, stages[0].hi)
            host = self._actions[rows]
            if self._cuda is not None and chunk.is_cuda:
                self._cuda.to_host(host, chunk)
            else:
                host.copy_(chunk.detach())
        else:  # a dynamic batch: rows from anywhere, one scatter
            rows = np.fromiter((s.lo for s in stages), np.int64, len(stages))
            if self._cuda is not None and chunk.is_cuda:
                if self._action_staging is None:
                    self._action_staging = torch.empty_like(self._actions, pin_memory=True)
                staged = self._action_staging[:batch]
                self._cuda.to_host(staged, chunk)
            else:
                staged = chunk.detach().to(torch.float32)
            self._actions.index_copy_(0, torch.from_numpy(rows), staged)
        actions = self.a["actions"][rows]
        if not np.isfinite(actions).all():
            raise PolicyOutputError(
                "action chunk contains NaN or inf; nothing was sent to the envs"
            )
        outputs = {schema.ACTION_CHUNK: actions}
        if self.lookahead.enabled:
            outputs.update(self._frozen_prefix(stages, rows, actions))
        tokens = out.get(schema.ACTION_TOKENS, None)
        if tokens is not None:
            if tuple(tokens.shape) != want or tokens.dtype != torch.long:
                got = f"{tokens.dtype}{list(tokens.shape)}"
                raise PolicyOutputError(f"action tokens are {got}, expected int64{list(want)}")
            outputs[schema.ACTION_TOKENS] = _host(tokens)
        logp = out.get(schema.SAMPLE_LOG_PROB, None)
        if logp is not None:
            logp = _host(logp)
            if logp.shape != (batch,) or not np.isfinite(logp).all():
                raise PolicyOutputError(
                    f"sample_log_prob must be finite [{batch}], got {logp.shape}"
                )
            outputs[schema.SAMPLE_LOG_PROB] = logp
        return outputs

    def _frozen_prefix(self, stages: list[Stage], rows, actions: np.ndarray) -> dict:
        """With lookahead: the decision's frozen prefix goes into its chunk (the env executes
        those actions whatever the policy said, so the record says what ran), and the
        conditioning is recorded with it."""
        slots = stages[0].slot if len(stages) == 1 else np.array([s.slot for s in stages])
        f = prefix_fields(self.a, slots, rows, self.lookahead.overlap)
        n = f["prefix_len"]
        frozen = np.arange(self.chunk_len) < n[:, None]
        if frozen.any():  # the workers never read these positions: this is for the record
            actions[frozen] = f["prefix"][frozen]
        return {
            schema.ACTION_PREFIX: f["prefix"],
            schema.PREFIX_LEN: n,
            schema.PREFIX_OVERLAP: f["prefix_overlap"],
            schema.PREFIX_CONDITIONED: (n > 0) & self._conditions,
        }

    # -- commands and replies ----------------------------------------------------------------
    def _command(self, stages: list[Stage], kind: int) -> EngineError | None:
        """Send STEP or RESET for each stage to every worker of it, into the stage's next
        slot: one write per worker, however many stages. A worker that is gone does not stop
        the others from getting theirs (a recovery relies on every healthy worker having
        its commands); its error is returned."""
        frames: dict[int, list[P.Frame]] = {}
        if kind == P.STEP and self.lookahead.fixed is None:
            self._set_delay(stages)
        for s in stages:
            s.seq += 1
            s.state, s.in_flight = StageState.STEPPING, kind
            for w in s.workers:
                frames.setdefault(w, []).append(P.Frame(kind, s.index, 1 - s.slot, s.seq))
        doing = f"{P.NAMES[kind].lower()} stage {stages[0].index}" if stages else ""
        return self._pool.send_all(frames, doing)

    def _set_delay(self, stages: list[Stage]) -> None:
        """``lookahead="auto"``: measure each stage's report-to-command delay and step time,
        then give its envs the lookahead that covers the longest recent delay."""
        now = time.perf_counter_ns()
        for s in stages:
            res = self.a["results"][s.slot, s.lo : s.hi]
            self.lookahead.observe(now - s.ready_ns, res["env_ns"], res["steps"])
        d = self.lookahead.delay()
        for s in stages:
            self.a["lookahead"][s.lo : s.hi] = d

    def _queue_episodes(self, s: Stage, plan: Plan) -> None:
        """Before a STEP: every env whose queued episode has already started gets the plan's
        next one, so an episode that ends during the chunk restarts at once in the worker."""
        if not self.auto_reset:
            return
        lo, hi = s.lo, s.hi
        started = self.a["next_episode"][lo:hi] == self.a["episode_id"][s.slot, lo:hi]
        for i in s.env_ids[started]:
            plan.next_episode(int(i))

    def _collect(self, s: Stage, doing: str) -> None:
        """Wait for the stage's replies to its last command; its new slot becomes current
        (rows not reset or stepped were carried into it by the worker)."""
        self._phase("wait_obs")
        self._pool.collect(
            s.workers, self._reply(s), self.hang_timeout_s, f"{doing} stage {s.index}"
        )
        self._phase("bookkeeping")
        self._finish_command(s)

    @staticmethod
    def _reply(s: Stage) -> Callable[[tuple], bool]:
        """Matches the workers' reply to the stage's last command."""
        index, seq = s.index, s.seq
        return lambda frame: frame.stage == index and frame.seq == seq

    def _finish_command(self, s: Stage) -> None:
        s.slot = 1 - s.slot
        s.state = StageState.READY
        s.ready_ns = time.perf_counter_ns()
        seqs = self.a["seq"][s.slot, s.lo : s.hi]
        if (seqs != s.seq).any():
            bad = int(np.flatnonzero(seqs != s.seq)[0])
            raise EngineError(f"env {s.lo + bad}: slot {s.slot} holds seq {seqs[bad]}, not {s.seq}")

    def _await(self, s: Stage) -> None:
        """Collect a stage's results. Only what the next decision needs happens here; the
        results are recorded after the stage's next STEP has gone out (``_record_results``),
        while the workers step: the slot holding them is not written until the STEP after."""
        self._collect(s, "stepping")
        s.last_turn = (time.perf_counter_ns() - s.turn_t0, s.turn_policy_ns)

    # -- recovery ----------------------------------------------------------------------------
    @property
    def failures(self) -> list:
        """Every worker failure recovered from, oldest first
        (:class:`pipeline.backends.budget.Failure`)."""
        return list(self._pool.failures)

    def _recover(self, exc: EngineError, plan: Plan) -> None:
        """Replace the worker ``exc`` is about and restart the episodes that ran on its envs,
        or re-raise ``exc`` (``on_worker_failure="raise"``, budget spent, not one worker).

        Every other env goes on exactly as it would have: the healthy workers finish the
        commands they have, their results are recorded as usual, and no seed or episode id
        of theirs changes. The failed worker's running episodes end as aborted (masked) and
        are re-run from their reset with the same ids and seeds, so their retries are the
        trajectories the fault interrupted. Another worker failing meanwhile is replaced too.
        """
        while True:
            if not self._pool.can_replace(exc):
                raise exc
            self._phase("bookkeeping")
            try:
                replaced = self._pool.replace(exc.worker, exc, self.start_timeout_s)
                self.stats.restarts += 1
                for s in self.stages:
                    s.lost.update(w for w in replaced if w in s.workers)
                for s in self.stages:
                    self._resync(s, plan)
                return
            except EngineError as again:
                if again is exc:  # not replaced: the budget is spent, or it always fails
                    raise
                exc = again

    def _resync(self, s: Stage, plan: Plan) -> None:
        """Bring stage ``s`` back to READY after its workers in ``s.lost`` were replaced.
        Safe to call again after a failure half-way: each step is done once."""
        pool, a = self._pool, self.a
        if not s.lost:
            return
        if s.state is StageState.STEPPING:
            if not s.healthy_in:  # the healthy workers' replies to the command in flight
                healthy = [w for w in s.workers if w not in s.lost]
                pool.collect(healthy, self._reply(s), self.hang_timeout_s, "recovering")
                s.healthy_in = True
            target = 1 - s.slot
        else:
            self._record_results(s, plan)  # the current slot's rows are rewritten below
            s.prepared, s.state = None, StageState.READY
            target = s.slot
        for w in sorted(s.lost):
            mine = s.env_ids[self._env_worker[s.lo : s.hi] == w]
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
                pool.send(w, [P.Frame(P.RESET, s.index, target, s.seq)], "recovering")
                pool.collect([w], self._reply(s), self.hang_timeout_s, "recovering")
            finally:
                # What was queued after the retried episodes is queued again (the worker
                # has read the control arrays, or will be replaced and read them again).
                a["next_seed"][mine], a["next_episode"][mine] = saved
            s.aborts.append((mine[retry], a["episode_id"][s.slot, mine][retry]))
            s.lost.discard(w)
        if target != s.slot:
            self._finish_command(s)
            s.last_turn = (time.perf_counter_ns() - s.turn_t0, s.turn_policy_ns)
            self._record_results(s, plan)
        s.healthy_in = False
        for envs, episodes in s.aborts:
            plan.abort(envs, episodes)
        s.aborts.clear()

    def _record_results(self, s: Stage, plan: Plan) -> None:
        if s.pending is None:
            return
        # Whether or not the stage's next STEP is out, its results sit in the current slot.
        plan.store.record_results(s.pending, s.slot, s.lo, s.hi)
        self.stats.log_turn(*s.last_turn, self.a["results_raw"][s.slot, s.lo : s.hi])
        s.pending = None
