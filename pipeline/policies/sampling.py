"""Sampling noise that is a pure function of each row's ``sample_seed``.

A row's noise never depends on the other rows of the batch, on the batch size or on the
device. It comes from a counter-based generator (SplitMix64 over the row's key, see
:func:`pipeline.seeding.bits`) evaluated for the whole batch at once on the CPU, then moved.
A generator object per row would cost ~10 us a row, more than the rest of a small policy.
This is what makes rollouts reproducible under any schedule (sync, pipelined, any stage split).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.seeding import bits

_UNIFORM, _NORMAL = 1, 2  # streams of different kinds drawn from the same seed are unrelated
_TWO_TO_MINUS_53 = 2.0**-53


def _uniforms(seeds: torch.Tensor, kind: int, n: int, open_at_zero: bool = False) -> np.ndarray:
    """``[B, n]`` float64 uniforms in [0, 1) (or (0, 1] with ``open_at_zero``)."""
    keys = seeds.detach().cpu().numpy().astype(np.int64, copy=False).reshape(-1)
    u = (bits(keys, kind, n) >> np.uint64(11)).astype(np.float64)
    return (u + 1.0 if open_at_zero else u) * _TWO_TO_MINUS_53


def _to(x: np.ndarray, shape: tuple[int, ...], device) -> torch.Tensor:
    out = torch.from_numpy(x.astype(np.float32).reshape(len(x), *shape))
    return out.to(device, non_blocking=True) if device is not None else out


def row_uniform(seeds: torch.Tensor, shape: tuple[int, ...], device=None) -> torch.Tensor:
    """``[B, *shape]`` uniforms in [0, 1); row ``i`` depends only on ``seeds[i]``.

    Args:
        seeds: the rows' int64 seeds (``sample_seed``), flattened to ``[B]``.
        shape: each row's shape.
        device: where the float32 result goes; None: it stays on the CPU.

    Example:
        >>> row_uniform(torch.tensor([3, 4]), (8, 7)).shape
        torch.Size([2, 8, 7])
    """
    n = int(np.prod(shape, dtype=np.int64))
    return _to(_uniforms(seeds, _UNIFORM, n), shape, device)


def row_normal(
    seeds: torch.Tensor, shape: tuple[int, ...], device=None, stream: int = 0
) -> torch.Tensor:
    """``[B, *shape]`` standard normals (Box-Muller); row ``i`` depends only on ``seeds[i]``.

    Args:
        seeds: the rows' int64 seeds (``sample_seed``), flattened to ``[B]``.
        shape: each row's shape.
        device: where the float32 result goes; None: it stays on the CPU.
        stream: different values give unrelated draws from the same seeds.

    Example:
        >>> row_normal(torch.tensor([3, 4]), (8, 7)).shape
        torch.Size([2, 8, 7])
    """
    n = int(np.prod(shape, dtype=np.int64))
    pairs = (n + 1) // 2
    # (a high bit: seeds of one episode differ in their low bits, one per decision)
    u = _uniforms(seeds, _NORMAL | (stream << 40), 2 * pairs, open_at_zero=True)
    radius = np.sqrt(-2.0 * np.log(u[:, :pairs]))
    angle = 2.0 * np.pi * u[:, pairs:]
    z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)], axis=1)[:, :n]
    return _to(z, shape, device)


def sample_categorical(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: ``logits [..., K]``, ``uniforms [...]`` -> indices ``[...]``.

    Exact for the categorical ``softmax(logits)``; one uniform per draw keeps noise small.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    cdf = probs.cumsum(-1)
    u = uniforms.unsqueeze(-1) * cdf[..., -1:]
    idx = torch.searchsorted(cdf.contiguous(), u.contiguous()).squeeze(-1)
    return idx.clamp_(max=logits.shape[-1] - 1)
