"""The trajectory store: preallocated ``[rows, T]`` buffers filled one stage batch at a time.

A decision is recorded in two halves: what the policy saw and produced (when it is dispatched)
and what came of it (when the worker's results arrive). Rows are envs for ``rollout()`` and
episodes for ``collect_episodes()``; the caller says where each stage row goes.

Per decision only block copies happen: the observation, the policy's outputs, and the result
record that came with the observation (``seen``: episode id, reset seed, env id, decision
index, ``is_init``), later the record of the outcome. Everything else a trainer gets (sample
seeds, policy version, instructions, the mask) is a function of those records and is derived
once, in :meth:`TrajectoryStore.to_tensordict`. The buffers are numpy arrays wrapped by torch
without copying.
"""

from __future__ import annotations

import mmap
import sys

import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict

from pipeline import schema
from pipeline.runtime.layout import RESULT_DTYPE, Layout, raw_records
from pipeline.seeding import sample_seeds

# The results of a decision, from its result record: field -> (output key, dtype).
_NEXT = {
    "reward": (("next", "reward"), np.float32),
    "terminated": (("next", "terminated"), np.bool_),
    "truncated": (("next", "truncated"), np.bool_),
    "success": (("next", "success"), np.bool_),
    "steps": (("next", "steps_executed"), np.int32),
}

ID_FIELDS = ("sample_seed", "episode_id", "reset_seed", "env_id", "policy_version")

_POPULATE_BYTES = 1 << 20
_LARGE_ROW = 16384  # bytes from which a row is copied by itself, not through a fancy index


def _alloc(shape: tuple, dtype) -> np.ndarray:
    """Zeroed memory, as an array that is its own views' base. Large buffers are mapped with
    MAP_POPULATE: the kernel provides every page up front, instead of one page fault per
    4 KiB on the recording hot path."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < _POPULATE_BYTES or not hasattr(mmap, "MAP_POPULATE"):
        return np.zeros(shape, dtype)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
    return np.ndarray(shape, dtype, buffer=mmap.mmap(-1, nbytes, flags=flags))


class BufferPool:
    """Trajectory buffers reused from call to call, so recording writes into memory that is
    already mapped and cache-warm instead of fresh pages every call.

    A buffer is handed out again only when nothing outside the pool references it: every
    tensor and view of a returned TensorDict holds a reference to its buffer, so a result
    the caller still holds (or any part of it) is never overwritten; a new buffer is
    allocated instead. The pool keeps at most ``keep`` buffers per shape, dtype and index
    within a call (see :meth:`take`), so a caller that keeps every result (a replay buffer)
    costs no more than without a pool.

    Example:
        >>> pool = BufferPool()
        >>> a = pool.take((16, 8, 64, 64, 3), np.uint8)
        >>> del a                                  # the caller dropped it...
        >>> b = pool.take((16, 8, 64, 64, 3), np.uint8)   # ...so the same memory comes back
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._buffers: dict[tuple, list[np.ndarray]] = {}
        self.reused = self.allocated = 0  # counters, for tests and benches

    def take(self, shape: tuple, dtype, index: int = 0) -> np.ndarray:
        """A ``shape``/``dtype`` buffer nobody else references (contents undefined).

        ``index``: which of one call's buffers of this shape and dtype it is (a call that
        records three cameras of one size takes three, 0 to 2). The pool keeps ``keep`` of
        each, so ``keep`` calls' worth of every buffer a call needs, however many share a
        shape."""
        dtype = np.dtype(dtype)
        pooled = self._buffers.setdefault((tuple(shape), dtype.str, index), [])
        for buf in pooled:
            # References: the pool's list, this loop's variable, getrefcount's argument.
            if sys.getrefcount(buf) <= 3:
                self.reused += 1
                return buf
        buf = _alloc(shape, dtype)
        self.allocated += 1
        if len(pooled) < self.keep:
            pooled.append(buf)
        return buf


