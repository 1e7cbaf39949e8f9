"""Seeds derived from the engine seed by hashing, never from timing or arrival order.

Every reset seed and every sample seed is a pure function of (engine seed, what it is for,
its ids). That is what makes trajectories bitwise identical under any schedule.
"""

from __future__ import annotations

import functools

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK63 = np.uint64((1 << 63) - 1)

# Domains keep seeds drawn for different purposes apart.
RESET, SAMPLE, GROUP = 1, 2, 3


def _splitmix(z: np.ndarray) -> np.ndarray:
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def derive(seed: int, domain: int, *ids) -> np.ndarray:
    """Non-negative int64 seeds; ``ids`` may be scalars or equal-length arrays.

    Example:
        >>> derive(0, SAMPLE, np.array([3, 4]), np.array([0, 0]))   # one seed per row
    """
    ids = [np.asarray(x, np.int64) for x in ids]
    n = max((x.size for x in ids), default=1)
    if all(x.ndim == 0 for x in ids):  # one seed (each new episode's): plain ints
        return np.int64(_derive_int(_start_int(seed, domain), [int(x) for x in ids]))
    if n <= _FEW and all(x.ndim == 0 or x.shape == (n,) for x in ids):
        # A batch's few new episodes: plain ints per row cost less than numpy's calls.
        rows = zip(*(x.tolist() if x.ndim else [int(x)] * n for x in ids), strict=True)
        h = _start_int(seed, domain)
        return np.array([_derive_int(h, row) for row in rows], np.int64)
    # Arrays of at least one dimension (no numpy scalars), so the wrapping multiplications
    # raise no warnings and need no errstate, which costs more than the hashing.
    h = np.array([_start_int(seed, domain)], np.uint64)
    for x in ids:
        h = _splitmix(h ^ x.reshape(x.shape or (1,)).astype(np.uint64))
    return (h & _MASK63).astype(np.int64)


_U64, _M63 = (1 << 64) - 1, (1 << 63) - 1
_FEW = 16  # up to this many seeds, hashed in Python ints


def _derive_int(h: int, ids) -> int:
    for x in ids:
        h = _splitmix_int(h ^ (x & _U64))
    return h & _M63


def _splitmix_int(z: int) -> int:
    """:func:`_splitmix` of one word, in Python ints: the same bits, without numpy's cost."""
    z = (z + 0x9E3779B97F4A7C15) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


@functools.lru_cache(maxsize=64)
def _start_int(seed: int, domain: int) -> int:
    """The hash of (seed, domain) every derived seed starts from."""
    return _splitmix_int((int(np.uint64(seed)) ^ (domain << 56)) & _U64)


def sample_seeds(seed: int, episode: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The ``sample_seed`` of decision ``t`` of each ``episode``: a hashed per-episode base
    (halved, leaving room to add ``t``) plus ``t``. The policy's generator hashes it again.

    Args:
        seed: the engine seed.
        episode: episode ids (an array, or a scalar).
        t: each decision's index in its episode, broadcast against ``episode``.

    Example:
        >>> sample_seeds(0, np.array([5, 5]), np.array([0, 1]))   # consecutive for one episode
    """
    return (derive(seed, SAMPLE, episode) >> 1) + np.asarray(t, np.int64)


def bits(keys: np.ndarray, kind: int, n: int) -> np.ndarray:
    """``[len(keys), n]`` uint64 random words: row ``i`` is the SplitMix64 stream of
    ``(keys[i], kind)``, a pure function of them, computed for all rows at once.

    Args:
        keys: the rows' int64 keys (e.g. ``sample_seed``), flattened: one row per key.
        kind: the stream: the same keys with another ``kind`` give unrelated words.
        n: words per row.

    Example:
        >>> bits(np.array([7, 8]), kind=1, n=4).shape   # rows are unrelated streams
        (2, 4)
    """
    # Arrays only (no numpy scalars), so the wrapping multiplications raise no warnings and
    # need no errstate, which would cost more than the arithmetic here.
    keys = np.asarray(keys, np.int64).reshape(-1).astype(np.uint64)
    start = _splitmix(keys ^ np.array(kind, np.uint64))
    z = start[:, None] + _counters(n)[None, :]
    return _splitmix(z)


_COUNTERS: dict[int, np.ndarray] = {}


def _counters(n: int) -> np.ndarray:
    c = _COUNTERS.get(n)
    if c is None:
        with np.errstate(over="ignore"):
            c = _COUNTERS[n] = np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN
    return c
