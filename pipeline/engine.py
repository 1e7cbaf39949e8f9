"""RolloutEngine: env worker processes, shared-memory slots, and a pipelined inference loop.

The envs are split into ``num_stages`` fixed groups. Every worker holds envs of every stage.
In ``mode="pipelined"`` the loop infers for stage g while the workers step the other stages;
in ``mode="sync"`` each stage is inferred, stepped and awaited in turn (with ``num_stages=1``
that is the SimpleVLA-RL lock-step baseline). Both modes make the same decisions in the same
order for every stage, and every seed is derived from ids, so their trajectories are bitwise
identical.

Per stage turn (``_decide``): batch the stage's observations straight from shared memory,
run the policy, validate its output, write the action chunks into shared memory, send one
16-byte STEP frame to each worker, then record the decision while the workers step.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import select
import signal
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict

from pipeline import protocol as P
from pipeline import schema
from pipeline.layout import RESULT_DTYPE, Layout, SharedBuffers
from pipeline.profiler.session import ProfileSession
from pipeline.profiler.spans import PhaseClock, SpanRing
from pipeline.recorder import Dest, TrajectoryStore
from pipeline.seeding import GROUP, RESET, derive, sample_seeds
from pipeline.worker import WorkerConfig, worker_main


class EngineError(RuntimeError):
    """Base class of the engine's errors. The engine is closed when one is raised."""


class EnvError(EngineError):
    """An env (or env factory) raised inside a worker; carries the original traceback."""


class WorkerDiedError(EngineError):
    """A worker process exited without being asked to (killed, crashed)."""


class EngineTimeout(EngineError, TimeoutError):
    """Workers did not answer within the timeout."""


class PolicyOutputError(EngineError, ValueError):
    """The policy returned something that must not reach the physics."""


class EngineClosedError(EngineError):
    """The engine was used after close()."""


_WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@contextlib.contextmanager
def _worker_environ():
    """Children inherit the environment at spawn: one BLAS/OpenMP thread per worker, so
    physics processes never oversubscribe the cores."""
    saved = {k: os.environ.get(k) for k in _WORKER_ENV}
    os.environ.update(_WORKER_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _load_sched_getcpu():
    try:
        import ctypes

        fn = ctypes.CDLL("libc.so.6", use_errno=True).sched_getcpu
        fn.restype = ctypes.c_int
        return fn if fn() >= 0 else None
    except (OSError, AttributeError):
        return None


_sched_getcpu = _load_sched_getcpu()


def _shutdown(procs, conns, shm) -> None:
    """Stop workers (politely, then firmly) and release shared memory. Idempotent."""
    for conn in conns:
        with contextlib.suppress(OSError, ValueError):
            P.send(conn, P.CLOSE)
    deadline = time.monotonic() + 2.0
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(2.0)
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.close()
    if shm is not None:
        shm.unlink()
        shm.close()


TURN_SAMPLES = 1 << 16  # bounded: an engine may live for millions of turns


@dataclass
class EngineStats:
    """Cumulative counters of an engine (``engine.stats``; ``reset()`` to start a window).

    Worker times come from the workers themselves (per env, through shared memory); the
    others are measured in the inference loop with ``perf_counter_ns``.
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
    record_ns: int = 0  # copying decisions into the trajectory store
    worker_env_ns: np.ndarray = None
    worker_write_ns: np.ndarray = None

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.decisions = self.env_steps = self.policy_ns = 0
        self.record_ns = 0
        self.turn_ns, self.turn_policy_ns, self.turn_env_ns = (
            deque(maxlen=TURN_SAMPLES) for _ in range(3)
        )
        self.worker_env_ns = np.zeros(self.num_workers, np.int64)
        self.worker_write_ns = np.zeros(self.num_workers, np.int64)


class _Stage:
    """A fixed group of envs: ids ``lo..hi`` and the workers holding them."""

    def __init__(self, index: int, lo: int, hi: int, workers: list[int]) -> None:
        self.index, self.lo, self.hi, self.workers = index, lo, hi, workers
        self.slot = 0  # slot holding the stage's current observations
        self.seq = 0  # sequence number of the last command sent
        self.env_ids = np.arange(lo, hi)
        self.pending: Dest | None = None  # where the in-flight decision was recorded
        self.turn_t0 = self.turn_policy_ns = 0
        self.collected = False  # in-flight results already collected (early, in _decide)
        self.prepared: tuple | None = None  # (slot, batch, copy event), built ahead
        self.unrecorded = False  # collected results not yet copied into the trajectory store
        self.turn_ns = 0


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
    collections over torch's objects; it affects the whole process.

    Errors raise an :class:`EngineError` subclass and close the engine; nothing is left
    running and nothing is left in /dev/shm.
    """

    def __init__(
        self,
        env: str | Callable[..., Any],
        policy: torch.nn.Module,
        *,
        num_envs: int,
        num_workers: int = 2,
        num_stages: int = 2,
        mode: str = "pipelined",
        seed: int = 0,
        env_kwargs: dict | None = None,
        device: str | torch.device = "auto",
        chunk_len: int | None = None,
        exec_len: int | None = None,
        auto_reset: bool = True,
        timeout_s: float = 60.0,
        start_timeout_s: float = 300.0,
        pin_workers: bool = False,
        freeze_gc: bool = True,
        profile: bool = False,
    ) -> None:
        self._closed = True  # until start-up completes
        self._procs, self._conns, self._shm = [], [], None
        if mode not in ("sync", "pipelined"):
            raise ValueError(f"mode={mode!r}: choose 'sync' or 'pipelined'")
        if num_envs < 1 or num_workers < 1 or num_stages < 1:
            raise ValueError("num_envs, num_workers and num_stages must be >= 1")
        if num_envs % num_stages:
            raise ValueError(f"num_envs={num_envs} must divide into num_stages={num_stages} groups")
        per_stage = num_envs // num_stages
        if num_workers > per_stage:
            raise ValueError(
                f"num_workers={num_workers} > envs per stage ({per_stage}): every worker must "
                "hold envs of every stage"
            )
        chunk_len = chunk_len if chunk_len is not None else getattr(policy, "chunk_len", None)
        if chunk_len is None or chunk_len < 1:
            raise ValueError("chunk_len: pass it, or give the policy a 'chunk_len' attribute")
        exec_len = chunk_len if exec_len is None else exec_len
        if not 1 <= exec_len <= chunk_len:
            raise ValueError(f"exec_len={exec_len} must be in [1, chunk_len={chunk_len}]")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.env_name = env if isinstance(env, str) else getattr(env, "__name__", repr(env))
        self.policy, self.mode, self.seed = policy, mode, int(seed)
        self.num_envs, self.num_workers, self.num_stages = num_envs, num_workers, num_stages
        self.chunk_len, self.exec_len, self.auto_reset = chunk_len, exec_len, auto_reset
        self.timeout_s = timeout_s
        self.device = self._resolve_device(device, policy)
        param = next(iter(policy.parameters()), None)
        if param is not None and param.device.type != self.device.type:
            raise ValueError(
                f"the policy's parameters are on {param.device} but device={self.device}: move "
                f"the policy (policy.to('{self.device}')) or pass device='auto'"
            )
        self.policy_version = 0
        self._param_versions = self._fingerprint()
        self.stages = [
            _Stage(g, g * per_stage, (g + 1) * per_stage, list(range(num_workers)))
            for g in range(num_stages)
        ]
        self._env_worker = np.arange(num_envs) % num_workers
        self._next_uid = 0  # episode ids are unique over the engine's life
        self._calls = 0
        self._started = np.zeros(num_envs, bool)  # env has run at least one episode
        self._seed_base = np.zeros(num_envs, np.int64)  # sample_seeds(seed, episode, 0) cache
        self._seed_episode = np.full(num_envs, -2, np.int64)
        self.stats = EngineStats(num_workers)
        # Per stage turn: (turn ns, policy ns, the stage's result records); folded into
        # ``stats`` once per call, so the turn itself only copies the records.
        self._turn_log: list[tuple] = []
        self._instruction_cache: dict[int, NonTensorStack] = {}  # per stage, until a reset
        self._episode_text: dict[int, NonTensorData] = {}  # this call's episodes' instructions
        self._clock: PhaseClock | None = None
        self._ring = SpanRing.local()
        self.profiler: ProfileSession | None = None
        self._start(env, env_kwargs or {}, start_timeout_s, pin_workers, profile)
        if profile:  # profile the whole life of the engine, env creation included
            self.profiler = ProfileSession(self, since=self._created_ns)
            self.profiler.start()
        if freeze_gc:
            # Full collections scan every tracked object, and torch and tensordict create
            # hundreds of thousands: that was ~80 us of every turn. Collect once, then move
            # what is alive now to the permanent generation (process-wide, as servers do).
            gc.collect()
            gc.freeze()
        self._froze_gc = freeze_gc

    # -- start-up ----------------------------------------------------------------------------
    @staticmethod
    def _resolve_device(device, policy) -> torch.device:
        if str(device) == "auto":
            param = next(iter(policy.parameters()), None)
            if param is not None:
                return param.device
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(device)

    def _start(self, env, env_kwargs, start_timeout_s, pin_workers, profile) -> None:
        import multiprocess as mp

        self._created_ns = time.perf_counter_ns()
        # spawn: never fork a parent that may hold CUDA state or torch threads.
        ctx = mp.get_context("spawn")
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self._worker_cpu = (
            [cpus[w % len(cpus)] for w in range(self.num_workers)] if pin_workers and cpus else None
        )
        with _worker_environ():
            for w in range(self.num_workers):
                ids = [int(i) for i in np.flatnonzero(self._env_worker == w)]
                cfg = WorkerConfig(
                    worker_id=w,
                    env_fn=env,
                    env_kwargs=env_kwargs,
                    env_ids=ids,
                    env_stage=[i // (self.num_envs // self.num_stages) for i in ids],
                    auto_reset=self.auto_reset,
                    parent_pid=os.getpid(),
                    cpu=self._worker_cpu[w] if self._worker_cpu else None,
                    profile=profile,
                )
                parent_conn, child_conn = ctx.Pipe(duplex=True)
                proc = ctx.Process(
                    target=worker_main,
                    args=(cfg, child_conn),
                    name=f"rollout-worker-{w}",
                    daemon=True,
                )
                proc.start()
                child_conn.close()
                self._procs.append(proc)
                self._conns.append(parent_conn)
        # From here on a finalizer stops the workers even if the user never calls close().
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._conns, None)
        try:
            specs = []
            for w in range(self.num_workers):
                self._expect(w, P.HELLO, start_timeout_s, "creating its envs")
                specs.append(self._conns[w].recv())
            if any(repr(s) != repr(specs[0]) for s in specs):
                raise EngineError(f"workers disagree on the env spec: {specs}")
            self.spec = specs[0]
            self.layout = Layout(self.spec, self.num_envs, self.chunk_len, 2, self.num_workers)
            self._shm = SharedBuffers.create(self.layout)
            if profile:  # on before the workers serve, so their clocks run from the start
                self._shm.arrays["profile_on"][0] = 1
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._conns, self._shm)
            for conn in self._conns:
                args = (self.num_envs, self.chunk_len, self.layout.slots, self.num_workers)
                conn.send((self._shm.name, *args))
            for w in range(self.num_workers):
                self._expect(w, P.ATTACHED, start_timeout_s, "attaching shared memory")
            self._shm.unlink()  # every worker has it mapped: nothing can leak from now on
        except BaseException:
            self._finalizer()
            raise
        self.a = self._shm.arrays
        self.a["n_exec"][:] = self.exec_len
        self._views = self._make_views()
        self._sources = self._make_sources()
        # One poll set for the whole life of the engine: every worker's socket and sentinel.
        # Whatever frame arrives is read at once into that worker's inbox (replies come in
        # command order), so the set never changes and a queued reply never makes it spin.
        self._poller = select.poll()
        self._inbox: list[deque] = [deque() for _ in range(self.num_workers)]
        self._fd_owner: dict[int, tuple[str, int]] = {}
        for w, (conn, proc) in enumerate(zip(self._conns, self._procs, strict=True)):
            self._poller.register(conn.fileno(), select.POLLIN)
            self._poller.register(proc.sentinel, select.POLLIN)
            self._fd_owner[conn.fileno()] = ("conn", w)
            self._fd_owner[proc.sentinel] = ("sentinel", w)
        self._cuda = _CudaPath(self) if self.device.type == "cuda" else None
        self._closed = False

    def _make_views(self) -> dict[str, torch.Tensor]:
        """Torch tensors over the shared arrays: batches are built without copying."""
        return {
            k: torch.from_numpy(v)
            for k, v in self.a.items()
            if k.startswith("obs/") or k == "actions"
        }

    def _make_sources(self) -> dict[tuple[int, int], TensorDict]:
        """Per (stage, slot), the observation TensorDict of zero-copy views a policy batch
        is made of. Built once: each turn only wraps it with the seeds and instructions."""
        sources = {}
        for s in self.stages:
            n = s.hi - s.lo
            for slot in range(self.layout.slots):
                obs = TensorDict({}, batch_size=[n])
                for key in self.layout.obs_keys:
                    x = self._views[f"obs/{key}"][slot, s.lo : s.hi]
                    if key.startswith("image/"):
                        obs.set(("image", key.split("/", 1)[1]), x.permute(0, 3, 1, 2))
                    else:
                        obs.set(key, x)
                sources[s.index, slot] = obs
        return sources

    def _expect(self, w: int, kind: int, timeout: float, doing: str) -> None:
        from multiprocess.connection import wait

        conn, proc = self._conns[w], self._procs[w]
        ready = wait([conn, proc.sentinel], timeout)
        if conn in ready:
            try:
                got, *_ = P.recv(conn)
            except (EOFError, OSError):
                raise WorkerDiedError(
                    self._death(w, doing) + ". Workers are spawned: a script that creates the "
                    "engine at import time must guard it with `if __name__ == '__main__':`"
                ) from None
            if got == P.ERROR:
                raise EnvError(conn.recv().describe(self.env_name))
            if got != kind:
                raise EngineError(f"worker {w}: protocol error, expected {kind}, got {got}")
            return
        if proc.sentinel in ready:
            raise WorkerDiedError(self._death(w, doing))
        raise EngineTimeout(f"worker {w} did not finish {doing} within {timeout:.0f} s")

    def _death(self, w: int, doing: str) -> str:
        proc = self._procs[w]
        proc.join(0.1)
        code = proc.exitcode
        how = f"exit code {code}"
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                how = f"signal {signal.Signals(-code).name}"
        return f"worker {w} (pid {proc.pid}) died ({how}) while {doing}"

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the workers and release shared memory. Safe to call more than once."""
        if getattr(self, "profiler", None) is not None and self.profiler.running:
            self.profiler.stop()  # read the workers' spans while the memory is still mapped
        self._closed = True
        if getattr(self, "_cuda", None) is not None:
            self._cuda.release()
            self._cuda = None
        self._views = {}
        self.a = {}
        if hasattr(self, "_finalizer"):
            self._finalizer()
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
        return [p.pid for p in self._procs]

    # -- profiling ---------------------------------------------------------------------------
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
        session = ProfileSession(self)
        session.start()
        try:
            yield session
        finally:
            session.stop()

    def profile_report(self):
        """The report of the engine-long profile started by ``profile=True``."""
        if self.profiler is None:
            raise EngineError("this engine was not created with profile=True")
        if self.profiler.running:
            self.profiler.stop()
        return self.profiler.report()

    def _phase(self, name: str) -> None:
        if self._clock is not None:
            self._clock.switch(name)

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
    def rollout(self, num_decisions: int, timeout_s: float | None = None) -> TensorDict:
        """Every env makes ``num_decisions`` decisions; returns a TensorDict ``[num_envs, T]``.

        Envs carry their episodes over from the previous call; with ``auto_reset`` an ended
        episode restarts at once with the next seed, else the env idles (``mask`` False).
        """
        if num_decisions < 1:
            raise ValueError("num_decisions must be >= 1")
        return self._call(_RolloutPlan(self, num_decisions), timeout_s)

    def collect_episodes(
        self, num_groups: int, group_size: int, timeout_s: float | None = None
    ) -> TensorDict:
        """Run ``num_groups * group_size`` complete episodes, GRPO style.

        Members of a group share the reset seed (the same initial state) and have their own
        sampling seeds. Envs that finish early take the next queued episode. Returns a
        TensorDict ``[E]`` (episodes, group-major) whose trajectory fields are ``[E, T, ...]``
        padded to the longest, with ``mask`` ``[E, T]`` and per-episode ``success``,
        ``length`` (decisions), ``env_steps`` and ``group_id``.
        """
        if num_groups < 1 or group_size < 1:
            raise ValueError("num_groups and group_size must be >= 1")
        if not self.auto_reset:
            raise EngineError("collect_episodes needs auto_reset=True")
        return self._call(_EpisodePlan(self, num_groups, group_size), timeout_s)

    def _call(self, plan, timeout_s):
        self._check_open()
        self._timeout = self.timeout_s if timeout_s is None else timeout_s
        self._refresh_policy_version()
        self._phase("bookkeeping")
        self._instruction_cache.clear()
        self._episode_text = {}
        for s in self.stages:  # a batch prepared ahead at the end of the last call
            s.prepared = None
        try:
            plan.begin()
            self._loop(plan)
            self._phase("record")
            for s in self.stages:
                self._record_results(s, plan)
            self._fold_stats(plan.store)
            return plan.result()
        except BaseException:
            self.close()  # a half-finished pipeline cannot be resumed safely
            raise
        finally:
            self._calls += 1
            self._phase("outside")

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self, plan) -> None:
        stages = self.stages
        if self.mode == "sync":
            while any(plan.wants(s) for s in stages):
                for s in stages:
                    if plan.wants(s):
                        self._decide(s, plan)
                        self._await(s)
            return
        in_flight: set[int] = set()
        while True:
            progressed = False
            for s in stages:
                if s.index in in_flight:
                    if not s.collected:  # unless it was collected early (see _decide)
                        self._await(s)
                    s.collected = False
                    in_flight.discard(s.index)
                if plan.wants(s):
                    following = stages[(s.index + 1) % len(stages)]
                    ahead = following if following.index in in_flight else None
                    self._decide(s, plan, ahead)
                    in_flight.add(s.index)
                    progressed = True
            if not progressed and not in_flight:
                return

    def _reset_stage(self, s: _Stage, mask: np.ndarray) -> None:
        """Restart the stage's envs where ``mask`` is set (with their queued ``next_seed``);
        the others carry over untouched. Waits for the workers."""
        if not mask.any():
            return
        self.a["reset_now"][s.lo : s.hi] = mask
        s.seq += 1
        new = 1 - s.slot
        for w in s.workers:
            self._send(w, (P.RESET, s.index, new, s.seq), f"resetting stage {s.index}")
        self._collect(s, "resetting")
        # Rows not reset keep their observation: the worker carried it into the new slot.
        s.slot = new
        self._check_seq(s)

    def _queue_episodes(self, s: _Stage, plan) -> None:
        """Before a STEP: every env whose queued episode has already started gets the plan's
        next one, so an episode that ends during the chunk restarts at once in the worker."""
        if not self.auto_reset:
            return
        lo, hi = s.lo, s.hi
        started = self.a["next_episode"][lo:hi] == self.a["episode_id"][s.slot, lo:hi]
        for i in s.env_ids[started]:
            plan.next_episode(int(i))

    def _send_step(self, s: _Stage) -> None:
        s.seq += 1
        for w in self._wake_order(s.workers):
            self._send(w, (P.STEP, s.index, 1 - s.slot, s.seq), f"stepping stage {s.index}")

    def _wake_order(self, workers: list[int]) -> list[int]:
        """Wake the workers on other cores first: a worker woken on this process's core may
        preempt it before it has woken the rest, which serialises the workers."""
        if self._worker_cpu is None or _sched_getcpu is None:
            return workers
        here = _sched_getcpu()
        return sorted(workers, key=lambda w: self._worker_cpu[w] == here)

    def _send(self, w: int, frame: tuple, doing: str) -> None:
        try:
            P.send(self._conns[w], *frame)
        except OSError:  # BrokenPipeError: the worker is gone
            raise WorkerDiedError(self._death(w, doing)) from None

    def _collect(self, s: _Stage, doing: str) -> None:
        """Block (in poll, burning no CPU) until every worker of the stage answers."""
        need = set(s.workers)
        for w in s.workers:
            if self._inbox[w]:
                self._accept(w, self._inbox[w].popleft(), s)
                need.discard(w)
        if not need:
            return
        deadline = time.monotonic() + self._timeout
        died = None
        self._phase("wait_obs")
        while need:
            remaining = deadline - time.monotonic()
            events = self._poller.poll(max(0, int(remaining * 1000) + 1)) if remaining > 0 else []
            if not events:
                raise EngineTimeout(
                    f"stage {s.index}: workers {sorted(need)} did not finish {doing} within "
                    f"{self._timeout:.1f} s"
                )
            for fd, _ in events:
                what, w = self._fd_owner[fd]
                if what == "sentinel":
                    died = w  # read any reply it sent before dying first
                    continue
                frame = self._read_frame(w, f"{doing} stage {s.index}")
                if w in need and not self._inbox[w]:
                    self._accept(w, frame, s)
                    need.discard(w)
                else:  # a reply for a later command
                    self._inbox[w].append(frame)
            if died is not None:
                raise WorkerDiedError(self._death(died, f"{doing} stage {s.index}"))
        self._phase("bookkeeping")

    def _read_frame(self, w: int, doing: str) -> tuple:
        try:
            frame = P.recv(self._conns[w])
        except (EOFError, OSError):
            raise WorkerDiedError(self._death(w, doing)) from None
        if frame[0] == P.ERROR:
            raise EnvError(self._conns[w].recv().describe(self.env_name))
        return frame

    def _accept(self, w: int, frame: tuple, s: _Stage) -> None:
        kind, stage, _, seq = frame
        if kind != P.DONE or stage != s.index or seq != s.seq:
            raise EngineError(
                f"worker {w}: protocol error: got {P.NAMES.get(kind, kind)} for stage "
                f"{stage} seq {seq}, expected DONE for stage {s.index} seq {s.seq}"
            )

    def _check_seq(self, s: _Stage) -> None:
        seqs = self.a["seq"][s.slot, s.lo : s.hi]
        if (seqs != s.seq).any():
            bad = s.lo + int(np.flatnonzero(seqs != s.seq)[0])
            raise EngineError(f"env {bad}: slot {s.slot} holds seq {seqs[bad - s.lo]}, not {s.seq}")

    def _await(self, s: _Stage) -> None:
        """Collect a stage's results. Only what the next decision needs happens here; the
        results are recorded after the stage's next STEP has gone out (``_record_results``),
        while the workers step: the slot holding them is not written until the STEP after."""
        self._collect(s, "stepping")
        s.slot = 1 - s.slot
        self._check_seq(s)
        s.turn_ns = time.perf_counter_ns() - s.turn_t0
        s.unrecorded = True

    def _record_results(self, s: _Stage, plan) -> None:
        if not s.unrecorded:
            return
        s.unrecorded = False
        plan.store.record_results(s.pending, s.slot, s.lo, s.hi)
        records = self.a["results_raw"][s.slot, s.lo : s.hi].copy()
        self._turn_log.append((s.turn_ns, s.turn_policy_ns, records))

    def _fold_stats(self, store: TrajectoryStore) -> None:
        """Add this call's turns to ``stats``: per-worker env and write times, the slowest
        worker's env time per turn, env steps and decisions, all from the result records."""
        log, self._turn_log = self._turn_log, []
        st = self.stats
        st.decisions += int(store.valid.sum())
        if not log:
            return
        records = np.stack([r for _, _, r in log]).view(RESULT_DTYPE)  # [turns, stage envs]
        owner = self._env_worker[records["env_id"]][..., None] == np.arange(self.num_workers)
        env_ns = (records["env_ns"][..., None] * owner).sum(1)  # [turns, workers]
        st.worker_env_ns += env_ns.sum(0)
        st.worker_write_ns += (records["write_ns"][..., None] * owner).sum((0, 1))
        st.env_steps += int(records["steps"].sum())
        st.turn_ns.extend(t for t, _, _ in log)
        st.turn_policy_ns.extend(p for _, p, _ in log)
        st.turn_env_ns.extend(env_ns.max(1).tolist())

    def _sample_seeds(self, s: _Stage) -> np.ndarray:
        """One seed per (episode, decision) (``seeding.sample_seeds``), with the per-episode
        bases cached."""
        lo, hi = s.lo, s.hi
        episode = self.a["episode_id"][s.slot, lo:hi]
        stale = episode != self._seed_episode[lo:hi]
        if stale.any():
            self._seed_base[lo:hi][stale] = sample_seeds(self.seed, episode[stale], 0)
            self._seed_episode[lo:hi][stale] = episode[stale]
        return self._seed_base[lo:hi] + self.a["t"][s.slot, lo:hi]

    # -- one stage turn ----------------------------------------------------------------------
    def _batch(self, s: _Stage) -> TensorDict:
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

    def _instructions(self, s: _Stage) -> NonTensorStack:
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
            item = self._episode_text.get(episode)
            if item is None:
                text = bytes(raw[i, : n[i]]).decode("utf-8", "replace")
                item = self._episode_text[episode] = NonTensorData(text)
            items.append(item)
        stack = self._instruction_cache[s.index] = NonTensorStack(*items)
        return stack

    def _prepare(self, s: _Stage) -> tuple:
        """The stage's policy batch (on the device; on CUDA the copy is queued on the side
        stream and not waited for here)."""
        td = self._batch(s)
        copied = None
        if self._cuda is not None:
            td, copied = self._cuda.to_device(td)
        return s.slot, td, copied

    def _ready(self, s: _Stage) -> bool:
        """Whether every worker of the stage has replied (never blocks)."""
        for fd, _ in self._poller.poll(0):
            what, w = self._fd_owner[fd]
            if what == "conn":
                self._inbox[w].append(self._read_frame(w, f"stepping stage {s.index}"))
        return all(self._inbox[w] for w in s.workers)

    def _decide(self, s: _Stage, plan, ahead: _Stage | None = None) -> None:
        """One stage turn. ``ahead`` is the next stage still stepping: if its results are in
        by the time this stage's policy call has been launched, collect them and prepare its
        batch right away, so its host-to-device copy overlaps this stage's compute."""
        s.turn_t0 = time.perf_counter_ns()
        self._phase("preprocess")
        prepared = s.prepared if s.prepared is not None and s.prepared[0] == s.slot else None
        _, td, copied = prepared or self._prepare(s)
        s.prepared = None
        if copied is not None:
            self._cuda.wait(copied)
        self._phase("inference")
        profiling = self.profiler is not None and self.profiler.running
        gpu = self.profiler.cuda_mark() if profiling and self._cuda else None
        t_policy = time.perf_counter_ns()
        out = self.policy(td)
        s.turn_policy_ns = time.perf_counter_ns() - t_policy
        if gpu is not None:
            self.profiler.cuda_interval("inference", gpu, self.profiler.cuda_mark())
        if ahead is not None and not ahead.collected and self._ready(ahead):
            self._await(ahead)
            ahead.collected = True
            self._phase("preprocess")
            ahead.prepared = self._prepare(ahead)
        self._phase("dispatch")
        self.stats.policy_ns += s.turn_policy_ns
        outputs = self._take_outputs(s, out)
        self._queue_episodes(s, plan)
        self._send_step(s)
        self._phase("record")
        self._record_results(s, plan)  # the previous decision's results, while workers step
        t_record = time.perf_counter_ns()
        plan.record(s, outputs)
        self.stats.record_ns += time.perf_counter_ns() - t_record
        self._phase("bookkeeping")

    def _take_outputs(self, s: _Stage, out) -> dict[object, np.ndarray]:
        """Validate the policy's output and land the action chunk in shared memory.

        The workers read the chunk only after the STEP frame, which is sent only if every
        check passes: a bad output never reaches the physics. Returns host arrays to record.
        """
        batch = s.hi - s.lo
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
        host = self.a["actions"][s.lo : s.hi]
        if self._cuda is not None:
            self._cuda.actions_to_host(s, chunk)
        else:
            np.copyto(host, chunk.detach().numpy(), casting="same_kind")
        if not np.isfinite(host).all():
            raise PolicyOutputError(
                "action chunk contains NaN or inf; nothing was sent to the envs"
            )
        outputs = {schema.ACTION_CHUNK: host}
        tokens = out.get(schema.ACTION_TOKENS, None)
        if tokens is not None:
            if tuple(tokens.shape) != want or tokens.dtype != torch.long:
                got = f"{tokens.dtype}{list(tokens.shape)}"
                raise PolicyOutputError(f"action tokens are {got}, expected int64{list(want)}")
            outputs[schema.ACTION_TOKENS] = tokens.detach().cpu().numpy()
        logp = out.get(schema.SAMPLE_LOG_PROB, None)
        if logp is not None:
            logp = logp.detach().cpu().numpy()
            if logp.shape != (batch,) or not np.isfinite(logp).all():
                raise PolicyOutputError(
                    f"sample_log_prob must be finite [{batch}], got {logp.shape}"
                )
            outputs[schema.SAMPLE_LOG_PROB] = logp
        return outputs