class Dest:
    """Where the rows of one stage batch go: stage row ``src[j]`` -> ``[rows[j], ts[j]]``.

    ``block`` is set when every stage row goes to consecutive rows at one time step (the
    ``rollout()`` case): then every copy is a single slice assignment.
    """

    __slots__ = ("rows", "ts", "src", "block", "n")

    def __init__(self, rows: np.ndarray, ts: np.ndarray, src: np.ndarray, stage_len: int) -> None:
        self.rows, self.ts, self.src, self.n = rows, ts, src, len(src)
        # Every row must follow the one before: rows [17, 16, 19, 20] span 17..20 too.
        contiguous = self.n == stage_len and self.n > 0 and bool((np.diff(rows) == 1).all())
        self.block = (int(rows[0]), int(ts[0])) if contiguous and (ts == ts[0]).all() else None

    @classmethod
    def scatter(cls, rows: np.ndarray, ts: np.ndarray, src: np.ndarray) -> Dest:
        """Index arrays only, never a block: for a batch gathered from anywhere
        (:meth:`put_from`)."""
        dest = cls.__new__(cls)
        dest.rows, dest.ts, dest.src, dest.n, dest.block = rows, ts, src, len(src), None
        return dest

    @classmethod
    def block_at(cls, row0: int, t: int, n: int) -> Dest:
        """Stage rows ``0..n`` -> rows ``row0..row0+n`` at time ``t`` (no index arrays)."""
        dest = cls.__new__(cls)
        dest.rows = dest.ts = dest.src = None
        dest.block, dest.n = (row0, t), n
        return dest

    def put(self, dst: np.ndarray, stage_values: np.ndarray) -> None:
        """``dst[rows[j], ts[j]] = stage_values[src[j]]``, by the cheapest copy."""
        if self.block is not None:
            r0, t = self.block
            dst[r0 : r0 + self.n, t] = stage_values
        elif stage_values.nbytes >= _LARGE_ROW * len(stage_values):  # a memcpy each
            for r, t, j in zip(self.rows, self.ts, self.src, strict=True):
                np.copyto(dst[r, t], stage_values[j])
        else:
            dst[self.rows, self.ts] = stage_values[self.src]

    def put_from(self, dst: np.ndarray, src: np.ndarray, slots: np.ndarray, envs: np.ndarray):
        """The same for a batch gathered from anywhere: batch row ``j`` is ``src[slots[j],
        envs[j]]`` (dynamic batching's envs, each in its own slot), copied straight from
        there into ``dst``."""
        slots, envs = slots[self.src], envs[self.src]
        if src[0, 0].nbytes >= _LARGE_ROW:  # a memcpy each, no gathered copy in between
            for r, t, slot, env in zip(self.rows, self.ts, slots, envs, strict=True):
                np.copyto(dst[r, t], src[slot, env])
        else:
            dst[self.rows, self.ts] = src[slots, envs]


