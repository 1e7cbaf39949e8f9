"""The trajectory store: preallocated ``[rows, T]`` buffers filled one stage batch at a time.

A decision is recorded in two halves: what the policy saw and produced (when it is dispatched)
and what came of it (when the worker's results arrive). Rows are envs for ``rollout()`` and
episodes for ``collect_episodes()``; the caller says where each stage row goes. The buffers are
numpy arrays wrapped by torch without copying, so :meth:`to_tensordict` costs nothing.
"""

from __future__ import annotations

import mmap

import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict

from pipeline import schema
from pipeline.layout import RESULT_DTYPE, Layout

# The results of a decision, from its result record: field -> (output key, dtype).
_NEXT = {
    "reward": (("next", "reward"), np.float32),
    "terminated": (("next", "terminated"), np.bool_),
    "truncated": (("next", "truncated"), np.bool_),
    "success": (("next", "success"), np.bool_),
    "steps": (("next", "steps_executed"), np.int32),
}


_POPULATE_BYTES = 1 << 20


def _alloc(shape: tuple, dtype) -> np.ndarray:
    """Zeroed memory. Large buffers are mapped with MAP_POPULATE: the kernel provides every
    page up front, instead of one page fault per 4 KiB on the recording hot path."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < _POPULATE_BYTES or not hasattr(mmap, "MAP_POPULATE"):
        return np.zeros(shape, dtype)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype).reshape(shape)


ID_FIELDS = ("sample_seed", "episode_id", "reset_seed", "env_id", "policy_version")


class Dest:
    """Where the rows of one stage batch go: stage row ``src[j]`` -> ``[rows[j], ts[j]]``.

    ``block`` is set when every stage row goes to consecutive rows at one time step (the
    ``rollout()`` case): then every copy is a single slice assignment.
    """

    __slots__ = ("rows", "ts", "src", "block")

    def __init__(self, rows: np.ndarray, ts: np.ndarray, src: np.ndarray, stage_len: int) -> None:
        self.rows, self.ts, self.src = rows, ts, src
        n = len(src)
        contiguous = n == stage_len and n > 0 and rows[-1] - rows[0] == n - 1
        self.block = (int(rows[0]), int(ts[0])) if contiguous and (ts == ts[0]).all() else None

    def put(self, dst: np.ndarray, stage_values: np.ndarray) -> None:
        """``dst[rows[j], ts[j]] = stage_values[src[j]]``, by the cheapest copy."""
        if self.block is not None:
            r0, t = self.block
            dst[r0 : r0 + len(self.src), t] = stage_values
        elif stage_values.nbytes >= 16384 * len(stage_values):  # large rows: a memcpy each
            for r, t, j in zip(self.rows, self.ts, self.src, strict=True):
                np.copyto(dst[r, t], stage_values[j])
        else:
            dst[self.rows, self.ts] = stage_values[self.src]


class TrajectoryStore:
    def __init__(
        self, layout: Layout, arrays: dict[str, np.ndarray], rows: int, max_t: int
    ) -> None:
        self.layout, self.layout_arrays, self.rows, self.max_t = layout, arrays, rows, max_t
        spec = layout.spec
        shape = (rows, max_t)
        self.obs = {k: _alloc(shape + fs.shape, fs.dtype) for k, fs in spec.obs.items()}
        self.ids = np.full((*shape, len(ID_FIELDS)), -1, np.int64)
        self.is_init = np.zeros(shape, np.bool_)
        self.valid = np.zeros(shape, np.bool_)
        self.results = np.zeros(shape, RESULT_DTYPE)  # each decision's result record
        self.instructions = np.full(shape, "", dtype=object)
        self.outputs: dict[tuple | str, np.ndarray] = {}
        self.length = np.zeros(rows, np.int64)  # filled decisions per row

    def _output_buffer(self, key, value: np.ndarray) -> np.ndarray:
        buf = self.outputs.get(key)
        if buf is None:
            buf = self.outputs[key] = _alloc((self.rows, self.max_t, *value.shape[1:]), value.dtype)
        return buf

    def record_decision(
        self,
        dest: Dest,
        slot: int,
        lo: int,
        hi: int,
        outputs: dict,
        instructions: list[str],
        ids: np.ndarray,
    ) -> None:
        """What the policy saw (stage rows ``lo:hi`` of ``slot``) and what it produced."""
        if len(dest.src) == 0:
            return
        a = self.layout_arrays
        for k, buf in self.obs.items():
            dest.put(buf, a[f"obs/{k}"][slot, lo:hi])
        for key, value in outputs.items():
            dest.put(self._output_buffer(key, value), value)
        dest.put(self.ids, ids)
        dest.put(self.is_init, a["is_init"][slot, lo:hi].astype(bool))
        dest.put(self.valid, np.ones(hi - lo, np.bool_))
        texts = np.empty(hi - lo, dtype=object)
        texts[:] = instructions
        dest.put(self.instructions, texts)
        self.length[dest.rows] = np.maximum(self.length[dest.rows], dest.ts + 1)

    def record_results(self, dest: Dest, slot: int, lo: int, hi: int) -> None:
        """What came of it: the ``("next", ...)`` half, from the stage's next ``slot``."""
        if len(dest.src) == 0:
            return
        dest.put(self.results, self.layout_arrays["results"][slot, lo:hi])

    def next_field(self, name: str, t: int) -> np.ndarray:
        """One result field over ``[rows, :t]`` as a contiguous array of its output dtype."""
        return np.ascontiguousarray(self.results[name][:, :t]).astype(_NEXT[name][1])

    def to_tensordict(self, t: int | None = None) -> TensorDict:
        """The canonical VLA layout over ``[rows, t]`` (images as ``[..., C, H, W]`` views)."""
        t = self.max_t if t is None else t
        rows = self.rows
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
        for k, name in enumerate(ID_FIELDS):
            td.set(name, torch.from_numpy(np.ascontiguousarray(self.ids[:, :t, k])))
        td.set("is_init", torch.from_numpy(self.is_init[:, :t]))
        td.set("mask", torch.from_numpy(self.valid[:, :t]))
        fields = {name: self.next_field(name, t) for name in _NEXT}
        for name, (key, _) in _NEXT.items():
            value = torch.from_numpy(fields[name])
            td.set(key, value.unsqueeze(-1) if name != "steps" else value)
        done = fields["terminated"] | fields["truncated"]
        td.set(("next", "done"), torch.from_numpy(done).unsqueeze(-1))
        instr = self.instructions[:, :t]
        td.set(
            schema.INSTRUCTION,
            NonTensorStack(
                *[NonTensorStack(*[NonTensorData(s) for s in row]) for row in instr.tolist()]
            )
            if rows and t
            else NonTensorStack(batch_size=[rows, t]),
        )
        return td
