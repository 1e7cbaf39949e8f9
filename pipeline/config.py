"""EngineConfig: every option of a :class:`~pipeline.engine.RolloutEngine`, checked in one place.

The config is a frozen dataclass, so it can be built, compared, logged and reused on its own,
and every bad value fails when it is built, with a message that names the option. What can
only be checked against the policy or the env (the chunk length a policy declares, the
env's observation keys) is checked when the engine starts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from pipeline.backends import BackendName
from pipeline.schedule.dynamic import AdaptiveBatching, Batching
from pipeline.schedule.lookahead import Lookahead

if TYPE_CHECKING:
    import torch

Mode = Literal["sync", "pipelined"]
Schedule = Literal["stages", "dynamic"]
OnWorkerFailure = Literal["restart", "raise"]


def _choice(name: str, value: object, kind: object) -> None:
    options = get_args(kind)
    if value not in options:
        raise ValueError(f"{name}={value!r}: choose one of {', '.join(map(repr, options))}")


def _int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")


def partition_problem(num_envs: int, num_workers: int, num_stages: int) -> str | None:
    """What is wrong with splitting the envs into ``num_stages`` fixed stages, or None.
    Every worker must hold envs of every stage (env i lives on worker i % num_workers), so
    that each stage keeps every worker busy.

    Example:
        >>> partition_problem(8, 2, 3)
        'num_envs=8 must divide into num_stages=3 groups'
    """
    n, w, g = num_envs, num_workers, num_stages
    if n % g:
        return f"num_envs={n} must divide into num_stages={g} groups"
    if w > n // g:
        return (
            f"num_workers={w} > envs per stage ({n // g}): every worker must hold envs of "
            "every stage"
        )
    return None


@dataclass(frozen=True)
class EngineConfig:
    """How a :class:`~pipeline.engine.RolloutEngine` runs its envs and its policy.

    Example:
        >>> cfg = EngineConfig(num_envs=16, num_workers=4, schedule="dynamic", max_batch=8)
        >>> engine = RolloutEngine("toy", policy, cfg)
        >>> same = RolloutEngine("toy", policy, num_envs=16, num_workers=4,
        ...                      schedule="dynamic", max_batch=8)

    Args:
        num_envs: envs in all.
        num_workers: env worker processes (or Ray workers); each holds envs of every stage.
        num_stages: fixed groups the loop alternates between (``schedule="stages"``; default 2).
        mode: ``"pipelined"`` infers for one stage while the others step; ``"sync"`` infers,
            steps and awaits each stage in turn (``num_stages=1`` is the lock-step baseline).
        schedule: ``"stages"`` (fixed groups) or ``"dynamic"`` (infer for whichever envs are
            ready, :mod:`pipeline.schedule.dynamic`).
        min_batch: dynamic batching's smallest batch while more envs can come (1 when only
            the others are given). With none of ``min_batch``, ``max_batch`` and
            ``max_wait_us``, dynamic batching sizes its batches from measurements
            (:class:`~pipeline.schedule.dynamic.AdaptiveBatching`), and may choose 2 fixed
            stages from one call to the next where they are as fast.
        max_batch: dynamic batching's largest batch (``num_envs`` when only the others are
            given).
        max_wait_us: how long dynamic batching waits for more envs (0 when only the others
            are given).
        seed: the root of every reset and sampling seed (:mod:`pipeline.seeding`).
        env_kwargs: keyword arguments for the env factory.
        device: where the policy runs; ``"auto"`` takes its parameters' device.
        chunk_len: actions per chunk; default the policy's ``chunk_len`` attribute.
        exec_len: actions executed per chunk (default all, less the lookahead).
        lookahead: actions an env keeps executing while its next chunk is inferred, or
            ``"auto"`` (:mod:`pipeline.schedule.lookahead`).
        auto_reset: an ended episode restarts at once with the next seed.
        on_worker_failure: ``"restart"`` replaces a failed worker and re-runs its episodes;
            ``"raise"`` raises.
        max_restarts: replacements over the engine's life.
        spare_worker: keep one worker process started ahead, its libraries imported and
            (for a registered env) its envs built, to replace a failed worker at once; the
            next spare then starts in the background at idle priority. None: on for the
            local backend when failed workers are replaced.
        hang_timeout_s: a worker whose progress stands still this long has failed.
        start_timeout_s: how long start-up (env creation) may take.
        pin_workers: pin each worker process to one core.
        freeze_gc: ``gc.collect(); gc.freeze()`` once at start (process-wide), so turns do
            not pay for full collections over torch's objects.
        inference_threads: torch's intra-op threads during a call: ``"auto"`` leaves the
            workers their cores, an int sets it, ``None`` leaves torch's setting alone.
        max_staleness: async results more than this many versions behind are re-collected.
        record_obs: the observation keys trajectories keep (default all); every key still
            reaches the policy.
        profile: profile the engine's whole life, from env creation on.
        backend: ``"local"`` (processes), ``"inline"`` (this process, for debugging) or
            ``"ray"`` (a Ray cluster).
        ray_address: the cluster to connect to, unless Ray is already initialized.
        workers_per_node: Ray workers per node actor (default: all on one).

    Raises:
        ValueError: an option out of range, or options that do not go together; the
            message names them.
    """

    num_envs: int
    num_workers: int = 2
    num_stages: int | None = None
    mode: Mode = "pipelined"
    schedule: Schedule = "stages"
    min_batch: int | None = None
    max_batch: int | None = None
    max_wait_us: float | None = None
    seed: int = 0
    env_kwargs: Mapping[str, Any] = field(default_factory=dict)
    device: str | torch.device = "auto"
    chunk_len: int | None = None
    exec_len: int | None = None
    lookahead: int | Literal["auto"] = 0
    auto_reset: bool = True
    on_worker_failure: OnWorkerFailure = "restart"
    max_restarts: int = 10
    spare_worker: bool | None = None
    hang_timeout_s: float = 60.0
    start_timeout_s: float = 300.0
    pin_workers: bool = False
    freeze_gc: bool = True
    inference_threads: int | Literal["auto"] | None = "auto"
    max_staleness: int | None = None
    record_obs: Sequence[str] | None = None
    profile: bool = False
    backend: BackendName = "local"
    ray_address: str | None = None
    workers_per_node: int | None = None

    def __post_init__(self) -> None:
        if self.env_kwargs is None:
            object.__setattr__(self, "env_kwargs", {})
        if isinstance(self.record_obs, str):
            object.__setattr__(self, "record_obs", (self.record_obs,))
        elif self.record_obs is not None:
            object.__setattr__(self, "record_obs", tuple(self.record_obs))
        self.validate()

    @classmethod
    def build(cls, config: EngineConfig | None, options: Mapping[str, Any]) -> EngineConfig:
        """``config`` with ``options`` replacing its fields, or a config of ``options`` alone.

        Raises:
            TypeError: an option that is not a field (the message lists them).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown engine options {unknown}; EngineConfig has {sorted(names)}")
        if config is None:
            if "num_envs" not in options:
                raise TypeError("pass num_envs=... (or an EngineConfig)")
            return cls(**options)
        return dataclasses.replace(config, **options) if options else config

    def validate(self) -> None:
        """Check every option on its own and against the others.

        Raises:
            ValueError: the first problem found, named.
        """
        _choice("backend", self.backend, BackendName)
        _choice("mode", self.mode, Mode)
        _choice("schedule", self.schedule, Schedule)
        _choice("on_worker_failure", self.on_worker_failure, OnWorkerFailure)
        if self.backend != "ray" and (self.ray_address, self.workers_per_node) != (None, None):
            raise ValueError("ray_address and workers_per_node apply to backend='ray'")
        if self.workers_per_node is not None:
            _int("workers_per_node", self.workers_per_node, 1)
        _int("num_envs", self.num_envs, 1)
        _int("num_workers", self.num_workers, 1)
        if self.num_workers > self.num_envs:
            raise ValueError(f"num_workers={self.num_workers} > num_envs={self.num_envs}")
        if self.schedule == "stages":
            if (self.min_batch, self.max_batch, self.max_wait_us) != (None, None, None):
                raise ValueError("min_batch, max_batch and max_wait_us apply to schedule='dynamic'")
            self._check_partition()
        else:
            if self.mode != "pipelined":
                raise ValueError(
                    "schedule='dynamic' runs pipelined; mode='sync' (with stages) is its reference"
                )
            if self.num_stages is not None:
                raise ValueError("num_stages applies to schedule='stages' (dynamic has none)")
            self.batching()
        if self.chunk_len is not None:
            _int("chunk_len", self.chunk_len, 1)
            self.lookahead_for(self.chunk_len)
        elif self.lookahead != "auto":
            Lookahead.check(self.lookahead, chunk_len=1 << 30, exec_len=None)  # its type
        if not self.hang_timeout_s > 0:
            raise ValueError(f"hang_timeout_s={self.hang_timeout_s} must be > 0")
        if not self.start_timeout_s > 0:
            raise ValueError(f"start_timeout_s={self.start_timeout_s} must be > 0")
        _int("max_restarts", self.max_restarts, 0)
        if self.spare_worker and (self.on_worker_failure != "restart" or not self.max_restarts):
            raise ValueError(
                f"spare_worker=True replaces failed workers, but on_worker_failure="
                f"{self.on_worker_failure!r} with max_restarts={self.max_restarts} replaces none"
            )
        if self.spare_worker and self.backend != "local":
            raise ValueError(
                f"spare_worker=True needs backend='local' (process workers of the engine's "
                f"own), not backend={self.backend!r}"
            )
        if self.max_staleness is not None:
            _int("max_staleness", self.max_staleness, 0)
        threads = self.inference_threads
        if threads not in (None, "auto") and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
        ):
            raise ValueError(f"inference_threads={threads!r}: pass an int >= 1, 'auto' or None")

    def _check_partition(self) -> None:
        g = self.stage_count
        _int("num_stages", g, 1)
        problem = partition_problem(self.num_envs, self.num_workers, g)
        if problem is not None:
            raise ValueError(problem)

    @property
    def stage_count(self) -> int:
        """Stages the loop turns over: ``num_stages`` (default 2), or one per env (dynamic)."""
        if self.schedule == "dynamic":
            return self.num_envs
        return 2 if self.num_stages is None else self.num_stages

    def batching(self) -> Batching | AdaptiveBatching | None:
        """Dynamic batching's rule (adaptive unless a bound or the wait is given), or None
        with fixed stages."""
        if self.schedule != "dynamic":
            return None
        if (self.min_batch, self.max_batch, self.max_wait_us) == (None, None, None):
            # Its fallback: 2 fixed stages, where they are a valid partition.
            n, w = self.num_envs, self.num_workers
            fallback = 2 if partition_problem(n, w, 2) is None else None
            return AdaptiveBatching(n, w, stages=fallback)
        return Batching.check(self.num_envs, self.min_batch, self.max_batch, self.max_wait_us)

    def lookahead_for(self, chunk_len: int) -> Lookahead:
        """The lookahead for chunks of ``chunk_len`` (the config's or the policy's)."""
        la = Lookahead.check(self.lookahead, chunk_len, self.exec_len)
        if not 1 <= la.exec_len <= chunk_len:
            raise ValueError(f"exec_len={la.exec_len} must be in [1, chunk_len={chunk_len}]")
        return la

    def chunk_len_for(self, policy: object) -> int:
        """The chunk length: the config's, else the policy's ``chunk_len`` attribute.

        Raises:
            ValueError: neither gives one.
        """
        n = self.chunk_len if self.chunk_len is not None else getattr(policy, "chunk_len", None)
        if n is None or n < 1:
            raise ValueError("chunk_len: pass it, or give the policy a 'chunk_len' attribute")
        return n

    def device_for(self, policy: torch.nn.Module) -> torch.device:
        """Where inference runs: ``device``, or (``"auto"``) the policy's parameters' device
        (a CUDA device when there is one, for a policy without parameters).

        Raises:
            ValueError: the policy's parameters are on another kind of device.
        """
        import torch

        param = next(iter(policy.parameters()), None)
        if str(self.device) == "auto":
            if param is not None:
                return param.device
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if param is not None and param.device.type != device.type:
            raise ValueError(
                f"the policy's parameters are on {param.device} but device={device}: move "
                f"the policy (policy.to('{device}')) or pass device='auto'"
            )
        return device

    def record_obs_for(self, obs_keys: Sequence[str]) -> tuple[str, ...] | None:
        """``record_obs`` checked against the env's observation keys.

        Raises:
            ValueError: a key the env does not have, or one given twice.
        """
        keys = self.record_obs
        if keys is None:
            return None
        unknown = [k for k in keys if k not in obs_keys]
        if unknown or len(set(keys)) != len(keys):
            raise ValueError(
                f"record_obs={list(keys)}: each must be one of the env's observation keys "
                f"{list(obs_keys)}, once (unknown: {unknown})"
            )
        return tuple(keys)

    def backend_options(self) -> dict[str, Any]:
        """The options every backend takes (and Ray's own, for ``backend="ray"``)."""
        options: dict[str, Any] = dict(
            pin_workers=self.pin_workers,
            profile=self.profile,
            max_restarts=self.max_restarts if self.on_worker_failure == "restart" else 0,
        )
        if self.backend == "local":
            restarts = options["max_restarts"] > 0
            options["spare"] = restarts if self.spare_worker is None else self.spare_worker
        if self.backend == "ray":
            options.update(
                workers_per_node=self.workers_per_node,
                ray_address=self.ray_address,
                hang_timeout_s=self.hang_timeout_s,
            )
        return options

    def threads_for(self, device: torch.device) -> int | None:
        """torch's intra-op threads in this process for the duration of a call.

        A trainer runs with torch's default (one thread per core). During a rollout those
        threads compete with the env workers for the same cores, and OpenMP's idle threads
        spin after every parallel op: that cost the pipelined engine a third of its
        speed-up. ``"auto"`` leaves the workers their cores: one thread when inference runs
        on an accelerator (the host only launches kernels), else the cores the workers do
        not use.
        """
        value = self.inference_threads
        if value != "auto":
            return value
        if device.type != "cpu":
            return 1
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        return max(1, (cores or os.cpu_count() or 1) - self.num_workers)
