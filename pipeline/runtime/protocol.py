"""The messages between the inference side and a worker.

Every message starts with one fixed 16-byte frame written straight to the socket's file
descriptor (no length header): the data itself (observations, actions, results) lives in
shared memory, and a frame only says which stage and which slot. Several frames for one
worker may go in one write (``send_many``: a dynamic batch's envs); each is still answered
on its own, in order. Pipes give blocking waits
that cost no CPU while idle, and the parent can wait on every worker's pipe and process
sentinel at once, so a dead worker is noticed immediately.

Start-up hand-shake (the only place anything but a frame travels):

1. worker -> ``HELLO`` frame (its ``stage`` field: how many of its envs a spare built
   ahead), then the env spec, pickled (``conn.send``). A worker whose env
   factory raises sends ``ERROR`` instead (see below) and exits.
2. parent -> ``ATTACH`` frame, then ``(num_envs, chunk_len, num_workers)`` pickled, then the
   shared segment's file descriptor (``SCM_RIGHTS``). Or ``CLOSE``, when start-up is
   abandoned (another worker failed): the worker closes its envs and exits with code 0.
3. worker -> ``ATTACHED`` frame once the memory is mapped.

A spare (a process started ahead of need, :func:`~pipeline.runtime.process.spare_main`)
first prepares and says ``READY`` (its ``stage`` field: the envs it built; an ``ASSIGN``
that comes first cuts the preparing short, and ``READY`` still comes), then waits for
``ASSIGN`` and the :class:`~pipeline.runtime.worker.WorkerConfig` of the worker it becomes,
pickled, or ``CLOSE``; then it goes on at step 1.

Then, in the RUNNING state, commands (parent -> worker), each answered by exactly one reply
in order:

* ``RESET(stage, slot, seq)``: reset the worker's envs of ``stage`` that have ``reset_now``
  set, with their ``next_seed``; write every env's observation into ``slot``.
* ``STEP(stage, slot, seq)``: execute ``actions[:n_exec]`` for the worker's envs of ``stage``,
  write results and the next observation into ``slot`` (auto-resetting ended episodes).
  With lookahead the window's first ``prefix_len`` actions already ran (the frozen prefix,
  executed after the last reply), so ``actions[prefix_len:n_exec]`` are executed; after the
  reply the worker executes ``actions[n_exec:n_exec + lookahead]`` of each env, taken from
  the chunk before replying, while the parent infers.
* ``CLOSE``: close the envs and exit.

Replies (worker -> parent): ``DONE(stage, slot, seq)``, or ``ERROR`` followed by one pickled
:class:`WorkerFailure`; the worker exits after an ``ERROR``. Both pickled messages are off
the hot path.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import NamedTuple

from pipeline.errors import EnvError, ObservationError, ProtocolError

# On the wire: kind, slot, reserved, stage, seq (the order packs into 16 bytes; one stage
# per env needs 32 bits). Code reads frames only as :class:`Frame`, by name.
_WIRE = struct.Struct("<BBHIq")
FRAME_SIZE = _WIRE.size

RESET, STEP, CLOSE, ATTACH, ASSIGN = 1, 2, 3, 4, 5
DONE, ERROR, HELLO, ATTACHED, READY = 10, 11, 12, 13, 14
NAMES = {
    RESET: "RESET",
    STEP: "STEP",
    CLOSE: "CLOSE",
    ATTACH: "ATTACH",
    ASSIGN: "ASSIGN",
    DONE: "DONE",
    ERROR: "ERROR",
    HELLO: "HELLO",
    ATTACHED: "ATTACHED",
    READY: "READY",
}


class Frame(NamedTuple):
    """One message: a command, or the reply naming the command it answers.

    Example:
        >>> f = Frame(STEP, stage=3, slot=1, seq=7)
        >>> Frame.unpack(f.pack()) == f, len(f.pack())
        (True, 16)
    """

    kind: int
    stage: int = 0
    slot: int = 0
    seq: int = 0

    def pack(self) -> bytes:
        return _WIRE.pack(self.kind, self.slot, 0, self.stage, self.seq)

    @classmethod
    def unpack(cls, data: bytes) -> Frame:
        kind, slot, _, stage, seq = _WIRE.unpack(data)
        return cls(kind, stage, slot, seq)

    def answers(self, command: Frame) -> bool:
        """Whether this reply is the one to ``command`` (same stage and sequence number)."""
        return self.stage == command.stage and self.seq == command.seq

    def __str__(self) -> str:
        name = NAMES.get(self.kind, self.kind)
        return f"{name}(stage={self.stage}, slot={self.slot}, seq={self.seq})"


def send(conn, frame: Frame) -> None:
    """Write one frame on ``conn``'s descriptor (16 bytes: a single atomic write)."""
    os.write(conn.fileno(), frame.pack())


def send_many(conn, frames: list[Frame]) -> None:
    """Write several frames with one system call: the worker reads them one at a time, in
    order, as if each had been sent alone."""
    data = b"".join(f.pack() for f in frames)
    view, fd = memoryview(data), conn.fileno()
    while view:  # a socket may take a long write in parts
        view = view[os.write(fd, view) :]


def recv(conn) -> Frame:
    """Read exactly one frame; ``EOFError`` when the other side is gone."""
    fd, buf = conn.fileno(), b""
    while len(buf) < FRAME_SIZE:
        chunk = os.read(fd, FRAME_SIZE - len(buf))
        if not chunk:
            raise EOFError("peer closed the connection")
        buf += chunk
    return Frame.unpack(buf)


def send_attach(conn, shm_fd: int, num_envs: int, chunk_len: int, num_workers: int) -> None:
    """Hand-shake step 2 (parent side)."""
    from multiprocess import reduction

    send(conn, Frame(ATTACH))
    conn.send((num_envs, chunk_len, num_workers))
    reduction.send_handle(conn, shm_fd, None)


def recv_attach(conn) -> tuple[int, int, int, int] | None:
    """Hand-shake step 2 (worker side): ``(shm_fd, num_envs, chunk_len, num_workers)``, or
    None when the parent sent ``CLOSE`` instead."""
    from multiprocess import reduction

    frame = recv(conn)
    if frame.kind == CLOSE:
        return None
    if frame.kind != ATTACH:
        raise ProtocolError(f"expected ATTACH or CLOSE, got {frame}")
    num_envs, chunk_len, num_workers = conn.recv()
    return reduction.recv_handle(conn), num_envs, chunk_len, num_workers


@dataclass
class WorkerFailure:
    """What a worker reports when an env, or an env factory, raises."""

    worker: int
    env_id: int | None
    phase: str  # "create", "reset" or "step"
    error: str  # repr of the exception
    traceback: str
    kind: str = "env"  # "observation": the env's output broke its spec

    def to_error(self, env_name: str) -> EnvError:
        """The exception this report raises in the parent."""
        cls = ObservationError if self.kind == "observation" else EnvError
        return cls(self.describe(env_name), worker=self.worker)

    def describe(self, env_name: str) -> str:
        where = f"env {self.env_id}" if self.env_id is not None else "no env yet"
        return (
            f"worker {self.worker}, {where} ({env_name}) failed during {self.phase}: "
            f"{self.error}\n--- original traceback (in the worker) ---\n{self.traceback}"
        )
