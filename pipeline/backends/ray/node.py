"""One node of the Ray backend: its share of the engine's workers, run by a local pool.

A :class:`NodeActor` lives on one Ray node. It runs the node's env workers with the same
:class:`~pipeline.backends.local.WorkerPool` as the local backend (processes, frames, its own
shared-memory segment, the watchdog), and moves data in bulk:

* ``command``: one call per node per engine command carries the node's rows of the control
  arrays (action chunks, exec lengths, seeds to start) and the frames for its workers;
* ``poll``: blocks until every worker of the node has answered some stage's command, then
  returns those replies with the slot rows they wrote (observations, results, instructions,
  prefixes): a stage's data leaves the node in one message, whatever its number of workers.
  A thread of the actor pushes each poll's result to the driver over a TCP connection of
  its own (``open_channel``), not through Ray's object store.

Replies are tagged with the worker's *generation* (how many times the node replaced it), so
the driver can drop a reply a replaced worker sent before it was replaced.

This module is imported on the nodes, and by the driver only when ``backend="ray"``; it
needs no Ray itself (the driver wraps the class in ``ray.remote``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from envs.spec import EnvSpec
from pipeline.backends.local import WorkerPool
from pipeline.errors import EngineError, ProtocolError
from pipeline.runtime import protocol as P
from pipeline.runtime.layout import Layout

# A poll with nothing to report returns after this long, so the driver notices a node that
# stopped answering without waiting on a call that never ends.
POLL_PERIOD_S = 1.0
# The longest the poll thread holds the pool between two looks at the clock (the pool's own
# wait returns at once when a reply arrives; this only bounds how long a respawn waits).
_SLICE_S = 0.02


def stage_rows(
    env_ids: list[list[int]], env_stages: list[tuple[int, ...]]
) -> dict[tuple[int, int], np.ndarray]:
    """``(worker, stage) -> env ids``: the rows a worker writes when it answers a stage.

    Example:
        >>> stage_rows([[0, 2], [1, 3]], env_stages=[(0,), (0,), (1,), (1,)])[(0, 1)]
        array([2])
    """
    out: dict[tuple[int, int], list[int]] = {}
    for w, ids in enumerate(env_ids):
        for e in ids:
            for s in env_stages[e]:
                out.setdefault((w, s), []).append(e)
    return {k: np.array(v, np.int64) for k, v in out.items()}


def error_payload(exc: EngineError) -> tuple[str, str, int | None]:
    """An engine error as plain data: its class, message (notes included) and worker.
    (Pickling an :class:`EngineError` keeps the message but drops ``worker``.)"""
    message = "\n".join([str(exc), *getattr(exc, "__notes__", ())])
    return type(exc).__name__, message, exc.worker


class NodeActor:
    """The node's workers and shared memory (wrapped in ``ray.remote`` by the driver).

    Example (what :class:`pipeline.backends.ray.pool.RayPool` does):
        >>> node = ray.remote(NodeActor).remote(0, "toy", {}, env_ids, env_stages, True,
        ...                                     "toy", workers=[0, 1])
        >>> spec = ray.get(node.hello.remote(60.0))
        >>> pids = ray.get(node.attach.remote(16, 8, 4, 60.0, None))
    """

    def __init__(
        self,
        node: int,
        env: str | Callable[..., Any],
        env_kwargs: dict,
        env_ids: list[list[int]],
        env_stages: list[tuple[int, ...]],
        auto_reset: bool,
        env_name: str,
        *,
        workers: list[int],
        pin_workers: bool = False,
        profile: bool = False,
        hang_timeout_s: float = 60.0,
    ) -> None:
        self.node, self.workers, self.hang_timeout_s = node, list(workers), hang_timeout_s
        # max_restarts=0: every failure goes to the driver, which holds the engine's one
        # restart budget and asks for a respawn.
        self.pool = WorkerPool(
            env, env_kwargs, env_ids=env_ids, env_stages=env_stages, auto_reset=auto_reset,
            env_name=env_name, pin_workers=pin_workers, profile=profile, max_restarts=0,
            workers=workers,
        )  # fmt: skip
        self.rows = {k: v for k, v in stage_rows(env_ids, env_stages).items() if k[0] in workers}
        self.generation = dict.fromkeys(workers, 0)
        # The poll thread holds `_pool_lock` while it waits on the pool; a respawn takes it to
        # change the poll set. `_book` guards what is in flight: per worker the frames not
        # answered, per (stage, seq) the workers still to answer and the replies already in.
        self._pool_lock = threading.Lock()
        self._book = threading.Condition()
        self._busy = dict.fromkeys(workers, 0)
        self._waiting: dict[tuple[int, int], set[int]] = {}
        self._held: dict[tuple[int, int], list[tuple[int, int, tuple]]] = {}
        self._next_command = 0
        # The reply channel: after an error the push thread waits for the driver's respawn
        # (the node would report the same failure again: a dead worker's sentinel stays
        # readable), and ends with the node.
        self._resume = threading.Event()
        self._resume.set()
        self._closing = False

    # -- start-up ----------------------------------------------------------------------------
    def hello(self, start_timeout_s: float) -> EnvSpec | tuple:
        """Spawn the node's workers; their env spec, or an error payload."""
        try:
            return self.pool.spawn_all(start_timeout_s)
        except EngineError as exc:
            return ("error", *error_payload(exc))

    def attach(
        self,
        num_envs: int,
        chunk_len: int,
        num_workers: int,
        start_timeout_s: float,
        slots: dict[str, np.ndarray] | None,
    ) -> list[int] | tuple:
        """Create the node's shared memory (the engine's layout) and attach every worker;
        ``slots`` seeds the node's rows of both slots (a replacement node takes over the
        rows its predecessor left in the driver). Returns the workers' pids."""
        try:
            layout = Layout(self.pool.spec, num_envs, chunk_len, num_workers)
            self.pool.attach_all(layout, start_timeout_s)
            if slots is not None:
                rows = self._node_envs()
                for key, value in slots.items():
                    self.pool.shm.arrays[key][:, rows] = value
            return self.pool.pids()
        except EngineError as exc:
            return ("error", *error_payload(exc))

    def _node_envs(self) -> np.ndarray:
        return np.sort(np.concatenate([self.pool.env_ids[w] for w in self.workers]))

    # -- commands ----------------------------------------------------------------------------
    def command(
        self,
        number: int,
        frames: dict[int, list[P.Frame]],
        rows: np.ndarray,
        control: dict[str, np.ndarray],
        profile_on: bool,
    ) -> None:
        """Land the control rows in the node's memory, then send each worker its frames.

        ``number`` counts the driver's calls to this node: Ray runs one submitter's calls in
        order, and this checks it (frames out of order would break the protocol)."""
        if number != self._next_command:
            raise ProtocolError(
                f"node {self.node}: command {number} arrived, expected {self._next_command}"
            )
        self._next_command += 1
        a = self.pool.shm.arrays
        for key, value in control.items():
            a[key][rows] = value
        a["profile_on"][0] = profile_on
        with self._book:
            for w, fs in frames.items():
                self._busy[w] += len(fs)
                for f in fs:
                    self._waiting.setdefault((f.stage, f.seq), set()).add(w)
            self._book.notify_all()
        # A worker that is gone is found by the poll (its sentinel), which reports it.
        self.pool.send_all(frames, "stepping")

    def poll(self, timeout_s: float = POLL_PERIOD_S) -> tuple[list, list, tuple | None]:
        """Wait until every worker of the node has answered some stage's command (or
        ``timeout_s`` passes), and return ``(replies, data, error)``:

        * ``replies``: ``(worker, generation, frame)`` for each reply of those stages;
        * ``data``: per reply, the slot rows it wrote (``{key: array}``);
        * ``error``: an error payload when a worker failed (died, raised, stuck).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            with self._book:
                done = [k for k, left in self._waiting.items() if not left]
                busy = [w for w in self.workers if self._busy[w] > 0]
                if not done and not busy:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return [], [], None
                    self._book.wait(remaining)
                    continue
            if done:
                return self._release(done) + (None,)
            try:
                with self._pool_lock:
                    live = [w for w in busy if self.pool.procs[w] is not None]
                    self.pool.wait_any(live, _SLICE_S, self.hang_timeout_s, "stepping")
                    self._take(live)
            except EngineError as exc:
                return [], [], error_payload(exc)
            if time.monotonic() >= deadline:
                with self._book:
                    done = [k for k, left in self._waiting.items() if not left]
                return self._release(done) + (None,)

    def _take(self, workers: list[int]) -> None:
        with self._book:
            for w in workers:
                for frame in self.pool.take_replies(w):
                    key = (frame.stage, frame.seq)
                    self._busy[w] -= 1
                    self._waiting.get(key, set()).discard(w)
                    self._held.setdefault(key, []).append((w, self.generation[w], frame))

    def _release(self, keys: list) -> tuple[list, list]:
        replies, data = [], []
        a = self.pool.shm.arrays
        with self._book:
            for key in keys:
                del self._waiting[key]
                for w, gen, frame in self._held.pop(key, []):
                    rows = self.rows[(w, frame.stage)]
                    slot = frame.slot
                    replies.append((w, gen, frame))
                    data.append({k: a[k][slot, rows] for k in self.pool.layout.slot_keys})
        return replies, data

    # -- the reply channel -------------------------------------------------------------------
    def open_channel(self, host: str, authkey: bytes) -> tuple[str, int]:
        """Listen on ``host`` for the driver's connection, then push every :meth:`poll`
        result down it as it comes (empty ones are heartbeats). A TCP connection of the
        node's own: 4.5-5x faster per round trip than a Ray call here (``bench.py ray --part
        channel``). Commands stay Ray calls, ordered with every other call."""
        from multiprocessing.connection import Listener

        listener = Listener((host, 0), authkey=authkey)
        threading.Thread(target=self._push, args=(listener,), daemon=True).start()
        return listener.address

    def _push(self, listener) -> None:
        with listener, listener.accept() as conn:
            while True:
                self._resume.wait()
                if self._closing:
                    return
                try:
                    replies, data, error = self.poll(POLL_PERIOD_S)
                except Exception:
                    if self._closing:  # the pool closed under the poll
                        return
                    raise
                if error is not None:
                    self._resume.clear()  # until respawn()
                try:
                    conn.send((replies, data, error))
                except OSError:  # the driver is gone
                    return

    # -- failures ----------------------------------------------------------------------------
    def respawn(self, w: int, start_timeout_s: float) -> int | tuple:
        """Replace worker ``w`` (attached to the node's memory); forget what it had in flight.
        Returns its new generation, or an error payload."""
        with self._pool_lock, self._book:
            self.generation[w] += 1
            self._busy[w] = 0
            for left in self._waiting.values():
                left.discard(w)
            for key, held in self._held.items():
                self._held[key] = [h for h in held if h[0] != w]
            try:
                self.pool.respawn(w, start_timeout_s)
            except EngineError as exc:
                return ("error", *error_payload(exc))
            finally:
                self._resume.set()
            return self.generation[w]

    # -- profiling and shutdown ---------------------------------------------------------------
    def pids(self) -> list[int]:
        return self.pool.pids()

    def rings(self) -> dict[int, tuple[np.ndarray, int]]:
        """Each worker's span ring: its buffer and head (copies)."""
        a = self.pool.shm.arrays
        return {w: (a["spans"][w].copy(), int(a["span_head"][w][0])) for w in self.workers}

    def clear_ring(self, w: int) -> None:
        self.pool.shm.arrays["span_head"][w][0] = 0

    def close(self) -> None:
        """Stop the node's workers and release its memory."""
        self._closing = True
        self._resume.set()
        with self._pool_lock:
            self.pool.close()
