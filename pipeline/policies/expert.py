"""ExpertPolicy: the scripted experts batched behind the policy interface."""

from __future__ import annotations

import numpy as np
import torch
from tensordict import TensorDictBase
from torch import nn

import envs
from pipeline import schema


class ExpertPolicy(nn.Module):
    """Deterministic chunks from a task's scripted expert.

    For ``chunk_len > 1`` the expert plans open loop: it rolls its own idealised model of the
    arm (the TCP follows the commanded deltas, a grasped cube follows the TCP) forward from the
    observed state, so a chunk is a plan, not one action repeated.

    With lookahead (``RolloutEngine(..., lookahead=d)``) it conditions on the frozen prefix
    the way a planner does: it rolls its model through the ``d`` actions that will run while
    it plans, and plans the rest of the chunk from where they leave the arm.

    Args:
        task: a registered env name with a scripted expert (``"tabletop/..."`` or ``"toy"``).
        chunk_len: the actions per chunk, planned open loop.
        condition_on_prefix: ``False`` plans from the observed state as if the chunk started
            now (the engine then runs it "naive async", from step ``d`` on).

    Raises:
        ValueError: ``chunk_len < 1``, or ``task`` has no scripted expert.

    Example:
        >>> policy = ExpertPolicy("tabletop/pick-place", chunk_len=4)
        >>> td = policy(td)   # writes ("vla_action", "chunk") [B, 4, 7]
    """

    def __init__(self, task: str, chunk_len: int = 1, condition_on_prefix: bool = True) -> None:
        super().__init__()
        if chunk_len < 1:
            raise ValueError("chunk_len must be >= 1")
        self.task, self.chunk_len, self.action_dim = task, chunk_len, 7
        self.conditions_on_prefix = condition_on_prefix
        self._expert = envs.expert(task)
        self._predict = envs.expert_model(task)

    def _step_model(self, state: np.ndarray, actions: np.ndarray) -> np.ndarray:
        return np.stack([self._predict(s, a) for s, a in zip(state, actions, strict=True)])

    @torch.no_grad()
    def forward(self, td: TensorDictBase) -> TensorDictBase:
        # envs that keep the scene out of the state hand the expert its full state apart
        full = td.get(schema.PRIVILEGED, None)
        full = td.get(schema.STATE) if full is None else full
        state = full.detach().cpu().numpy().astype(np.float64)
        chunk = np.zeros((len(state), self.chunk_len, self.action_dim), np.float32)
        frozen = np.zeros(len(state), np.int64)
        if self.conditions_on_prefix and schema.PREFIX_LEN in td.keys(include_nested=True):
            frozen = td[schema.PREFIX_LEN].cpu().numpy()
            prefix = td[schema.ACTION_PREFIX].cpu().numpy()
        for h in range(self.chunk_len):
            a = self._expert(state)
            pinned = h < frozen  # rows whose action h is already decided: follow it
            if pinned.any():
                a = np.where(pinned[:, None], prefix[:, h], a)
            chunk[:, h] = a
            state = self._step_model(state, a)
        td.set(schema.ACTION_CHUNK, torch.from_numpy(chunk).to(full.device))
        return td
