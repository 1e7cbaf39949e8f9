"""Training overlapped with rollouts: weight snapshots and the future of a running call.

While a trainer updates on batch k, the engine collects batch k+1 in a background thread
with the weights of the version it started with. Two rules keep that honest:

- The rollout policy never reads a tensor an optimizer step is halfway through writing:
  ``update_weights`` copies the trainer's weights *when it is called* into a snapshot, and
  the snapshot is loaded into the rollout policy only between calls.
- Data older than ``max_staleness`` versions is dropped and collected again with the current
  weights when the trainer takes it, and the drop is counted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from tensordict import TensorDict
from torch import nn


class WeightSync:
    """The newest weights handed over by the trainer, waiting for a safe point.

    Example:
        >>> sync = WeightSync(rollout_policy)
        >>> sync.stage(trainer_policy, version=3)   # snapshot now; trainer may step again
        >>> sync.apply()                             # between calls: load it; returns 3
    """

    def __init__(self, policy: nn.Module) -> None:
        self.policy = policy
        self.latest: int | None = None  # the newest version handed over, applied or not
        self._pending: tuple[dict[str, torch.Tensor], int] | None = None
        self._lock = threading.Lock()

    def stage(self, source: nn.Module | Mapping[str, torch.Tensor], version: int) -> None:
        state = source.state_dict() if isinstance(source, nn.Module) else source
        if not isinstance(state, Mapping):
            raise TypeError(
                f"update_weights needs a module or a state dict, got {type(source).__name__}"
            )
        own = self.policy.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"update_weights: the state dict does not fit the rollout policy "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        # Copy now, onto the rollout policy's device: the trainer's tensors are its own
        # again as soon as this returns.
        snapshot = {
            k: v.detach().to(own[k].device, own[k].dtype, copy=True) for k, v in state.items()
        }
        with self._lock:
            if self.latest is not None and version < self.latest:
                raise ValueError(f"update_weights: version {version} < {self.latest}, given before")
            self._pending = (snapshot, int(version))
            self.latest = int(version)

    def apply(self) -> int | None:
        """Load the pending snapshot, if any; returns its version (None when nothing waited)."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return None
        snapshot, version = pending
        with torch.no_grad():
            self.policy.load_state_dict(snapshot)
        return version


class PolicyVersion:
    """The version recorded with each decision: set by ``update_weights`` (or by hand), and
    otherwise counted up whenever the policy's weights changed in place since the last call.

    Example:
        >>> v = PolicyVersion(policy)
        >>> opt.step(); v.refresh()      # the weights changed: 1
        1
    """

    def __init__(self, policy: nn.Module) -> None:
        self.policy, self.value = policy, 0
        self._seen = self._fingerprint()

    def _fingerprint(self) -> dict[str, int]:
        # In-place updates (optimizer steps, load_state_dict) bump each tensor's version. A
        # lazy module's parameters (torchrl's TinyVLA has them) appear at its first forward:
        # they are left out until then, so that first call is not counted as new weights.
        return {
            name: p._version
            for name, p in self.policy.named_parameters()
            if not isinstance(p, nn.parameter.UninitializedParameter)
        }

    def set(self, version: int) -> None:
        self.value = int(version)
        self._seen = self._fingerprint()

    def refresh(self) -> int:
        fp = self._fingerprint()
        if any(fp.get(name, v) != v for name, v in self._seen.items()):
            self.value += 1
        self._seen = fp
        return self.value


_THREAD = "rollout-async"


def in_background() -> bool:
    """Whether this thread is the one running a background call."""
    return threading.current_thread().name.startswith(_THREAD)


class Background:
    """One engine call at a time in a background thread, and the weights handed over for
    the calls after it.

    Example:
        >>> bg = Background(policy, max_staleness=1, on_version=engine.set_policy_version)
        >>> fut = bg.submit(lambda: engine.collect_episodes(4, 8), on_drop=print)
        >>> bg.update(trainer_policy, version=1)     # loaded once the call is done
    """

    def __init__(
        self, policy: nn.Module, max_staleness: int | None, on_version: Callable[[int], None]
    ) -> None:
        self.weights = WeightSync(policy)
        self.max_staleness, self.on_version = max_staleness, on_version
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: Future | None = None

    def busy(self) -> bool:
        """A background call is running and this is not its thread."""
        f = self._in_flight
        return f is not None and not f.done() and not in_background()

    def update(self, source: nn.Module | Mapping[str, torch.Tensor], version: int) -> None:
        """Snapshot ``source`` now; load it at once if no call runs, else after it."""
        self.weights.stage(source, version)
        if self._in_flight is None or self._in_flight.done():
            self.apply()

    def apply(self) -> None:
        """Between calls: load the newest snapshot, if one waits, and report its version."""
        version = self.weights.apply()
        if version is not None:
            self.on_version(version)

    def submit(
        self, job: Callable[[], TensorDict], on_drop: Callable[[int], None]
    ) -> RolloutFuture:
        """Run ``job`` in the background; its future re-runs it when the result is stale."""
        self.apply()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=_THREAD)
        self._in_flight = self._executor.submit(job)
        return RolloutFuture(
            self._in_flight,
            latest_version=lambda: self.weights.latest,
            max_staleness=self.max_staleness,
            recollect=job,
            on_drop=on_drop,
        )

    def shutdown(self) -> None:
        """Finish the call running (unless this is its thread: its error closes the engine)."""
        if self._executor is not None:
            self._executor.shutdown(wait=not in_background())
            self._executor = None


class RolloutFuture:
    """The result of ``collect_episodes_async``: a ``concurrent.futures`` future that, when
    taken, drops data more than ``max_staleness`` versions old and collects it again.

    Example:
        >>> fut = engine.collect_episodes_async(num_groups=8, group_size=8)
        >>> ...                                    # train on the previous batch meanwhile
        >>> eps = fut.result()                     # TensorDict [64], as collect_episodes
    """

    def __init__(
        self,
        inner: Future,
        latest_version: Callable[[], int | None],
        max_staleness: int | None,
        recollect: Callable[[], TensorDict],
        on_drop: Callable[[int], None],
    ) -> None:
        self._inner = inner
        self._latest = latest_version
        self._max_staleness = max_staleness
        self._recollect = recollect
        self._on_drop = on_drop

    def done(self) -> bool:
        return self._inner.done()

    def result(self, timeout: float | None = None) -> TensorDict:
        td = self._inner.result(timeout)
        while self._max_staleness is not None and self._stale(td):
            self._on_drop(td.batch_size[0])
            td = self._recollect()
        return td

    def _stale(self, td: TensorDict) -> bool:
        latest = self._latest()
        if latest is None:
            return False
        return latest - produced_by(td) > self._max_staleness


def produced_by(td: TensorDict) -> int:
    """The oldest ``policy_version`` among the decisions of an engine output (padding
    entries carry -1 and are not decisions)."""
    versions = td.get("policy_version")[td.get("mask")]
    return int(versions.min()) if versions.numel() else -1