class _CudaPath:
    """Pinned (registered) host memory, copies on a side stream, overlap across stages."""

    def __init__(self, engine: RolloutEngine) -> None:
        self.engine = engine
        self.device = engine.device
        shm = engine._shm
        cudart = torch.cuda.cudart()
        # Register the whole shared segment so every H2D/D2H copy is a true async DMA.
        err = cudart.cudaHostRegister(shm.address, shm.layout.nbytes, 0)
        self.registered = int(err) == 0 if not isinstance(err, tuple) else int(err[0]) == 0
        self.copy_stream = torch.cuda.Stream(self.device)
        self.done = torch.cuda.Event()

    def to_device(self, td: TensorDict) -> tuple[TensorDict, torch.cuda.Event]:
        """Queue the batch's host-to-device copy on the side stream and return it with the
        event that marks its end. Nothing blocks: a copy queued while another stage computes
        runs concurrently with that compute."""
        prof = (
            self.engine.profiler if self.engine.profiler and self.engine.profiler.running else None
        )
        with torch.cuda.stream(self.copy_stream):
            start = prof.cuda_mark() if prof else None
            dev = td.to(self.device, non_blocking=self.registered)
            copied = torch.cuda.Event(enable_timing=prof is not None)
            copied.record(self.copy_stream)
        if prof:
            prof.cuda_interval("h2d", start, copied)
        return dev, copied

    def wait(self, copied: torch.cuda.Event) -> None:
        """Make the compute stream wait for a batch's copy (the host does not wait)."""
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(copied)

    def actions_to_host(self, s: _Stage, chunk: torch.Tensor) -> None:
        host = self.engine._views["actions"][s.lo : s.hi]
        host.copy_(chunk, non_blocking=self.registered)
        self.done.record(torch.cuda.current_stream(self.device))
        self.done.synchronize()

    def release(self) -> None:
        if self.registered:
            with contextlib.suppress(Exception):
                torch.cuda.cudart().cudaHostUnregister(self.engine._shm.address)
            self.registered = False


