"""Per-phase profiler: where every millisecond of every process goes.

Example:
    >>> with engine.profile() as prof:
    ...     engine.rollout(16)
    >>> report = prof.report()
    >>> print(report.table())
    >>> report.save("bench_results/run")   # summary.json, trace.json, timeline.png, report.html

This package imports no torch at module level: workers use :mod:`pipeline.runtime.spans`.
"""

from pipeline.runtime.spans import PHASES, PhaseClock, SpanRing, mark

__all__ = ["PHASES", "PhaseClock", "SpanRing", "mark"]
