"""LatencyPolicy: a simulated accelerator.

It returns valid action chunks after ``base_ms + per_item_ms * batch_size`` of wall time during
which it holds no CPU (it sleeps), the way a GPU forward pass looks to the host. It is how
overlap is measured on machines without a GPU, and how a user answers "what would my GPU
utilisation be". Its outputs depend only on the inputs and the seeds.
"""

from __future__ import annotations

import time
from collections import deque

import torch
from tensordict import TensorDictBase
from torch import nn

from pipeline import schema
from pipeline.policies.sampling import row_normal
from pipeline.profiler.spans import mark


class LatencyPolicy(nn.Module):
    """Simulated device latency with a cheap, deterministic, state-dependent output.

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
    ) -> None:
        super().__init__()
        if base_ms < 0 or per_item_ms < 0:
            raise ValueError("base_ms and per_item_ms must be >= 0")
        self.state_dim, self.action_dim, self.chunk_len = state_dim, action_dim, chunk_len
        self.base_ms, self.per_item_ms = float(base_ms), float(per_item_ms)
        self.deterministic, self.noise_scale = deterministic, noise_scale
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(
            torch.randn(state_dim, chunk_len * action_dim, generator=g) / state_dim**0.5
        )
        # The modelled device-busy periods, on the host's perf_counter_ns clock.
        self.device_intervals: deque[tuple[int, int]] = deque(maxlen=100_000)

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
        x = (state @ self.weight.to(state.device)).view(b, self.chunk_len, self.action_dim)
        if not self.deterministic:
            mark("sample")
            seeds = td.get(schema.SAMPLE_SEED, None)
            if seeds is None:
                raise ValueError("a stochastic policy needs 'sample_seed' (int64 [B]) in the td")
            shape = (self.chunk_len, self.action_dim)
            x = x + self.noise_scale * row_normal(seeds.reshape(-1).cpu(), shape, state.device)
        td.set(schema.ACTION_CHUNK, torch.tanh(x))
        end = start + int(self.latency_s(b) * 1e9)
        remaining = (end - time.perf_counter_ns()) / 1e9
        mark("inference")  # the modelled device time
        if remaining > 0:
            time.sleep(remaining)
        self.device_intervals.append((start, max(end, time.perf_counter_ns())))
        return td
