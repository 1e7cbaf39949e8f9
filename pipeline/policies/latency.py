"""LatencyPolicy: a simulated accelerator.

It returns valid action chunks after ``base_ms + per_item_ms * batch_size`` of wall time during
which it holds no CPU (it sleeps), the way a GPU forward pass looks to the host. It is how
overlap is measured on machines without a GPU, and how a user answers "what would my GPU
utilisation be". Its outputs depend only on the inputs and the seeds.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import torch
from tensordict import TensorDictBase
from torch import nn

from pipeline import schema
from pipeline.policies.sampling import row_normal
from pipeline.runtime.spans import mark


class SimulatedDevice:
    """One simulated accelerator: inference and training steps on it run one at a time.

    A deep copy of a policy stays on the same device (as ``copy.deepcopy`` of a CUDA module
    does); give a copy its own ``SimulatedDevice()`` to model a second GPU.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._free_at = 0

    def __deepcopy__(self, memo) -> SimulatedDevice:
        return self

    def hold(self, seconds: float, since_ns: int) -> tuple[int, int]:
        """Occupy the device for ``seconds``, holding no CPU; returns the busy interval.

        The period starts at ``since_ns`` (the call's start: its host work overlaps the
        modelled device time) when the device was free by then, else when it frees up.
        """
        with self.lock:
            start = since_ns if self._free_at <= since_ns else time.perf_counter_ns()
            end = start + int(seconds * 1e9)
            remaining = (end - time.perf_counter_ns()) / 1e9
            if remaining > 0:
                time.sleep(remaining)
            end = max(end, time.perf_counter_ns())
            self._free_at = end
            return start, end


class LatencyPolicy(nn.Module):
    """Simulated device latency with a cheap, deterministic, state-dependent output.

    Its inference and its simulated ``train_step`` share one :class:`SimulatedDevice`, so
    overlapping them costs what it would on one GPU.

    Args:
        state_dim: width of ``("observation","state")``; ``forward`` raises ``ValueError``
            on another width.
        action_dim: the action size of each step of a chunk.
        chunk_len: the actions per chunk (``("vla_action","chunk")`` is ``[B, H, A]``).
        base_ms: modelled device time of a forward call, fixed part.
        per_item_ms: modelled device time per row of the batch, added to ``base_ms``.
        deterministic: no noise; else ``noise_scale * row_normal(sample_seed)`` is added
            before the ``tanh``, and a batch without ``sample_seed`` raises ``ValueError``.
        noise_scale: the standard deviation of that noise.
        seed: seeds the random ``[state_dim, chunk_len * action_dim]`` weight.
        train_base_ms: modelled device time of a ``train_step``, fixed part.
        train_per_item_ms: modelled ``train_step`` time per item of its ``batch_size``.

    Raises:
        ValueError: any of the four latencies is negative.

    Example:
        >>> policy = LatencyPolicy(state_dim=16, chunk_len=8, base_ms=5, per_item_ms=2)
        >>> td = policy(td)   # sleeps ~5 + 2 * B ms, writes ("vla_action", "chunk")
        >>> policy.device_intervals[-1]   # (start_ns, end_ns) of the modelled busy period
    """

    def __init__(
        self,
        state_dim: int,
        action_dim: int = 7,
        chunk_len: int = 8,
        base_ms: float = 0.0,
        per_item_ms: float = 0.0,
        deterministic: bool = False,
        noise_scale: float = 0.3,
        seed: int = 0,
        train_base_ms: float = 0.0,
        train_per_item_ms: float = 0.0,
    ) -> None:
        super().__init__()
        if min(base_ms, per_item_ms, train_base_ms, train_per_item_ms) < 0:
            raise ValueError("base_ms, per_item_ms and the train_* latencies must be >= 0")
        self.train_base_ms, self.train_per_item_ms = float(train_base_ms), float(train_per_item_ms)
        self.device_sim = SimulatedDevice()
        self.state_dim, self.action_dim, self.chunk_len = state_dim, action_dim, chunk_len
        self.base_ms, self.per_item_ms = float(base_ms), float(per_item_ms)
        self.deterministic, self.noise_scale = deterministic, noise_scale
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(
            torch.randn(state_dim, chunk_len * action_dim, generator=g) / state_dim**0.5
        )
        # The modelled device-busy periods, on the host's perf_counter_ns clock.
        self.device_intervals: deque[tuple[int, int]] = deque(maxlen=100_000)
        self.train_intervals: deque[tuple[int, int]] = deque(maxlen=100_000)  # train_step's

    def latency_s(self, batch_size: int) -> float:
        return (self.base_ms + self.per_item_ms * batch_size) / 1000.0

    @torch.no_grad()
    def forward(self, td: TensorDictBase) -> TensorDictBase:
        start = time.perf_counter_ns()
        b = td.batch_size[0]
        state = td[schema.STATE].float()
        if state.shape[-1] != self.state_dim:
            raise ValueError(
                f"state has {state.shape[-1]} dims, LatencyPolicy expects {self.state_dim}"
            )
        # One product per row (a batched matmul): a row's chunk is bitwise the same in any
        # batch, so dynamic batching reproduces synchronous rollouts with this policy too.
        w = self.weight.to(state.device).unsqueeze(0).expand(b, -1, -1)
        x = torch.bmm(state.unsqueeze(1), w).view(b, self.chunk_len, self.action_dim)
        if not self.deterministic:
            mark("sample")
            seeds = td.get(schema.SAMPLE_SEED, None)
            if seeds is None:
                raise ValueError("a stochastic policy needs 'sample_seed' (int64 [B]) in the td")
            shape = (self.chunk_len, self.action_dim)
            x = x + self.noise_scale * row_normal(seeds.reshape(-1).cpu(), shape, state.device)
        td.set(schema.ACTION_CHUNK, torch.tanh(x))
        mark("inference")  # the modelled device time
        self.device_intervals.append(self.device_sim.hold(self.latency_s(b), start))
        return td

    def train_step(self, batch_size: int) -> None:
        """A simulated optimizer step: ``train_base_ms + train_per_item_ms * batch_size`` on
        the device (no CPU held), then an in-place weight update, as an optimizer makes.

        Example:
            >>> policy = LatencyPolicy(state_dim=16, train_base_ms=20, train_per_item_ms=0.1)
            >>> policy.train_step(batch_size=512)   # ~71 ms on the simulated device
        """
        seconds = (self.train_base_ms + self.train_per_item_ms * batch_size) / 1000.0
        self.train_intervals.append(self.device_sim.hold(seconds, time.perf_counter_ns()))
        with torch.no_grad():
            self.weight.mul_(0.999)