class _RolloutPlan:
    """``rollout(T)``: record decision r of env i at ``[i, r]``."""

    def __init__(self, engine: RolloutEngine, num_decisions: int) -> None:
        self.e, self.T = engine, num_decisions
        self.made = np.zeros(engine.num_stages, np.int64)

    def begin(self) -> None:
        e = self.e
        self.store = TrajectoryStore(e.layout, e.a, e.num_envs, self.T)
        for s in e.stages:
            # Envs that never ran, or whose episode ended with no auto-reset, start afresh;
            # the others carry on with their episodes.
            ended = ~e._started[s.lo : s.hi] | (e.a["parked"][s.slot, s.lo : s.hi] == 1)
            for i in s.env_ids[ended]:
                self.next_episode(int(i))
            e._reset_stage(s, ended)
            e._started[s.lo : s.hi] = True

    def next_episode(self, i: int) -> None:
        """Queue a fresh episode (a new id and reset seed) for env ``i``."""
        e = self.e
        uid = e._next_uid
        e._next_uid += 1
        e.a["next_episode"][i] = uid
        e.a["next_seed"][i] = derive(e.seed, RESET, uid)

    def wants(self, s: _Stage) -> bool:
        return self.made[s.index] < self.T

    def record(self, s: _Stage, outputs) -> None:
        # The whole stage at column t: a parked env's entry is recorded too, and its record
        # says it is parked (no decision; the store masks it).
        dest = Dest.block_at(s.lo, int(self.made[s.index]), s.hi - s.lo)
        self.store.record_decision(dest, s.slot, s.lo, s.hi, outputs)
        s.pending = dest
        self.made[s.index] += 1

    def result(self) -> TensorDict:
        e = self.e
        return self.store.to_tensordict(
            seed=e.seed, policy_version=e.policy_version, texts=e._episode_text
        )


