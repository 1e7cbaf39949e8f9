"""Commands to stages and the workers' replies, over any worker backend.

A command is one frame per worker of a stage: STEP or RESET, the stage, the slot to write and
the stage's next sequence number. A stage is STEPPING from the command until every one of
its workers has replied with that sequence number; then its new slot becomes current and it
is READY. The channel is the only code that moves a stage between those states.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from pipeline.backends import WorkerBackend
from pipeline.errors import EngineError, ProtocolError
from pipeline.runtime import protocol as P
from pipeline.runtime.spans import PhaseSwitch
from pipeline.schedule.dynamic import WAIT_FOR_REPLY
from pipeline.schedule.lookahead import Lookahead
from pipeline.schedule.stages import Stage, StageState


class Channel:
    """Sends stages' commands and collects their replies.

    Example:
        >>> failed = channel.command([stage], P.STEP)   # one frame per worker, never blocks
        >>> channel.await_turn(stage)                    # READY, its new slot current
    """

    def __init__(
        self,
        pool: WorkerBackend,
        arrays: dict[str, np.ndarray],
        stages: list[Stage],
        lookahead: Lookahead,
        hang_timeout_s: float,
        phase: PhaseSwitch,
    ) -> None:
        self.pool, self.a, self.stages, self.lookahead = pool, arrays, stages, lookahead
        self.hang_timeout_s, self.phase = hang_timeout_s, phase

    def command(self, stages: list[Stage], kind: int) -> EngineError | None:
        """Send STEP or RESET for each stage to every worker of it, into the stage's next
        slot: one write per worker, however many stages. A worker that is gone does not stop
        the others from getting theirs (a recovery relies on every healthy worker having
        its commands); its error is returned."""
        frames: dict[int, list[P.Frame]] = {}
        if kind == P.STEP and self.lookahead.fixed is None:
            self.lookahead.retune(self.a, stages, time.perf_counter_ns())
        for s in stages:
            s.seq += 1
            s.state, s.in_flight = StageState.STEPPING, kind
            for w in s.workers:
                frames.setdefault(w, []).append(P.Frame(kind, s.index, 1 - s.slot, s.seq))
        doing = f"{P.NAMES[kind].lower()} stage {stages[0].index}" if stages else ""
        return self.pool.send_all(frames, doing)

    def collect(self, s: Stage, doing: str) -> None:
        """Wait for the stage's replies to its last command; its new slot becomes current
        (rows not reset or stepped were carried into it by the worker)."""
        self.phase("wait_obs")
        self.pool.collect(s.workers, reply_to(s), self.hang_timeout_s, f"{doing} stage {s.index}")
        self.phase("bookkeeping")
        self.finish(s)

    def await_turn(self, s: Stage) -> None:
        """Collect a stage's results. Only what the next decision needs happens here; the
        results are recorded after the stage's next STEP has gone out, while the workers
        step: the slot holding them is not written until the STEP after."""
        self.collect(s, "stepping")
        s.last_turn = (time.perf_counter_ns() - s.turn_t0, s.turn_policy_ns)

    def done(self, s: Stage) -> bool:
        """Whether every reply to the stage's command is in, without waiting."""
        return self.pool.ready(s.workers, reply_to(s), f"stepping stage {s.index}")

    def harvest(self, busy: list[int], wait_ns: int) -> list[Stage]:
        """Take every reply of the ``busy`` workers that is in; with none in, wait up to
        ``wait_ns`` for one (``WAIT_FOR_REPLY``: as long as it takes, under the watchdog).
        Returns the single-env stages whose reply came, READY from now (dynamic batching),
        in the order their replies were read."""
        if not busy:
            return []
        if wait_ns:
            self.phase("wait_obs")
        timeout = None if wait_ns == WAIT_FOR_REPLY else wait_ns / 1e9
        self.pool.wait_any(busy, timeout, self.hang_timeout_s, "stepping")
        now = time.perf_counter_ns()
        came = []
        for w in busy:
            for frame in self.pool.take_replies(w):
                c = self.stages[frame.stage]
                if c.state is not StageState.STEPPING or frame.seq != c.seq:
                    raise ProtocolError(  # an engine bug, not the worker's: not "recovered"
                        f"worker {w}: reply {frame} matches no command in flight (env {c.lo}, "
                        f"seq {c.seq}, {c.state.value})"
                    )
                self.finish(c)
                c.last_turn = (now - c.turn_t0, c.turn_policy_ns)
                c.ready_ns = now
                came.append(c)
        self.phase("bookkeeping")
        return came

    def reset_one(self, w: int, s: Stage, slot: int) -> None:
        """Recovery: RESET worker ``w``'s envs of stage ``s`` into ``slot`` under the stage's
        current sequence number, and wait for its reply."""
        self.pool.send(w, [P.Frame(P.RESET, s.index, slot, s.seq)], "recovering")
        self.pool.collect([w], reply_to(s), self.hang_timeout_s, "recovering")

    def collect_healthy(self, s: Stage) -> None:
        """Recovery: the replies of the stage's workers that were not replaced."""
        healthy = [w for w in s.workers if w not in s.lost]
        self.pool.collect(healthy, reply_to(s), self.hang_timeout_s, "recovering")

    def finish(self, s: Stage) -> None:
        """Every reply is in: the stage's new slot becomes current and it is READY."""
        s.slot = 1 - s.slot
        s.state = StageState.READY
        s.ready_ns = time.perf_counter_ns()
        seqs = self.a["seq"][s.slot, s.lo : s.hi]
        if (seqs != s.seq).any():
            bad = int(np.flatnonzero(seqs != s.seq)[0])
            raise EngineError(f"env {s.lo + bad}: slot {s.slot} holds seq {seqs[bad]}, not {s.seq}")


def reply_to(s: Stage) -> Callable[[P.Frame], bool]:
    """Matches the workers' reply to the stage's last command."""
    index, seq = s.index, s.seq
    return lambda frame: frame.stage == index and frame.seq == seq
