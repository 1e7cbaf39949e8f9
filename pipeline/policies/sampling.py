"""Sampling noise that is a pure function of each row's ``sample_seed``.

A row's noise never depends on the other rows of the batch, on the batch size or on the
device: it is drawn on the CPU from a generator seeded by that row alone, then moved. This is
what makes rollouts reproducible under any schedule (sync, pipelined, any stage split).
"""

from __future__ import annotations

import torch

_SALT = 0x5EED_0F_A11  # decorrelates streams of different kinds drawn from the same seed


def _row_generator(seed: int, kind: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + _SALT * kind) % (2**63))


def row_uniform(seeds: torch.Tensor, shape: tuple[int, ...], device=None) -> torch.Tensor:
    """``[B, *shape]`` uniforms in [0, 1); row ``i`` depends only on ``seeds[i]``."""
    rows = [torch.rand(shape, generator=_row_generator(s, 1)) for s in seeds.tolist()]
    out = torch.stack(rows) if rows else torch.empty((0, *shape))
    return out.to(device, non_blocking=True) if device is not None else out


def row_normal(seeds: torch.Tensor, shape: tuple[int, ...], device=None) -> torch.Tensor:
    """``[B, *shape]`` standard normals; row ``i`` depends only on ``seeds[i]``."""
    rows = [torch.randn(shape, generator=_row_generator(s, 2)) for s in seeds.tolist()]
    out = torch.stack(rows) if rows else torch.empty((0, *shape))
    return out.to(device, non_blocking=True) if device is not None else out


def sample_categorical(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: ``logits [..., K]``, ``uniforms [...]`` -> indices ``[...]``.

    Exact for the categorical ``softmax(logits)``; one uniform per draw keeps noise small.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    cdf = probs.cumsum(-1)
    u = uniforms.unsqueeze(-1) * cdf[..., -1:]
    idx = torch.searchsorted(cdf.contiguous(), u.contiguous()).squeeze(-1)
    return idx.clamp_(max=logits.shape[-1] - 1)
