"""Latency-aware chunk execution (real-time chunking for rollouts): how far envs look ahead.

With ``lookahead=d`` a worker reports an env's observation ``d`` actions before its chunk's
window ends, and keeps executing those ``d`` actions while the next chunk is inferred, so the
physics never stands still for the inference latency (Black et al. 2025, "Real-Time
Execution of Action Chunking Flow Policies"). The next chunk is anchored at the reported
observation: its first ``d`` actions are *frozen* (they are the ones being executed) and
only the rest is the policy's to choose.

Every window still executes ``exec_len`` actions: the frozen prefix (executed after the last
report) and the new chunk's actions ``d .. exec_len``; its actions ``exec_len ..
exec_len + d`` are the next prefix. So ``d < exec_len`` and ``exec_len + d <= chunk_len``.
An episode's first decision has no prefix.

The policy sees the prefix as ``("vla_action", "prefix")`` ``[B, H, A]`` (the previous
chunk's actions from this observation on, zeros where it has none), its frozen length
``("vla_action", "prefix_len")`` and how far the previous chunk reaches,
``("vla_action", "prefix_overlap")`` (``H - exec_len``, or 0 without a prefix). A policy
that can condition on them says so with ``conditions_on_prefix = True``; any other runs
"naive async": its chunk is executed from step ``d`` on, and the output says so.

``lookahead="auto"`` sets ``d`` per decision from measured latency: the longest
report-to-command delay over the last :data:`WINDOW` decisions, in control steps of the
measured step time (as RLinf does for evaluation). It follows the machine, so its rollouts
are not reproducible bit for bit; the recorded ``prefix_len`` still says exactly what ran.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

WINDOW = 32  # decisions the "auto" delay looks back over


class Lookahead:
    """The lookahead of an engine: fixed ``d`` or measured (``"auto"``).

    Example:
        >>> la = Lookahead.check(2, chunk_len=8, exec_len=None)
        >>> la.exec_len, la.max_d, la.delay()
        (6, 2, 2)
    """

    def __init__(self, fixed: int | None, exec_len: int, max_d: int, chunk_len: int) -> None:
        self.fixed, self.exec_len, self.max_d, self.chunk_len = fixed, exec_len, max_d, chunk_len
        self._latency_ns: deque[int] = deque(maxlen=WINDOW)
        self._step_ns: deque[float] = deque(maxlen=WINDOW)

    @classmethod
    def check(cls, value: int | str, chunk_len: int, exec_len: int | None) -> Lookahead:
        """Validate ``lookahead`` against the chunk; ``exec_len`` defaults to what leaves room
        for the prefix (``chunk_len - d``; half the chunk for ``"auto"``)."""
        if value == "auto":
            exec_len = max(1, chunk_len // 2) if exec_len is None else exec_len
            max_d = min(chunk_len - exec_len, exec_len - 1)
            if max_d < 1:
                raise ValueError(
                    f"lookahead='auto' needs room for a prefix: exec_len={exec_len} leaves "
                    f"none in chunk_len={chunk_len} (need exec_len >= 2 and < chunk_len)"
                )
            return cls(None, exec_len, max_d, chunk_len)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"lookahead={value!r}: pass an int >= 0 or 'auto'")
        exec_len = chunk_len - value if exec_len is None else exec_len
        if value and not (value < exec_len and exec_len + value <= chunk_len):
            raise ValueError(
                f"lookahead={value} needs value < exec_len and exec_len + lookahead <= "
                f"chunk_len; got exec_len={exec_len}, chunk_len={chunk_len}"
            )
        return cls(value, exec_len, value, chunk_len)

    @property
    def enabled(self) -> bool:
        return self.max_d > 0

    @property
    def overlap(self) -> int:
        """How many of the previous chunk's actions reach past a report: ``H - exec_len``."""
        return self.chunk_len - self.exec_len

    def observe(self, latency_ns: int, env_ns: np.ndarray, steps: np.ndarray) -> None:
        """One decision's measured delay (report to command) and its envs' stepping."""
        self._latency_ns.append(int(latency_ns))
        n = int(steps.sum())
        if n:
            self._step_ns.append(float(env_ns.sum()) / n)

    def retune(self, arrays: dict[str, np.ndarray], stages, now_ns: int) -> None:
        """``"auto"``, before a STEP: measure each stage's report-to-command delay and step
        time, then give its envs the lookahead that covers the longest recent delay."""
        for s in stages:
            res = arrays["results"][s.slot, s.lo : s.hi]
            self.observe(now_ns - s.ready_ns, res["env_ns"], res["steps"])
        d = self.delay()
        for s in stages:
            arrays["lookahead"][s.lo : s.hi] = d

    def delay(self) -> int:
        """``d`` for the next decision."""
        if self.fixed is not None:
            return self.fixed
        if not self._latency_ns or not self._step_ns:
            return self.max_d  # nothing measured yet: cover as much as the chunk allows
        step_ns = float(np.median(self._step_ns))
        d = math.ceil(max(self._latency_ns) / max(step_ns, 1.0))
        return int(min(max(d, 0), self.max_d))


def prefix_fields(
    arrays: dict[str, np.ndarray], slots: int | np.ndarray, envs, overlap: int
) -> dict[str, np.ndarray]:
    """The conditioning that comes with the observations in ``[slots, envs]``, as the policy
    gets it and the trajectory records it: ``prefix`` ``[B, H, A]``, ``prefix_len`` and
    ``prefix_overlap`` (``overlap`` where there is a prefix, else 0)."""
    n = np.ascontiguousarray(arrays["prefix_len"][slots, envs], np.int64)
    return {
        "prefix": arrays["prefix"][slots, envs],
        "prefix_len": n,
        "prefix_overlap": np.where(n > 0, overlap, 0),
    }