class TrajectoryStore:
    """``[rows, max_t]`` buffers for one ``rollout()`` or ``collect_episodes()`` call.

    Args:
        layout: the shared-memory layout (its env spec and chunk length).
        arrays: the shared arrays (``SharedBuffers.arrays``) decisions are recorded from.
        rows: buffer rows: envs for ``rollout()``, episodes for ``collect_episodes()``.
        max_t: decisions per row.
        pool: where the buffers come from; None: a pool that keeps none (fresh memory).
        obs_keys: the observation keys to record (keys of ``layout.spec.obs``); None: all.

    Example:
        >>> store = TrajectoryStore(layout, shm.arrays, rows=16, max_t=8)
        >>> store.record_decision(Dest.block_at(0, t, 16), slot, 0, 16, {key: actions})
        >>> store.record_results(dest, next_slot, 0, 16)
        >>> td = store.to_tensordict(seed=0, policy_version=3, texts=texts)
    """

    def __init__(
        self,
        layout: Layout,
        arrays: dict[str, np.ndarray],
        rows: int,
        max_t: int,
        pool: BufferPool | None = None,
        obs_keys: tuple[str, ...] | None = None,
    ) -> None:
        self.layout, self.layout_arrays, self.rows, self.max_t = layout, arrays, rows, max_t
        self.pool = pool if pool is not None else BufferPool(keep=0)
        self._taken: dict[tuple, int] = {}  # buffers of each shape and dtype taken so far
        spec = layout.spec
        shape = (rows, max_t)
        # Observations, outputs and results need no clearing: every entry is either written
        # by this call or zeroed as invalid in to_tensordict.
        keys = spec.obs if obs_keys is None else obs_keys  # what the caller asked to record
        self.obs = {k: self._take(shape + spec.obs[k].shape, spec.obs[k].dtype) for k in keys}
        # The record that came with each observation. Entries never written stay "parked"
        # (no decision), and so do rows the caller recorded while their env was parked.
        self.seen = self._take(shape, RESULT_DTYPE)
        self.seen.fill(0)
        self.seen["parked"] = 1
        self.results = self._take(shape, RESULT_DTYPE)  # each decision's outcome
        self.aborted = np.zeros(shape, bool)  # decisions of episodes a worker failure ended
        self._seen_raw, self._results_raw = raw_records(self.seen), raw_records(self.results)
        self.outputs: dict[tuple | str, np.ndarray] = {}

    def _take(self, shape: tuple, dtype) -> np.ndarray:
        """A buffer from the pool, numbered among this store's buffers of its shape and
        dtype: cameras of one size each get their own."""
        key = (tuple(shape), np.dtype(dtype).str)
        index = self._taken.get(key, 0)
        self._taken[key] = index + 1
        return self.pool.take(shape, dtype, index)

    def _output_buffer(self, key, value: np.ndarray) -> np.ndarray:
        buf = self.outputs.get(key)
        if buf is None:
            shape = (self.rows, self.max_t, *value.shape[1:])
            buf = self.outputs[key] = self._take(shape, value.dtype)
        return buf

    def record_decision(self, dest: Dest, slot: int, lo: int, hi: int, outputs: dict) -> None:
        """What the policy saw (stage rows ``lo:hi`` of ``slot``) and what it produced."""
        if dest.n == 0:
            return
        a = self.layout_arrays
        for k, buf in self.obs.items():
            dest.put(buf, a[f"obs/{k}"][slot, lo:hi])
        for key, value in outputs.items():
            dest.put(self._output_buffer(key, value), value)
        dest.put(self._seen_raw, a["results_raw"][slot, lo:hi])

    def record_gathered(
        self, dest: Dest, slots: np.ndarray, envs: np.ndarray, outputs: dict
    ) -> None:
        """:meth:`record_decision` for a batch of envs each in its own slot (batch row ``j``
        is env ``envs[j]`` in ``slots[j]``), to ``dest`` (:meth:`Dest.scatter`)."""
        if dest.n == 0:
            return
        a = self.layout_arrays
        for k, buf in self.obs.items():
            dest.put_from(buf, a[f"obs/{k}"], slots, envs)
        for key, value in outputs.items():
            dest.put(self._output_buffer(key, value), value)
        dest.put_from(self._seen_raw, a["results_raw"], slots, envs)

    def record_gathered_results(self, dest: Dest, slots: np.ndarray, envs: np.ndarray) -> None:
        """:meth:`record_results` for a batch gathered from anywhere (see
        :meth:`record_gathered`)."""
        if dest.n:
            dest.put_from(self._results_raw, self.layout_arrays["results_raw"], slots, envs)

    def record_results(self, dest: Dest, slot: int, lo: int, hi: int) -> None:
        """What came of it: the ``("next", ...)`` half, from the stage's next ``slot``."""
        if dest.n == 0:
            return
        dest.put(self._results_raw, self.layout_arrays["results_raw"][slot, lo:hi])

    @property
    def valid(self) -> np.ndarray:
        """``[rows, max_t]``: where a decision was recorded (and not aborted)."""
        return (self.seen["parked"] == 0) & ~self.aborted

    def abort(self, rows: np.ndarray, episodes: np.ndarray) -> None:
        """Mark every decision recorded so far for episode ``episodes[j]`` in row
        ``rows[j]`` as aborted: masked out, never counted as success or failure."""
        for row, episode in zip(rows.tolist(), episodes.tolist(), strict=True):
            seen = self.seen[row]
            self.aborted[row] |= (seen["episode_id"] == episode) & (seen["parked"] == 0)

    def forget(self, rows: np.ndarray) -> None:
        """Drop everything recorded in ``rows``, to be recorded again from ``t = 0``."""
        self.seen["parked"][rows] = 1
        self.aborted[rows] = False

    def next_field(self, name: str, t: int) -> np.ndarray:
        """One result field over ``[rows, :t]`` as a contiguous array of its output dtype."""
        return np.ascontiguousarray(self.results[name][:, :t]).astype(_NEXT[name][1])

    def _clear_invalid(self, valid: np.ndarray) -> None:
        """Entries without a decision read as zeros, whatever a parked env's slot held."""
        invalid = ~valid
        if not invalid.any():
            return
        for buf in (*self.obs.values(), *self.outputs.values(), self.results):
            buf[invalid] = 0

    def to_tensordict(
        self,
        *,
        seed: int,
        policy_version: int,
        texts: dict[int, NonTensorData],
        t: int | None = None,
    ) -> TensorDict:
        """The canonical VLA layout over ``[rows, t]`` (images as ``[..., C, H, W]`` views).

        Args:
            seed: the engine seed the sample seeds were derived from.
            policy_version: every valid entry's ``policy_version`` (-1 elsewhere).
            texts: maps every recorded episode id to its instruction (a ``KeyError`` for
                one missing).
            t: the time steps to return, ``[:, :t]``; None: ``max_t``.
        """
        t = self.max_t if t is None else t
        rows = self.rows
        seen = self.seen[:, :t]
        valid_all = self.valid
        self._clear_invalid(valid_all)
        valid = valid_all[:, :t]
        td = TensorDict({}, batch_size=[rows, t])
        for k, buf in self.obs.items():
            value = torch.from_numpy(buf[:, :t])
            if k.startswith("image/"):
                td.set(schema.image_key(k.split("/", 1)[1]), value.permute(0, 1, 4, 2, 3))
            else:
                td.set((schema.OBSERVATION, k), value)
        for key, buf in self.outputs.items():
            td.set(key, torch.from_numpy(buf[:, :t]))
        steps = self.next_field("steps", t)  # the pad mask comes before the "next" fields
        horizon = self.layout.chunk_len
        td.set(schema.ACTION_IS_PAD, torch.from_numpy(np.arange(horizon) >= steps[..., None]))
        episode = seen["episode_id"]
        ids = {
            "sample_seed": sample_seeds(seed, episode, seen["t"]),
            "episode_id": episode,
            "reset_seed": seen["reset_seed"],
            "env_id": seen["env_id"].astype(np.int64),
            "policy_version": np.full((rows, t), policy_version, np.int64),
        }
        for name in ID_FIELDS:
            td.set(name, torch.from_numpy(np.where(valid, ids[name], -1)))
        td.set("is_init", torch.from_numpy(valid & (seen["is_init"] == 1)))
        td.set("mask", torch.from_numpy(valid))
        td.set("aborted", torch.from_numpy(np.ascontiguousarray(self.aborted[:, :t])))
        fields = {name: self.next_field(name, t) for name in _NEXT}
        for name, (key, _) in _NEXT.items():
            value = torch.from_numpy(fields[name])
            td.set(key, value.unsqueeze(-1) if name != "steps" else value)
        done = fields["terminated"] | fields["truncated"]
        td.set(("next", "done"), torch.from_numpy(done).unsqueeze(-1))
        td.set(schema.INSTRUCTION, _instruction_stack(episode, valid, texts, rows, t))
        return td


_NO_TEXT = NonTensorData("")


def _instruction_stack(episode, valid, texts, rows: int, t: int) -> NonTensorStack:
    """``[rows, t]`` instructions. An episode's instruction never changes, so all of its
    entries share one NonTensorData (creating one costs ~4 us; a rollout has many entries)."""
    if not (rows and t):
        return NonTensorStack(batch_size=[rows, t])
    ep, ok = episode.tolist(), valid.tolist()
    return schema.text_stack(
        [
            schema.text_stack([texts[e] if v else _NO_TEXT for e, v in zip(er, vr, strict=True)])
            for er, vr in zip(ep, ok, strict=True)
        ]
    )
