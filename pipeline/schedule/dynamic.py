"""The rule of first-ready dynamic batching (``schedule="dynamic"``): when to infer, for whom.

With fixed stages a turn waits for the slowest env of its stage (an episode end, a reset, a
contact-heavy chunk). Dynamic batching has no partition: every env is ready on its own the
moment its worker has stepped it, and the loop infers for whichever envs are ready, as
EnvPool does. :class:`Batching` decides when a batch is worth inferring:

- at once when ``max_batch`` envs are ready, or when no other env can become ready;
- never for fewer than ``min_batch`` envs while more can come;
- otherwise after ``max_wait_us`` from the moment the longest-waiting env became ready
  (waits block in ``poll``, whose resolution is a millisecond: a shorter wait lasts a
  millisecond unless an env becomes ready first).

The defaults (1, all envs, 0 us) infer as soon as the policy is free, for every env ready by
then: the batch size follows the policy's latency on its own (a slow call lets more envs
finish). Which envs share a batch never changes a trajectory, because every row's sampling
seed depends only on its own episode and decision, and a batch-invariant policy computes
each row alike in any batch (see ``RolloutEngine``).
"""

from __future__ import annotations

from dataclasses import dataclass

WAIT_FOR_REPLY = -1  # wait for the next env to become ready, however long (watchdog aside)


@dataclass(frozen=True)
class Batching:
    """The batch-size window and the wait. Build it with :meth:`check`.

    Example:
        >>> rule = Batching.check(num_envs=16, min_batch=4, max_batch=8, max_wait_us=500)
        >>> rule.wait_ns(ready=5, oldest_ns=0, now_ns=200_000, more_coming=True)
        300000
    """

    min_batch: int
    max_batch: int
    max_wait_ns: int

    @classmethod
    def check(
        cls,
        num_envs: int,
        min_batch: int | None,
        max_batch: int | None,
        max_wait_us: float | None,
    ) -> Batching:
        """The rule for ``num_envs`` envs; ``None`` takes the default; bad values raise."""
        lo = 1 if min_batch is None else min_batch
        hi = num_envs if max_batch is None else max_batch
        wait = 0.0 if max_wait_us is None else max_wait_us
        if isinstance(lo, bool) or not isinstance(lo, int) or not 1 <= lo <= num_envs:
            raise ValueError(f"min_batch={min_batch!r} must be an int in [1, num_envs={num_envs}]")
        if isinstance(hi, bool) or not isinstance(hi, int) or not lo <= hi <= num_envs:
            raise ValueError(
                f"max_batch={max_batch!r} must be an int in [min_batch={lo}, num_envs={num_envs}]"
            )
        if not wait >= 0:  # also rejects NaN
            raise ValueError(f"max_wait_us={max_wait_us!r} must be >= 0")
        return cls(lo, hi, int(wait * 1000))

    def wait_ns(self, ready: int, oldest_ns: int, now_ns: int, more_coming: bool) -> int | None:
        """``None`` to infer now for up to ``max_batch`` of the ``ready`` envs; otherwise how
        long to wait for more (:data:`WAIT_FOR_REPLY`: until the next env is ready).

        ``oldest_ns`` is when the longest-waiting ready env became ready; ``more_coming``
        says whether any env is still stepping."""
        if ready >= self.max_batch or (ready and not more_coming):
            return None
        if ready < self.min_batch:
            return WAIT_FOR_REPLY
        remaining = oldest_ns + self.max_wait_ns - now_ns
        return None if remaining <= 0 else remaining
