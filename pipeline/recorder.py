"""The trajectory store: preallocated ``[rows, T]`` buffers filled one stage batch at a time.

A decision is recorded in two halves: what the policy saw and produced (when it is dispatched)
and what came of it (when the worker's results arrive). Rows are envs for ``rollout()`` and
episodes for ``collect_episodes()``; the caller says where each stage row goes. The buffers are
numpy arrays wrapped by torch without copying, so :meth:`to_tensordict` costs nothing.
"""

from __future__ import annotations

import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict

from pipeline import schema
from pipeline.layout import Layout

# Result fields of a decision: name -> (shared array, output key, dtype).
_NEXT = {
    "reward": ("reward", ("next", "reward"), np.float32),
    "terminated": ("terminated", ("next", "terminated"), np.bool_),
    "truncated": ("truncated", ("next", "truncated"), np.bool_),
    "success": ("success", ("next", "success"), np.bool_),
    "steps": ("steps", ("next", "steps_executed"), np.int32),
}


class TrajectoryStore:
    def __init__(
        self, layout: Layout, arrays: dict[str, np.ndarray], rows: int, max_t: int
    ) -> None:
        self.layout, self.layout_arrays, self.rows, self.max_t = layout, arrays, rows, max_t
        spec = layout.spec
        shape = (rows, max_t)
        self.obs = {k: np.zeros(shape + fs.shape, fs.dtype) for k, fs in spec.obs.items()}
        self.ints = {
            k: np.full(shape, -1, np.int64)
            for k in ("sample_seed", "episode_id", "env_id", "reset_seed", "policy_version")
        }
        self.is_init = np.zeros(shape, np.bool_)
        self.valid = np.zeros(shape, np.bool_)
        self.next = {k: np.zeros(shape, dt) for k, (_, _, dt) in _NEXT.items()}
        self.instructions = np.full(shape, "", dtype=object)
        self.outputs: dict[tuple | str, np.ndarray] = {}
        self.length = np.zeros(rows, np.int64)  # filled decisions per row

    def _output_buffer(self, key, value: torch.Tensor) -> np.ndarray:
        buf = self.outputs.get(key)
        if buf is None:
            arr = value.detach().cpu().numpy()
            buf = self.outputs[key] = np.zeros((self.rows, self.max_t, *arr.shape[1:]), arr.dtype)
        return buf

    def record_decision(
        self,
        rows: np.ndarray,
        ts: np.ndarray,
        src: np.ndarray,
        slot: int,
        lo: int,
        outputs: dict,
        instructions: list[str],
        ints: dict[str, np.ndarray],
    ) -> None:
        """Copy the observation of stage rows ``lo + src`` (from ``slot``) and the policy
        outputs ``outputs[key][src]`` into ``[rows, ts]``."""
        if len(rows) == 0:
            return
        a = self.layout_arrays
        for k, buf in self.obs.items():
            buf[rows, ts] = a[f"obs/{k}"][slot, lo + src]
        for key, value in outputs.items():
            self._output_buffer(key, value)[rows, ts] = value.detach().cpu().numpy()[src]
        for k, v in ints.items():
            self.ints[k][rows, ts] = v[src]
        self.is_init[rows, ts] = a["is_init"][slot, lo + src].astype(bool)
        self.instructions[rows, ts] = [instructions[i] for i in src]
        self.valid[rows, ts] = True
        np.maximum.at(self.length, rows, ts + 1)

    def record_results(
        self, rows: np.ndarray, ts: np.ndarray, env_ids: np.ndarray, slot: int
    ) -> None:
        """Fill the ``("next", ...)`` half of decisions ``[rows, ts]`` from ``slot``."""
        if len(rows) == 0:
            return
        a = self.layout_arrays
        for name, (src_key, _, dtype) in _NEXT.items():
            self.next[name][rows, ts] = a[src_key][slot, env_ids].astype(dtype)

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
        steps = self.next["steps"][:, :t]
        horizon = self.layout.chunk_len
        td.set(schema.ACTION_IS_PAD, torch.from_numpy(np.arange(horizon) >= steps[..., None]))
        for k, buf in self.ints.items():
            td.set(k, torch.from_numpy(buf[:, :t]))
        td.set("is_init", torch.from_numpy(self.is_init[:, :t]))
        td.set("mask", torch.from_numpy(self.valid[:, :t]))
        for name, (_, key, _) in _NEXT.items():
            value = torch.from_numpy(self.next[name][:, :t])
            td.set(key, value.unsqueeze(-1) if name != "steps" else value)
        done = self.next["terminated"][:, :t] | self.next["truncated"][:, :t]
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
