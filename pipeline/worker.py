"""The env worker process: one explicit state machine around a pipe and shared memory.

States: STARTING (limit threads, create envs) -> HELLO (send the spec) -> ATTACHED (map the
shared memory) -> RUNNING (serve RESET/STEP in order) -> CLOSED. Any env exception is sent
back as a :class:`~pipeline.protocol.WorkerFailure` and the worker exits. The worker also
exits when its parent dies: the kernel kills it (``PR_SET_PDEATHSIG``) and, as a second line,
its command pipe reaches EOF.

This module must not import torch: workers only step physics, and importing torch would cost
every worker start-up time and memory for nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import protocol as P


@dataclass
class WorkerConfig:
    """Everything a worker needs, sent once at start (pickled with dill by multiprocess)."""

    worker_id: int
    env_fn: Any  # a registered env name (str) or a picklable factory
    env_kwargs: dict
    env_ids: list[int]  # global ids of this worker's envs
    env_stage: list[int]  # stage of each of those envs
    auto_reset: bool
    parent_pid: int
    cpu: int | None = None  # pin to this core when set


def _die_with_parent(parent_pid: int) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the pipe EOF still ends the worker
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _make_env(cfg: WorkerConfig):
    if isinstance(cfg.env_fn, str):
        import envs

        return envs.make(cfg.env_fn, **cfg.env_kwargs)
    return cfg.env_fn(**cfg.env_kwargs) if cfg.env_kwargs else cfg.env_fn()


class _Worker:
    def __init__(self, cfg: WorkerConfig, conn) -> None:
        self.cfg, self.conn = cfg, conn
        self.envs: dict[int, Any] = {}
        self.by_stage: dict[int, list[int]] = {}
        for env_id, stage in zip(cfg.env_ids, cfg.env_stage, strict=True):
            self.by_stage.setdefault(stage, []).append(env_id)
        self.episode: dict[int, int] = {}
        self.seed: dict[int, int] = {}
        self.ended: dict[int, bool] = {}  # episode over and not restarted (parked or no auto-reset)
        self.phase, self.current_env = "create", None

    # -- start-up ----------------------------------------------------------------------------
    def start(self) -> bool:
        for env_id in self.cfg.env_ids:
            self.current_env = env_id
            self.envs[env_id] = _make_env(self.cfg)
        self.current_env = None
        specs = {repr(e.spec) for e in self.envs.values()}
        if len(specs) != 1:
            raise ValueError(f"envs in one worker disagree on their spec: {sorted(specs)}")
        P.send(self.conn, P.HELLO)
        self.conn.send(next(iter(self.envs.values())).spec)
        msg = self.conn.recv()  # (shm name, layout arguments) or None to stop
        if msg is None:
            return False
        name, num_envs, chunk_len, slots = msg
        from pipeline.layout import Layout, SharedBuffers

        spec = next(iter(self.envs.values())).spec
        self.shm = SharedBuffers.attach(Layout(spec, num_envs, chunk_len, slots), name)
        self.a = self.shm.arrays
        self.obs_keys = self.shm.layout.obs_keys
        P.send(self.conn, P.ATTACHED)
        return True

    # -- serving -----------------------------------------------------------------------------
    def serve(self) -> None:
        while True:
            try:
                kind, stage, slot, seq = P.recv(self.conn)
            except (EOFError, OSError):
                return  # the parent is gone
            if kind == P.CLOSE:
                return
            if kind == P.RESET:
                self.phase = "reset"
                for env_id in self.by_stage.get(stage, ()):
                    self._reset(env_id, slot, seq)
            elif kind == P.STEP:
                self.phase = "step"
                for env_id in self.by_stage.get(stage, ()):
                    self._step(env_id, slot, seq)
            else:
                raise RuntimeError(f"worker {self.cfg.worker_id}: unknown command {kind}")
            self.current_env = None
            P.send(self.conn, P.DONE, stage, slot, seq)

    def _write_obs(self, env_id: int, slot: int, obs: dict, text: str) -> None:
        """The one copy of an observation: from the env's arrays into its shared slot."""
        t0 = time.perf_counter_ns()
        a = self.a
        for key in self.obs_keys:
            a[f"obs/{key}"][slot, env_id] = obs[key]
        raw = text.encode("utf-8")[: a["instruction"].shape[-1]]
        a["instruction"][slot, env_id, : len(raw)] = np.frombuffer(raw, np.uint8)
        a["instruction_len"][slot, env_id] = len(raw)
        a["write_ns"][slot, env_id] += time.perf_counter_ns() - t0

    def _begin_episode(self, env_id: int, slot: int) -> bool:
        """Start the episode the parent queued for this env; False if it is parked."""
        a = self.a
        seed = int(a["next_seed"][env_id])
        if seed < 0:
            self.ended[env_id] = True
            a["parked"][slot, env_id] = 1
            return False
        env = self.envs[env_id]
        t0 = time.perf_counter_ns()
        obs, _ = env.reset(seed=seed)
        a["env_ns"][slot, env_id] += time.perf_counter_ns() - t0
        self._write_obs(env_id, slot, obs, env.instruction)
        self.episode[env_id] = int(a["next_episode"][env_id])
        self.seed[env_id] = seed
        self.ended[env_id] = False
        a["is_init"][slot, env_id] = 1
        a["parked"][slot, env_id] = 0
        return True

    def _carry(self, env_id: int, slot: int, keep_init: bool = False) -> None:
        """Copy the env's row forward into ``slot`` (the env is not stepping), so every slot
        of every row always holds deterministic content."""
        a, prev = self.a, 1 - slot if self.shm.layout.slots == 2 else slot
        if prev == slot:
            return
        keys = [f"obs/{k}" for k in self.obs_keys] + ["instruction", "instruction_len", "parked"]
        if keep_init:
            keys.append("is_init")
        for key in keys:
            a[key][slot, env_id] = a[key][prev, env_id]

    def _finish(self, env_id: int, slot: int, seq: int) -> None:
        a = self.a
        a["episode_id"][slot, env_id] = self.episode.get(env_id, -1)
        a["reset_seed"][slot, env_id] = self.seed.get(env_id, -1)
        a["seq"][slot, env_id] = seq  # last: the slot is complete

    def _clear_results(self, env_id: int, slot: int) -> None:
        a = self.a
        a["reward"][slot, env_id] = 0.0
        a["steps"][slot, env_id] = 0
        a["terminated"][slot, env_id] = 0
        a["truncated"][slot, env_id] = 0
        a["success"][slot, env_id] = 0
        a["is_init"][slot, env_id] = 0
        a["env_ns"][slot, env_id] = 0
        a["write_ns"][slot, env_id] = 0

    def _reset(self, env_id: int, slot: int, seq: int) -> None:
        self.current_env = env_id
        self._clear_results(env_id, slot)
        if not self.a["reset_now"][env_id]:
            self._carry(env_id, slot, keep_init=True)
        elif not self._begin_episode(env_id, slot):
            self._carry(env_id, slot)
            self.a["parked"][slot, env_id] = 1
        self._finish(env_id, slot, seq)

    def _step(self, env_id: int, slot: int, seq: int) -> None:
        self.current_env = env_id
        a = self.a
        self._clear_results(env_id, slot)
        if self.ended.get(env_id, False):
            a["parked"][slot, env_id] = 1
            self._carry(env_id, slot)
            self._finish(env_id, slot, seq)
            return
        env = self.envs[env_id]
        n = int(a["n_exec"][env_id])
        t0 = time.perf_counter_ns()
        obs, rewards, terminated, truncated, steps, info = env.step_chunk(a["actions"][env_id, :n])
        a["env_ns"][slot, env_id] = time.perf_counter_ns() - t0
        a["reward"][slot, env_id] = float(np.sum(rewards, dtype=np.float64))
        a["steps"][slot, env_id] = steps
        a["terminated"][slot, env_id] = terminated
        a["truncated"][slot, env_id] = truncated
        a["success"][slot, env_id] = bool(info.get("success", False))
        a["parked"][slot, env_id] = 0
        if (terminated or truncated) and self.cfg.auto_reset:
            if self._begin_episode(env_id, slot):
                self._finish(env_id, slot, seq)
                return
            a["parked"][slot, env_id] = 1
        elif terminated or truncated:  # no auto-reset: the env idles until the next RESET
            self.ended[env_id] = True
            a["parked"][slot, env_id] = 1
        self._write_obs(env_id, slot, obs, env.instruction)
        self._finish(env_id, slot, seq)

    def close(self) -> None:
        for env in self.envs.values():
            try:
                env.close()
            except Exception:
                pass
        if hasattr(self, "shm"):
            self.a = {}
            self.shm.close()


def worker_main(cfg: WorkerConfig, conn) -> None:
    """Process entry point (see the module docstring for the state machine)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent(cfg.parent_pid)
    if cfg.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cfg.cpu})
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    worker = _Worker(cfg, conn)
    try:
        if worker.start():
            worker.serve()
    except BaseException as exc:  # report everything, including KeyboardInterrupt in an env
        failure = P.WorkerFailure(
            worker=cfg.worker_id,
            env_id=worker.current_env,
            phase=worker.phase,
            error=repr(exc),
            traceback=traceback.format_exc(),
        )
        try:
            P.send(conn, P.ERROR)
            conn.send(failure)
        except (OSError, EOFError):
            pass
        worker.close()
        sys.exit(1)
    worker.close()