class _EpisodePlan:
    """``collect_episodes``: a queue of episodes, group-major; envs pull the next one."""

    def __init__(self, engine: RolloutEngine, num_groups: int, group_size: int) -> None:
        e = self.e = engine
        self.E = num_groups * group_size
        self.group_size = group_size
        call = e._calls
        group_seeds = derive(e.seed, GROUP, call, np.arange(num_groups))
        self.seeds = np.repeat(group_seeds, group_size)
        self.uid0 = e._next_uid
        e._next_uid += self.E
        self.queue = 0  # next episode index to hand out
        self.max_t = math.ceil(e.spec.max_steps / e.exec_len) + 1

    def next_episode(self, i: int) -> None:
        """Queue the next episode of the group-major queue for env ``i``; -1 parks it."""
        e = self.e
        if self.queue < self.E:
            e.a["next_seed"][i] = self.seeds[self.queue]
            e.a["next_episode"][i] = self.uid0 + self.queue
            self.queue += 1
        else:
            e.a["next_seed"][i] = -1
            e.a["next_episode"][i] = -1

    def begin(self) -> None:
        e = self.e
        self.store = TrajectoryStore(e.layout, e.a, self.E, self.max_t)
        for s in e.stages:  # every env starts a fresh episode from the queue (or parks)
            for i in s.env_ids:
                self.next_episode(int(i))
            e._reset_stage(s, np.ones(len(s.env_ids), bool))
            e._started[s.lo : s.hi] = True

    def wants(self, s: _Stage) -> bool:
        return bool((self.e.a["parked"][s.slot, s.lo : s.hi] == 0).any())

    def record(self, s: _Stage, outputs) -> None:
        e = self.e
        live = e.a["parked"][s.slot, s.lo : s.hi] == 0
        src = np.flatnonzero(live)
        rows = e.a["episode_id"][s.slot, s.lo : s.hi][src] - self.uid0
        ts = e.a["t"][s.slot, s.lo : s.hi][src]
        if len(ts) and ts.max() >= self.max_t:
            raise EngineError(f"an episode exceeded {self.max_t} decisions (spec.max_steps)")
        dest = Dest(rows, ts, src, s.hi - s.lo)
        self.store.record_decision(dest, s.slot, s.lo, s.hi, outputs)
        s.pending = dest

    def result(self) -> TensorDict:
        store, e = self.store, self.e
        length = store.valid.sum(1)  # episodes are recorded from their first decision on
        T = int(length.max()) if self.E else 0
        traj = store.to_tensordict(
            seed=e.seed, policy_version=e.policy_version, texts=e._episode_text, t=T
        )
        out = TensorDict({}, batch_size=[self.E])
        for key, value in traj.items(include_nested=True, leaves_only=True):
            out.set(key, value)
        out.set(schema.INSTRUCTION, traj.get(schema.INSTRUCTION))
        done = store.next_field("terminated", T) | store.next_field("truncated", T)
        last = np.maximum(length - 1, 0)
        out.set("length", torch.from_numpy(length.astype(np.int64)))
        out.set("env_steps", torch.from_numpy(store.next_field("steps", T).sum(1).astype(np.int64)))
        out.set(
            "success", torch.from_numpy(store.next_field("success", T)[np.arange(self.E), last])
        )
        out.set("group_id", torch.from_numpy(np.arange(self.E) // self.group_size))
        if not done[np.arange(self.E), last].all():
            raise EngineError("collect_episodes returned an unfinished episode (engine bug)")
        return out
