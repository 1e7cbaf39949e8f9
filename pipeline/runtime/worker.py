"""The env worker: one explicit state machine (:class:`State`) around shared memory.

A :class:`Worker` creates its envs (STARTING), offers their spec (OFFERED), is bound to the
shared memory (RUNNING: it handles RESET and STEP frames in order) and is closed (CLOSED);
every move is checked against :data:`TRANSITIONS`. :mod:`pipeline.runtime.process` runs one
in a process, over a pipe; the inline backend drives one in the caller's process, frame by
frame. Any env exception, and any observation that breaks the spec
(:mod:`pipeline.runtime.observations`), becomes a
:class:`~pipeline.runtime.protocol.WorkerFailure`. While RUNNING a worker counts its
progress (control steps, resets, chunks) in shared memory for the parent's watchdog.

This module must not import torch: workers only step physics, and importing torch would cost
every worker start-up time and memory for nothing.
"""

from __future__ import annotations

import enum
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from envs.spec import EnvSpec
from pipeline.errors import ProtocolError
from pipeline.runtime import protocol as P
from pipeline.runtime.layout import ResultRecord, SharedBuffers
from pipeline.runtime.observations import BadObservation, check_observation
from pipeline.runtime.spans import PHASE_ID, PhaseClock, SpanRing

_SUM = np.add.reduce  # ndarray.sum without its Python wrapper: the same sums, sooner


@dataclass
class WorkerConfig:
    """Everything a worker needs, sent once at start (pickled with dill by multiprocess)."""

    worker_id: int
    env_fn: Any  # a registered env name (str) or a picklable factory
    env_kwargs: dict
    env_ids: list[int]  # global ids of this worker's envs
    env_stages: list[tuple[int, ...]]  # the stages each of those envs belongs to
    auto_reset: bool
    parent_pid: int
    cpu: int | None = None  # pin to this core when set
    profile: bool = False  # time env creation for the profiler


@dataclass
class SpareConfig:
    """What a spare is started with: enough to import the env's libraries and, for a
    registered env, to build ``num_envs`` envs before it knows which worker it replaces."""

    env_fn: Any
    env_kwargs: dict
    num_envs: int
    parent_pid: int


def prebuild_envs(spare: SpareConfig, assigned: Callable[[], bool]) -> list:
    """A spare's envs, built ahead: only for the project's own registered envs (a factory,
    or a suite's user constructor, may ask :func:`current_worker`, unknown until the spare
    is assigned). It stops early once ``assigned()``: the worker then builds the rest at
    normal priority. Nothing on failure: the assigned worker then builds its envs itself and
    reports the error as any worker does."""
    import envs

    if not isinstance(spare.env_fn, str) or spare.env_fn not in envs.names():
        return []
    built = []
    try:
        while len(built) < spare.num_envs and not assigned():
            built.append(_make_env(spare))
    except Exception:
        close_quietly(built)
        return []
    return built


def close_quietly(built) -> None:
    """Close envs on the way out; an error closing one must not fail a worker."""
    for env in built:
        try:
            env.close()
        except Exception:
            pass


@dataclass
class _Carried:
    """What an env's lookahead actions came to: part of its next decision's window."""

    reward: float
    steps: int
    terminated: bool
    truncated: bool
    success: bool
    env_ns: int


def _make_env(cfg: WorkerConfig | SpareConfig):
    if isinstance(cfg.env_fn, str):
        import envs

        return envs.make(cfg.env_fn, **cfg.env_kwargs)
    return cfg.env_fn(**cfg.env_kwargs) if cfg.env_kwargs else cfg.env_fn()


_current: int | None = None  # the worker whose envs run now, in this process


def current_worker() -> int | None:
    """The id of the worker whose envs are being created or stepped now (None outside one):
    what an env factory or an env may ask, on every backend, to know where it runs.

    Example:
        >>> def make(**kw):
        ...     env = envs.make("toy", **kw)
        ...     env.worker = current_worker()   # 0 .. num_workers - 1
        ...     return env
    """
    return _current


