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

    Example:
        >>> policy = ExpertPolicy("tabletop/pick-place", chunk_len=4)
        >>> td = policy(td)   # writes ("vla_action", "chunk") [B, 4, 7]
    """

    def __init__(self, task: str, chunk_len: int = 1) -> None:
        super().__init__()
        if chunk_len < 1:
            raise ValueError("chunk_len must be >= 1")
        self.task, self.chunk_len, self.action_dim = task, chunk_len, 7
        self._expert = envs.expert(task)
        self._predict = envs.expert_model(task)

    @torch.no_grad()
    def forward(self, td: TensorDictBase) -> TensorDictBase:
        state = td[schema.STATE].detach().cpu().numpy().astype(np.float64)
        chunk = np.zeros((len(state), self.chunk_len, self.action_dim), np.float32)
        for h in range(self.chunk_len):
            a = self._expert(state)
            chunk[:, h] = a
            state = np.stack([self._predict(s, act) for s, act in zip(state, a, strict=True)])
        td.set(schema.ACTION_CHUNK, torch.from_numpy(chunk).to(td[schema.STATE].device))
        return td
