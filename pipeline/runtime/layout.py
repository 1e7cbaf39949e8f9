"""The shared-memory layout: every array the workers and the inference loop share.

It is derived from the :class:`envs.EnvSpec` and the chunk shape, and nothing else, so the
parent and every worker compute the same offsets independently. One anonymous shared
segment (``memfd``) holds it all.

Two kinds of arrays:

* **slot arrays** ``[slots, num_envs, ...]``: what a worker writes after executing a chunk —
  the next observation plus the results of the chunk that led to it (one record per env).
  There are ``SLOTS = 2``: while the inference side reads slot ``s`` of a stage (to batch
  and to record it), the workers write the next results of that stage into slot ``s ^ 1``.
  A stage's rows are contiguous, so a stage batch is one contiguous block per field
  (zero-copy views, one DMA per field on CUDA).
* **control arrays** ``[num_envs, ...]``: what the inference side writes for a worker — the
  action chunk, how many actions to execute (and how many more to keep executing after
  reporting, with lookahead), and the seed/id of the episode to start when the current one
  ends (``-1`` parks the env).
"""

from __future__ import annotations

import mmap
import os
import secrets
from collections import namedtuple
from dataclasses import dataclass

import numpy as np

from envs.spec import EnvSpec
from pipeline.runtime.spans import RING_CAPACITY, SPAN_DTYPE

SHM_PREFIX = "vlare_"
INSTRUCTION_BYTES = 256
SLOTS = 2  # double buffering: a stage's current observations, and the ones being written
_ALIGN = 64

# Per-env results written with every observation: one aligned record, so a worker finishes
# an env with a single store and the loop records a stage's results with a single copy.
RESULT_DTYPE = np.dtype(
    [
        ("reward", np.float32),  # summed over the executed part of the chunk
        ("steps", np.int32),  # control steps executed
        ("env_id", np.int32),
        ("t", np.int32),  # decisions made earlier in this observation's episode
        # Lookahead: how many actions of the previous chunk the env executes after this
        # observation, while the next chunk is inferred (the next chunk's frozen prefix).
        ("prefix_len", np.int32),
        ("terminated", np.uint8),
        ("truncated", np.uint8),
        ("success", np.uint8),
        ("is_init", np.uint8),  # this observation starts an episode
        ("parked", np.uint8),  # the env has no episode to run: make no decision for it
        ("episode_id", np.int64),
        ("reset_seed", np.int64),
        ("env_ns", np.int64),  # worker time inside the env (step_chunk and any reset)
        ("write_ns", np.int64),  # worker time writing the observation into shared memory
        ("seq", np.int64),  # the command that produced this slot
    ],
    align=True,
)


# The worker builds each record by field name (every field defaults to 0) and stores it in
# one go; its field order is RESULT_DTYPE's, so the two can never disagree.
ResultRecord = namedtuple(
    "ResultRecord", RESULT_DTYPE.names, defaults=(0,) * len(RESULT_DTYPE.names)
)


def raw_records(records: np.ndarray) -> np.ndarray:
    """The same memory as opaque fixed-size items: copying them is a memcpy, where numpy
    copies a structured array field by field (~10x slower for a stage's records)."""
    return records.view(f"V{RESULT_DTYPE.itemsize}")


SLOT_FIELDS = {
    "results": ((), RESULT_DTYPE),
    "instruction": ((INSTRUCTION_BYTES,), np.dtype(np.uint8)),
    "instruction_len": ((), np.dtype(np.int32)),
}
CONTROL_FIELDS = {
    "n_exec": ((), np.int32),
    "lookahead": ((), np.int32),  # actions to keep executing after reporting (0: none)
    "reset_now": ((), np.uint8),  # RESET restarts only these envs; the others carry over
    "next_seed": ((), np.int64),
    "next_episode": ((), np.int64),
}


