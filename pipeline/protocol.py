"""The messages between the inference side and a worker.

Every message starts with one fixed 16-byte frame written straight to the socket's file
descriptor (no pickling, no length header): the data itself (observations, actions, results)
lives in shared memory, and the frame only says which stage and which slot.
Pipes give blocking waits that cost no CPU while idle, and the parent can wait on every
worker's pipe and process sentinel at once, so a dead worker is noticed immediately.

Commands (parent -> worker), each answered by exactly one reply, in order:

* ``RESET(stage, slot, seq)``: reset the worker's envs of ``stage`` with their ``next_seed``,
  write observations into ``slot``.
* ``STEP(stage, slot, seq)``: execute ``actions[:n_exec]`` for the worker's envs of ``stage``,
  write results and the next observation into ``slot`` (auto-resetting ended episodes).
* ``CLOSE``: close the envs and exit.

Replies (worker -> parent): ``DONE(stage, slot, seq)``, or ``ERROR`` followed by one pickled
:class:`WorkerFailure` (the only pickled message; never on the hot path). At start-up a
worker sends ``HELLO`` with its pickled env spec, then ``ATTACHED`` once it has mapped the
shared memory.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

FRAME = struct.Struct("<BBHIq")  # kind, stage, slot, reserved, seq

RESET, STEP, CLOSE = 1, 2, 3
DONE, ERROR, HELLO, ATTACHED = 10, 11, 12, 13
NAMES = {RESET: "RESET", STEP: "STEP", CLOSE: "CLOSE", DONE: "DONE", ERROR: "ERROR"}


def unpack(frame: bytes) -> tuple[int, int, int, int]:
    kind, stage, slot, _, seq = FRAME.unpack(frame)
    return kind, stage, slot, seq


def send(conn, kind: int, stage: int = 0, slot: int = 0, seq: int = 0) -> None:
    """Write one frame on ``conn``'s descriptor (16 bytes: a single atomic write)."""
    os.write(conn.fileno(), FRAME.pack(kind, stage, slot, 0, seq))


def recv(conn) -> tuple[int, int, int, int]:
    """Read exactly one frame; ``EOFError`` when the other side is gone."""
    fd, buf = conn.fileno(), b""
    while len(buf) < FRAME.size:
        chunk = os.read(fd, FRAME.size - len(buf))
        if not chunk:
            raise EOFError("peer closed the connection")
        buf += chunk
    return unpack(buf)


@dataclass
class WorkerFailure:
    """What a worker reports when an env, or an env factory, raises."""

    worker: int
    env_id: int | None
    phase: str  # "create", "reset" or "step"
    error: str  # repr of the exception
    traceback: str

    def describe(self, env_name: str) -> str:
        where = f"env {self.env_id}" if self.env_id is not None else "no env yet"
        return (
            f"worker {self.worker}, {where} ({env_name}) failed during {self.phase}: "
            f"{self.error}\n--- original traceback (in the worker) ---\n{self.traceback}"
        )
