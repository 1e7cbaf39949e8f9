"""Does the policy look and read? Evaluation with one input taken away.

A policy that solves a task whose scene is only in the images (tabletop ``state="proprio"``)
and whose instruction names the object to move must fail without them. :class:`Ablated`
wraps a policy and takes one input away before every call: the images (a black frame) or the
instruction (each episode's replaced by another episode's). :func:`ablation_success` runs the
held-out evaluation three ways, with the same reset seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from tensordict import NonTensorData, NonTensorStack, TensorDictBase
from torch import nn

from pipeline import RolloutEngine, schema
from trainer.grpo import deterministic


class Ablated(nn.Module):
    """``policy`` with its images blanked (``blank_images``) or its instructions replaced
    (``instructions``: text -> the text it becomes). The weights are ``policy``'s own.

    Example:
        >>> blind = Ablated(policy, blank_images=True)
        >>> deaf = Ablated(policy, instructions={"pick the red cube ...": "pick the blue ..."})

    Raises:
        ValueError: neither or both of the two ablations.
    """

    def __init__(
        self,
        policy: nn.Module,
        *,
        blank_images: bool = False,
        instructions: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        if blank_images == (instructions is not None):
            raise ValueError("Ablated takes one input away: blank_images or instructions")
        self.policy, self.blank_images = policy, blank_images
        self.instructions = dict(instructions or {})
        self.chunk_len = policy.chunk_len
        self.action_dim = getattr(policy, "action_dim", None)
        self.conditions_on_prefix = getattr(policy, "conditions_on_prefix", False)

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        x = td.clone(recurse=False)
        if self.blank_images:
            for cam in schema.cameras_of(td):
                x.set(schema.image_key(cam), torch.zeros_like(td.get(schema.image_key(cam))))
        else:
            texts = [self.instructions.get(t, t) for t in schema.instructions(td)]
            x.set(schema.INSTRUCTION, NonTensorStack(*[NonTensorData(t) for t in texts]))
        return self.policy(x)


def swapped_instructions(texts: Sequence[str]) -> dict[str, str]:
    """Each distinct text mapped to another one (the next in sorted order, cyclically): every
    episode gets an instruction another episode had.

    Example:
        >>> swapped_instructions(["b", "a", "c", "a"])
        {'a': 'b', 'b': 'c', 'c': 'a'}
    """
    unique = sorted(set(texts))
    if len(unique) < 2:
        raise ValueError("swapping instructions needs at least two different ones")
    return {t: unique[(i + 1) % len(unique)] for i, t in enumerate(unique)}


def ablation_success(
    make_engine: Callable[[nn.Module], RolloutEngine], policy: nn.Module, seeds: Sequence[int]
) -> dict[str, float | None]:
    """Greedy held-out success of ``policy`` on ``seeds`` as it is, with black images and with
    swapped instructions (one engine per variant, from ``make_engine(policy)``); None for the
    swap when every episode had the same instruction.

    Example:
        >>> make = lambda p: RolloutEngine("tabletop/pick-place", p, num_envs=16,
        ...                                env_kwargs={"cameras": ("head",), "state": "proprio"})
        >>> ablation_success(make, policy, range(10**9, 10**9 + 64))
        {'greedy': 0.52, 'blank_images': 0.03, 'swapped_instructions': 0.21}
    """
    with deterministic(policy):
        with make_engine(policy) as e:
            eps = e.collect_episodes(len(seeds), 1, reset_seeds=list(seeds))
        rates = {"greedy": float(eps["success"].float().mean())}
        texts = [row[0] for row in eps.get(schema.INSTRUCTION).tolist()]
        variants = {"blank_images": Ablated(policy, blank_images=True)}
        if len(set(texts)) > 1:
            swap = swapped_instructions(texts)
            variants["swapped_instructions"] = Ablated(policy, instructions=swap)
        else:  # one instruction for every episode: nothing to swap it with
            rates["swapped_instructions"] = None
        for name, ablated in variants.items():
            with make_engine(ablated) as e:
                out = e.collect_episodes(len(seeds), 1, reset_seeds=list(seeds))
            rates[name] = float(out["success"].float().mean())
    return rates