@dataclass(frozen=True)
class ArraySpec:
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class Layout:
    """Offsets of every shared array, computed from the spec and the chunk shape.

    Args:
        spec: the envs' spec: the observation fields and the action size.
        num_envs: the envs in all (the rows of every slot and control array).
        chunk_len: the actions per chunk (``actions`` is ``[num_envs, chunk_len, A]``).
        num_workers: the worker processes, one progress counter and span ring each.

    Raises:
        ValueError: ``num_envs``, ``chunk_len`` or ``num_workers`` is below 1.

    Example:
        >>> layout = Layout(env.spec, num_envs=16, chunk_len=8)
        >>> shm = SharedBuffers.create(layout)
        >>> shm.arrays["obs/state"].shape      # [SLOTS, num_envs, state_dim]
        (2, 16, 27)
    """

    def __init__(self, spec: EnvSpec, num_envs: int, chunk_len: int, num_workers: int = 1) -> None:
        if num_envs < 1 or chunk_len < 1 or num_workers < 1:
            raise ValueError("num_envs, chunk_len and num_workers must be >= 1")
        self.spec, self.num_envs, self.chunk_len = spec, num_envs, chunk_len
        slots = SLOTS
        self.num_workers = num_workers
        self.obs_keys = tuple(spec.obs)
        fields: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for key, fs in spec.obs.items():
            fields[f"obs/{key}"] = ((slots, num_envs, *fs.shape), fs.dtype)
        for key, (shape, dtype) in SLOT_FIELDS.items():
            fields[key] = ((slots, num_envs, *shape), dtype)
        chunk = (chunk_len, spec.action_dim)
        fields["actions"] = ((num_envs, *chunk), np.dtype(np.float32))
        # With lookahead, the previous chunk's actions from this observation on (zeros where
        # it has none), the first prefix_len of which the env executes whatever comes next.
        fields["prefix"] = ((slots, num_envs, *chunk), np.dtype(np.float32))
        for key, (shape, dtype) in CONTROL_FIELDS.items():
            fields[key] = ((num_envs, *shape), np.dtype(dtype))
        # Per worker: a progress counter (control steps, resets and chunks done) that the
        # watchdog reads to tell a slow worker from a stuck one.
        fields["progress"] = ((num_workers,), np.dtype(np.int64))
        # Profiling: one span ring per worker, and the switch the inference side flips.
        fields["spans"] = ((num_workers, RING_CAPACITY), SPAN_DTYPE)
        fields["span_head"] = ((num_workers, 1), np.dtype(np.int64))
        fields["profile_on"] = ((1,), np.dtype(np.uint8))
        # What a worker writes per env with each reply (a slot's row), and what the loop
        # writes per env with each command: the two halves a remote node mirrors.
        self.slot_keys = (*(f"obs/{k}" for k in spec.obs), *SLOT_FIELDS, "prefix")
        self.control_keys = ("actions", *CONTROL_FIELDS)
        self.arrays: dict[str, ArraySpec] = {}
        offset = 0
        for key, (shape, dtype) in fields.items():
            offset = (offset + _ALIGN - 1) // _ALIGN * _ALIGN
            self.arrays[key] = ArraySpec(offset, shape, np.dtype(dtype))
            offset += self.arrays[key].nbytes
        self.nbytes = max(offset, 1)

    def views(self, buf) -> dict[str, np.ndarray]:
        """numpy views of every array over a buffer of ``nbytes``; each result field is also
        exposed on its own (``views["reward"]`` is ``views["results"]["reward"]``), and the
        records as raw items (``views["results_raw"]``, see :func:`raw_records`)."""
        out = {
            k: np.ndarray(a.shape, a.dtype, buffer=buf, offset=a.offset)
            for k, a in self.arrays.items()
        }
        for name in RESULT_DTYPE.names:
            out[name] = out["results"][name]
        out["results_raw"] = raw_records(out["results"])
        return out


class SharedBuffers:
    """The memory behind a :class:`Layout`: one anonymous ``memfd`` segment, mapped by the
    inference process and every worker.

    The segment has no name in /dev/shm, ever: it lives exactly as long as some process maps
    it or holds its descriptor, so no crash, kill or missing ``close()`` can leak it. Workers
    get the descriptor over their pipe (``SCM_RIGHTS``), which is also how a worker that
    replaces a dead one attaches to the running engine's memory.

    Build one with :meth:`create` (a new segment) or :meth:`attach` (a received descriptor).

    Args:
        layout: the layout of the segment.
        fd: the segment's descriptor, which the object owns (``close()`` closes it).
        mm: the segment mapped; ``arrays`` are ``layout``'s views over it.
    """

    def __init__(self, layout: Layout, fd: int, mm: mmap.mmap) -> None:
        self.layout, self.fd, self._mm = layout, fd, mm
        self.arrays = layout.views(mm)

    @classmethod
    def create(cls, layout: Layout) -> SharedBuffers:
        if not hasattr(os, "memfd_create"):
            raise OSError("the engine's shared memory needs memfd_create (Linux)")
        fd = os.memfd_create(SHM_PREFIX + secrets.token_hex(6), os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, layout.nbytes)  # zero-filled pages, provided on first touch
            mm = mmap.mmap(fd, layout.nbytes)
        except BaseException:
            os.close(fd)
            raise
        return cls(layout, fd, mm)

    @classmethod
    def attach(cls, layout: Layout, fd: int) -> SharedBuffers:
        """Map the segment behind a descriptor received from the creator (and own it)."""
        size = os.fstat(fd).st_size
        if size != layout.nbytes:
            os.close(fd)
            raise ValueError(f"shared segment has {size} bytes, the layout needs {layout.nbytes}")
        return cls(layout, fd, mmap.mmap(fd, layout.nbytes))

    @property
    def address(self) -> int:
        """Base address of the mapping (for cudaHostRegister)."""
        import ctypes

        return ctypes.addressof(ctypes.c_char.from_buffer(self._mm))

    def close(self) -> None:
        """Unmap and close the descriptor. Idempotent."""
        self.arrays = {}
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self._mm.close()
        except BufferError:
            # A torch tensor or numpy view still references the mapping; it is released
            # when they are collected. The descriptor is closed, so nothing else holds it.
            pass
