"""A policy that records every input row it is given, keyed by the row's sample seed.

The sample seed names one decision of one episode (``seeding.sample_seeds``), so two runs
that made the same decision can be compared row by row, whatever batches the rows came in.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

from pipeline import schema

Row = dict[object, tuple]  # key -> (dtype, shape, bytes) or ("text", str)


def row_inputs(td: TensorDictBase, i: int, keys=None) -> Row:
    """Everything row ``i`` of a policy batch holds: each tensor as (dtype, shape, bytes),
    the instruction as its text. ``keys`` limits it to those tensor keys."""
    out: Row = {}
    for key in keys if keys is not None else td.keys(include_nested=True, leaves_only=True):
        if key == schema.INSTRUCTION:
            continue
        x = td.get(key)[i]
        out[key] = (x.dtype, tuple(x.shape), x.contiguous().numpy().tobytes())
    out[schema.INSTRUCTION] = ("text", schema.instructions(td)[i])
    return out


class Probe(torch.nn.Module):
    """Wraps a policy; ``seen[seed]`` lists what each row of that seed looked like, once per
    time a batch carried it (a decision re-run after a fault appears twice).

    Example:
        >>> probe = Probe(TinyVLA.from_spec(spec, chunk_len=4))
        >>> RolloutEngine("toy", probe, num_envs=8).rollout(4)
        >>> probe.seen[seed][0][("observation", "state")]   # (dtype, shape, bytes)
    """

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.chunk_len = policy.chunk_len
        self.conditions_on_prefix = getattr(policy, "conditions_on_prefix", False)
        self.seen: dict[int, list[Row]] = {}

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        for i, seed in enumerate(td.get(schema.SAMPLE_SEED).tolist()):
            self.seen.setdefault(seed, []).append(row_inputs(td, i))
        return self.policy(td)

    def take(self) -> dict[int, list[Row]]:
        seen, self.seen = self.seen, {}
        return seen