class _Running:
    """Marks ``worker`` as the one running (:func:`current_worker`) inside the block."""

    __slots__ = ("worker", "saved")

    def __init__(self, worker: int) -> None:
        self.worker = worker

    def __enter__(self) -> None:
        global _current
        self.saved, _current = _current, self.worker

    def __exit__(self, *exc) -> None:
        global _current
        _current = self.saved


class State(enum.Enum):
    STARTING = "starting"  # creating its envs
    OFFERED = "offered"  # the envs exist and their spec is out; waiting for shared memory
    RUNNING = "running"  # bound to shared memory, handling RESET and STEP
    CLOSED = "closed"


# Every move a worker may make; anything else is a bug (ProtocolError).
TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.OFFERED, State.CLOSED}),
    State.OFFERED: frozenset({State.RUNNING, State.CLOSED}),  # CLOSE: start-up abandoned
    State.RUNNING: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}


class Worker:
    """The envs of one worker and what they do with the frames they are sent.

    Example (the inline backend drives one like this; a process runs ``process.worker_main``):
        >>> w = Worker(cfg)
        >>> spec = w.create_envs()
        >>> w.bind(SharedBuffers.create(Layout(spec, num_envs=4, chunk_len=8, num_workers=1)))
        >>> reply = w.handle(P.Frame(P.RESET, stage=0, slot=1, seq=1))   # DONE
        >>> w.run_tails(); w.close()
    """

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.state = State.STARTING
        self.envs: dict[int, Any] = {}
        self.by_stage: dict[int, list[int]] = {}
        for env_id, stages in zip(cfg.env_ids, cfg.env_stages, strict=True):
            for stage in stages:
                self.by_stage.setdefault(stage, []).append(env_id)
        # Per env, indexed by global env id: the running episode, its reset seed, decisions
        # made so far in it, and whether it is over and not restarted (parked or no auto-reset).
        n = max(cfg.env_ids, default=-1) + 1
        self.episode, self.seed, self.t = [-1] * n, [-1] * n, [0] * n
        self.ended = [False] * n
        # Lookahead: per env, the actions to execute after the next report (taken from the
        # chunk before replying, since the loop may overwrite it while they run), and what
        # executing them came to (reported with the next decision's results).
        self.tail: dict[int, np.ndarray] = {}
        self.carried: dict[int, _Carried] = {}
        self.phase, self.current_env = "create", None  # where a failure happened
        self.init_spans: list[tuple[int, int, int]] = []
        self.clock: PhaseClock | None = None
        self._running = _Running(cfg.worker_id)

    def _to(self, state: State) -> None:
        if state not in TRANSITIONS[self.state]:
            raise ProtocolError(
                f"worker {self.cfg.worker_id}: {self.state.value} -> {state.value} is not a "
                "transition of the worker state machine"
            )
        self.state = state

    # -- start-up ----------------------------------------------------------------------------
    def create_envs(self, prebuilt: list | None = None) -> EnvSpec:
        """Create this worker's envs (timed for the profiler) and return their one spec.
        ``prebuilt``: envs a spare built ahead (:func:`prebuild_envs`), taken first; any
        left over are closed."""
        ready = iter(prebuilt or ())  # in the order built, as a cold worker builds them
        for env_id in self.cfg.env_ids:
            self.current_env = env_id
            env = next(ready, None)
            if env is not None:
                self.envs[env_id] = env
                continue
            t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
            with self._running:
                self.envs[env_id] = _make_env(self.cfg)
            if self.cfg.profile:
                self.init_spans.append((t0, time.perf_counter_ns(), time.thread_time_ns() - c0))
        self.current_env = None
        close_quietly(list(ready))
        specs = {repr(e.spec) for e in self.envs.values()}
        if len(specs) != 1:
            raise ValueError(f"envs in one worker disagree on their spec: {sorted(specs)}")
        self._to(State.OFFERED)
        return next(iter(self.envs.values())).spec

    def bind(self, shm: SharedBuffers) -> None:
        """Work on ``shm``: views of the arrays this worker reads and writes. Env creation's
        spans, timed before the rings existed, go into this worker's ring."""
        self._to(State.RUNNING)
        self.shm = shm
        a = self.a = shm.arrays
        self.obs_arrays = [(key, a[f"obs/{key}"]) for key in shm.layout.obs_keys]
        self.obs_fields = [
            (key, fs.shape, fs.dtype, fs.dtype.kind == "f")
            for key, fs in shm.layout.spec.obs.items()
        ]
        self.res, self.actions, self.n_exec = a["results"], a["actions"], a["n_exec"]
        self.chunk_len = self.actions.shape[1]
        self.lookahead, self.prefix = a["lookahead"], a["prefix"]
        self.reset_now, self.next_seed = a["reset_now"], a["next_seed"]
        self.next_episode = a["next_episode"]
        self.written_text: dict[tuple[int, int], str | None] = {}
        w = self.cfg.worker_id
        self.ring = SpanRing(a["spans"][w], a["span_head"][w])
        self.profile_on = a["profile_on"]
        # A memoryview: incrementing through it costs half what a numpy element does, and
        # it is done several times per control step.
        self.progress = memoryview(a["progress"][w : w + 1])
        # The (slot, env) prefix rows this worker knows hold zeros, so an env with no
        # lookahead does not zero its row at every step; unknown until written once (a
        # replacement worker binds to memory its predecessor wrote).
        self.zero_prefix: set[tuple[int, int]] = set()
        for env in self.envs.values():
            if hasattr(env, "on_step"):  # ChunkedEnvMixin envs count every control step
                env.on_step = self._tick
        for t0, t1, cpu in self.init_spans:
            self.ring.add(PHASE_ID["env_init"], t0, t1, cpu)
        if self.init_spans:  # then the hand-shake: the rest of start-up
            self.ring.add(PHASE_ID["env_init"], self.init_spans[-1][1], time.perf_counter_ns(), 0)
        self.init_spans.clear()

    def _tick(self) -> None:
        self.progress[0] += 1

    # -- serving -----------------------------------------------------------------------------
    def handle(self, command: P.Frame) -> P.Frame:
        """Carry out one RESET or STEP and return its DONE reply. The profiling switch is
        read first, so the command is timed in full."""
        self.follow_profiling()
        if self.state is not State.RUNNING or command.kind not in (P.RESET, P.STEP):
            raise ProtocolError(
                f"worker {self.cfg.worker_id} ({self.state.value}) cannot handle {command}"
            )
        do, self.phase = (self._reset, "reset") if command.kind == P.RESET else (self._step, "step")
        with self._running:
            for env_id in self.by_stage.get(command.stage, ()):
                do(env_id, command.slot, command.seq)
        self.current_env = None
        if self.clock:
            self.clock.switch("signal")
        return P.Frame(P.DONE, command.stage, command.slot, command.seq)

    def idle(self) -> None:
        """Between commands: the time until the next one is waiting for actions."""
        if self.clock:
            self.clock.switch("wait_actions")

    def follow_profiling(self) -> None:
        """Start or stop the phase clock when the inference side flips the switch."""
        on = bool(self.profile_on[0])
        if on and self.clock is None:
            self.clock = PhaseClock(self.ring)
            self.clock.switch("wait_actions")  # until the command's first phase, microseconds
            for env in self.envs.values():
                env.time_cpu = True
        elif not on and self.clock is not None:
            self.clock.stop()
            self.clock = None
            for env in self.envs.values():
                env.time_cpu = False

    def _write_obs(self, env_id: int, slot: int, obs: dict, text: str) -> int:
        """The one copy of an observation: from the env's arrays into its shared slot. The
        instruction is written only when it differs from what the slot already holds."""
        t0 = time.perf_counter_ns()
        check_observation(env_id, obs, self.obs_fields)
        for key, arr in self.obs_arrays:
            arr[slot, env_id] = obs[key]
        if self.written_text.get((slot, env_id)) != text:
            raw = text.encode("utf-8")[: self.a["instruction"].shape[-1]]
            self.a["instruction"][slot, env_id, : len(raw)] = np.frombuffer(raw, np.uint8)
            self.a["instruction_len"][slot, env_id] = len(raw)
            self.written_text[slot, env_id] = text
        return time.perf_counter_ns() - t0

    def _carry(self, env_id: int, slot: int) -> None:
        """Copy the env's observation forward into ``slot`` (the env is not stepping), so
        every slot of every row always holds deterministic content."""
        prev = 1 - slot
        for _, arr in self.obs_arrays:
            arr[slot, env_id] = arr[prev, env_id]
        self.prefix[slot, env_id] = self.prefix[prev, env_id]
        if (prev, env_id) in self.zero_prefix:
            self.zero_prefix.add((slot, env_id))
        else:
            self.zero_prefix.discard((slot, env_id))
        self.a["instruction"][slot, env_id] = self.a["instruction"][prev, env_id]
        self.a["instruction_len"][slot, env_id] = self.a["instruction_len"][prev, env_id]
        self.written_text[slot, env_id] = self.written_text.get((prev, env_id))

    def _record(self, env_id: int, seq: int, **fields) -> ResultRecord:
        """An env's result record; fields not given are 0. Stored with a single assignment."""
        return ResultRecord(
            env_id=env_id,
            t=self.t[env_id],
            episode_id=self.episode[env_id],
            reset_seed=self.seed[env_id],
            seq=seq,
            **fields,
        )

    def run_tails(self) -> None:
        """Execute every env's lookahead actions (after the reply), without observing:
        physically they belong to the next decision's window, whose results they are
        reported with."""
        if not self.tail:
            return
        self.phase = "lookahead"
        if self.clock:
            self.clock.switch("physics")
        for env_id, tail in self.tail.items():
            self.current_env = env_id
            t0 = time.perf_counter_ns()
            self._tick()
            with self._running:
                r = self.envs[env_id].step_chunk(tail, observe=False)
            self._tick()
            self.carried[env_id] = _Carried(
                float(_SUM(r.rewards, None, np.float64)),
                r.steps,
                r.terminated,
                r.truncated,
                bool(r.info.get("success", False)),
                time.perf_counter_ns() - t0,
            )
        self.tail.clear()
        self.current_env = None

    def _set_prefix(self, env_id: int, slot: int, n_exec: int | None) -> int:
        """Write the frozen prefix that comes with ``slot``'s observation, and keep its
        actions to execute after the report: ``lookahead[env]`` actions of the chunk from
        ``n_exec`` on (None: the episode just started or ended, no prefix). Returns its
        length, for the result record."""
        d = 0 if n_exec is None else min(int(self.lookahead[env_id]), self.chunk_len - n_exec)
        if d <= 0:
            if (slot, env_id) not in self.zero_prefix:
                self.prefix[slot, env_id] = 0
                self.zero_prefix.add((slot, env_id))
            return 0
        self.zero_prefix.discard((slot, env_id))
        prefix, rest = self.prefix[slot, env_id], self.actions[env_id, n_exec:]
        prefix[: len(rest)] = rest
        prefix[len(rest) :] = 0
        self.tail[env_id] = rest[:d].copy()
        return d

    def _start_queued(self, env_id: int) -> tuple[dict, int] | None:
        """Start the episode the parent queued for this env; None parks the env."""
        self.carried.pop(env_id, None)  # a lookahead's outcome never crosses a reset
        seed = int(self.next_seed[env_id])
        if seed < 0:
            self.ended[env_id] = True
            return None
        if self.clock:
            self.clock.switch("reset")
        t0 = time.perf_counter_ns()
        self._tick()
        obs, _ = self.envs[env_id].reset(seed=seed)
        self._tick()
        self.episode[env_id] = int(self.next_episode[env_id])
        self.seed[env_id] = seed
        self.t[env_id] = 0
        self.ended[env_id] = False
        return obs, time.perf_counter_ns() - t0

    def _reset(self, env_id: int, slot: int, seq: int) -> None:
        self.current_env = env_id
        res = self.res
        if not self.reset_now[env_id]:  # not this env: carry it over as it is
            if self.clock:
                self.clock.switch("obs_write")
            prev = res[1 - slot, env_id]
            self._carry(env_id, slot)
            res[slot, env_id] = self._record(
                env_id,
                seq,
                is_init=prev["is_init"],
                parked=prev["parked"],
                prefix_len=prev["prefix_len"],
            )
            return
        started = self._start_queued(env_id)
        if started is None:
            self._carry(env_id, slot)
            res[slot, env_id] = self._record(env_id, seq, parked=True)
            return
        obs, env_ns = started
        if self.clock:
            self.clock.switch("obs_write")
        write_ns = self._write_obs(env_id, slot, obs, self.envs[env_id].instruction)
        self._set_prefix(env_id, slot, None)
        res[slot, env_id] = self._record(
            env_id, seq, is_init=True, env_ns=env_ns, write_ns=write_ns
        )

    def _step(self, env_id: int, slot: int, seq: int) -> None:
        """Execute the env's chunk and report what came of it. With lookahead the window
        starts with the frozen prefix, already executed after the last report; the chunk is
        executed from there (``prefix_len`` on) to ``n_exec``, and its next actions are
        kept to execute after this report."""
        self.current_env = env_id
        clock = self.clock
        if self.ended[env_id]:
            if clock:
                clock.switch("obs_write")
            self._carry(env_id, slot)
            self.res[slot, env_id] = self._record(env_id, seq, parked=True)
            return
        env = self.envs[env_id]
        carried = self.carried.pop(env_id, None)
        n_exec = int(self.n_exec[env_id])
        if carried is not None and (carried.terminated or carried.truncated):
            # The episode ended within the frozen prefix: the new chunk is never executed.
            obs, reward, steps = None, carried.reward, carried.steps
            terminated, truncated = carried.terminated, carried.truncated
            success, env_ns = carried.success, carried.env_ns
        else:
            frozen = carried.steps if carried is not None else 0  # the prefix, executed
            if clock:
                clock.switch("physics")
            t0 = time.perf_counter_ns()
            self._tick()
            result = env.step_chunk(self.actions[env_id, frozen:n_exec])
            self._tick()
            env_ns = time.perf_counter_ns() - t0
            obs, rewards, terminated, truncated, steps, info = result
            if clock:  # the chunk's one render was its last part
                clock.switch("obs_write", ("render", result.observe_ns, result.observe_cpu_ns))
            reward = float(_SUM(rewards, None, np.float64))
            success = bool(info.get("success", False))
            if carried is not None:
                reward += carried.reward
                steps += carried.steps
                env_ns += carried.env_ns
        is_init = parked = False
        self.t[env_id] += 1
        continues = not (terminated or truncated)
        if not continues:
            if not self.cfg.auto_reset:  # the env idles until the next RESET
                self.ended[env_id] = parked = True
            else:
                started = self._start_queued(env_id)
                if started is None:
                    parked = True  # nothing queued: keep the final observation
                else:
                    obs, reset_ns = started
                    env_ns += reset_ns
                    is_init = True
                    if clock:
                        clock.switch("obs_write")
        if obs is None:  # ended within the prefix and parked: the last picture stands
            self._carry(env_id, slot)
            write_ns = 0
        else:
            write_ns = self._write_obs(env_id, slot, obs, env.instruction)
        prefix_len = self._set_prefix(env_id, slot, n_exec if continues else None)
        self.res[slot, env_id] = self._record(
            env_id,
            seq,
            reward=reward,
            steps=steps,
            terminated=terminated,
            truncated=truncated,
            success=success,
            is_init=is_init,
            parked=parked,
            prefix_len=prefix_len,
            env_ns=env_ns,
            write_ns=write_ns,
        )

    def failure(self, exc: BaseException) -> P.WorkerFailure:
        """What this worker reports about ``exc``, raised by one of its envs or factories;
        call it in the ``except`` block (it takes the traceback being handled)."""
        return P.WorkerFailure(
            worker=self.cfg.worker_id,
            env_id=self.current_env,
            phase=self.phase,
            error=repr(exc),
            traceback=traceback.format_exc(),
            kind="observation" if isinstance(exc, BadObservation) else "env",
        )

    def close(self, unmap: bool = True) -> None:
        """Close the envs and, with ``unmap``, this worker's mapping of the shared memory
        (the inline backend's workers share the caller's, which it unmaps itself)."""
        if self.state is State.CLOSED:
            return
        self._to(State.CLOSED)
        close_quietly(self.envs.values())
        if hasattr(self, "shm"):
            self.a = {}
            if unmap:
                self.shm.close()
