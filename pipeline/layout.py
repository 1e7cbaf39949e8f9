"""The shared-memory layout: every array the workers and the inference loop share.

It is derived from the :class:`envs.EnvSpec` and the chunk shape, and nothing else, so the
parent and every worker compute the same offsets independently. One POSIX shared-memory
segment holds it all.

Two kinds of arrays:

* **slot arrays** ``[slots, num_envs, ...]``: what a worker writes after executing a chunk —
  the next observation plus the results of the chunk that led to it (one record per env).
  ``slots`` is the ring depth: while the inference side reads slot ``s`` of a stage (to batch
  and to record it), the workers write the next results of that stage into slot ``s ^ 1``.
  A stage's rows are contiguous, so a stage batch is one contiguous block per field
  (zero-copy views, one DMA per field on CUDA).
* **control arrays** ``[num_envs, ...]``: what the inference side writes for a worker — the
  action chunk, how many actions to execute, and the seed/id of the episode to start when the
  current one ends (``-1`` parks the env).
"""

from __future__ import annotations

import mmap
import os
import secrets
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from envs.spec import EnvSpec
from pipeline.profiler.spans import RING_CAPACITY, SPAN_DTYPE

SHM_PREFIX = "vlare_"
INSTRUCTION_BYTES = 256
_ALIGN = 64

# Per-env results written with every observation: one aligned record, so a worker finishes
# an env with a single store and the loop records a stage's results with a single copy.
RESULT_DTYPE = np.dtype(
    [
        ("reward", np.float32),  # summed over the executed part of the chunk
        ("steps", np.int32),  # control steps executed
        ("env_id", np.int32),
        ("t", np.int32),  # decisions made earlier in this observation's episode
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

    Example:
        >>> layout = Layout(env.spec, num_envs=16, chunk_len=8)
        >>> shm = SharedBuffers.create(layout)
        >>> shm.arrays["obs/state"].shape      # [slots, num_envs, state_dim]
        (2, 16, 27)
    """

    def __init__(
        self, spec: EnvSpec, num_envs: int, chunk_len: int, slots: int = 2, num_workers: int = 1
    ) -> None:
        if num_envs < 1 or chunk_len < 1 or slots < 1 or num_workers < 1:
            raise ValueError("num_envs, chunk_len, slots and num_workers must be >= 1")
        self.spec, self.num_envs, self.chunk_len, self.slots = spec, num_envs, chunk_len, slots
        self.num_workers = num_workers
        self.obs_keys = tuple(spec.obs)
        fields: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for key, fs in spec.obs.items():
            fields[f"obs/{key}"] = ((slots, num_envs, *fs.shape), fs.dtype)
        for key, (shape, dtype) in SLOT_FIELDS.items():
            fields[key] = ((slots, num_envs, *shape), dtype)
        fields["actions"] = ((num_envs, chunk_len, spec.action_dim), np.dtype(np.float32))
        for key, (shape, dtype) in CONTROL_FIELDS.items():
            fields[key] = ((num_envs, *shape), np.dtype(dtype))
        # Profiling: one span ring per worker, and the switch the inference side flips.
        fields["spans"] = ((num_workers, RING_CAPACITY), SPAN_DTYPE)
        fields["span_head"] = ((num_workers, 1), np.dtype(np.int64))
        fields["profile_on"] = ((1,), np.dtype(np.uint8))
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
    """The segment behind a :class:`Layout`, in the creating process or attached in a worker.

    The creator unlinks the name as soon as every worker has attached (:meth:`unlink`), so
    the memory lives exactly as long as some process maps it: nothing is left in /dev/shm
    after a crash once the engine is running.
    """

    def __init__(self, layout: Layout, name: str, buf, owner) -> None:
        self.layout, self.name, self._buf, self._owner = layout, name, buf, owner
        self.arrays = layout.views(buf)

    @classmethod
    def create(cls, layout: Layout) -> SharedBuffers:
        name = SHM_PREFIX + secrets.token_hex(6)
        # The stdlib class registers the name with multiprocessing's resource tracker, which
        # unlinks it should this process die before the workers have attached.
        shm = shared_memory.SharedMemory(name=name, create=True, size=layout.nbytes)
        np.frombuffer(shm.buf, np.uint8)[:] = 0
        return cls(layout, name, shm.buf, shm)

    @classmethod
    def attach(cls, layout: Layout, name: str) -> SharedBuffers:
        """Map an existing segment without registering it with any resource tracker."""
        fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
        try:
            mm = mmap.mmap(fd, layout.nbytes)
        finally:
            os.close(fd)
        return cls(layout, name, mm, mm)

    @property
    def address(self) -> int:
        """Base address of the mapping (for cudaHostRegister)."""
        import ctypes

        return ctypes.addressof(ctypes.c_char.from_buffer(self._buf))

    def unlink(self) -> None:
        if isinstance(self._owner, shared_memory.SharedMemory):
            try:
                self._owner.unlink()
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self.arrays = {}
        try:
            self._owner.close()
        except BufferError:
            # A torch tensor or numpy view still references the mapping; it is released
            # when they are collected. The name is already unlinked, so nothing leaks.
            pass
