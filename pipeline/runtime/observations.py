"""The check every observation passes before it is written into shared memory.

An env's observation must match its spec exactly: the keys, each field's shape and dtype, and
finite floats. A mismatch raises :class:`BadObservation` naming the env, the field and what
the spec expects, so nothing malformed or non-finite ever reaches a slot (and the policy).
"""

from __future__ import annotations

import math

import numpy as np

ObsField = tuple[str, tuple[int, ...], np.dtype, bool]  # key, shape, dtype, is a float


class BadObservation(ValueError):
    """An env's observation does not match its spec; raised before anything is written."""


def check_observation(env_id: int, obs: object, fields: list[ObsField]) -> None:
    """Raise :class:`BadObservation` unless ``obs`` matches ``fields``.

    Example:
        >>> fields = [("state", (3,), np.dtype(np.float32), True)]
        >>> check_observation(0, {"state": np.zeros(3, np.float32)}, fields)   # fine
    """
    # The common case in one pass of cheap comparisons: it runs for every env at every step.
    # A float32 or float16 field is finite exactly when its float64 sum is (one call, where
    # isfinite and all are two); a float64 sum can overflow from finite values (and warn),
    # so float64 fields take the exact test.
    if isinstance(obs, dict) and len(obs) == len(fields):
        for key, shape, dtype, is_float in fields:
            value = obs.get(key)
            if not isinstance(value, np.ndarray) or value.shape != shape or value.dtype != dtype:
                break
            if is_float and not _finite(value):
                break
        else:
            return
    _explain(env_id, obs, fields)


def _finite(value: np.ndarray) -> bool:
    if value.dtype.itemsize < 8:
        return math.isfinite(np.add.reduce(value, None, np.float64))
    return bool(np.isfinite(value).all())


def _explain(env_id: int, obs: object, fields: list[ObsField]) -> None:
    """The exact check, field by field: raises naming the first mismatch, if there is one."""
    if not isinstance(obs, dict):
        raise BadObservation(f"env {env_id}: observation is a {type(obs).__name__}, not a dict")
    if len(obs) != len(fields) or any(k not in obs for k, *_ in fields):
        want = sorted(k for k, *_ in fields)
        missing = sorted(set(want) - set(obs))
        extra = sorted(set(obs) - set(want))
        raise BadObservation(
            f"env {env_id}: observation keys {sorted(obs)} do not match the spec {want} "
            f"(missing {missing}, unexpected {extra})"
        )
    for key, shape, dtype, is_float in fields:
        value = obs[key]
        if not isinstance(value, np.ndarray) or value.shape != shape or value.dtype != dtype:
            got = (
                f"{value.dtype}{list(value.shape)}"
                if isinstance(value, np.ndarray)
                else type(value).__name__
            )
            raise BadObservation(
                f"env {env_id}: observation field {key!r} is {got}, expected {dtype}{list(shape)}"
            )
        if is_float and not np.isfinite(value).all():
            raise BadObservation(
                f"env {env_id}: observation field {key!r} contains NaN or inf "
                f"(at flat index {int(np.flatnonzero(~np.isfinite(value))[0])})"
            )
