"""The warm start: behaviour cloning from expert demonstrations collected through the engine.

RL from a random VLA never sees a success on a tabletop task (every advantage is zero), so
GRPO starts from a cloned policy, as SimpleVLA-RL and RLinf start from an SFT checkpoint.
The demonstrations come from the engine itself, with :class:`ExpertPolicy` as its policy, so
the warm start exercises the same workers, shared memory and recording as the RL loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from pipeline import RolloutEngine, schema
from pipeline.policies import ExpertPolicy
from pipeline.policies.tinyvla import NUM_BINS
from pipeline.views import steps


def collect_demos(
    env: str,
    env_kwargs: dict,
    episodes: int,
    chunk_len: int,
    num_envs: int = 8,
    num_workers: int = 2,
    seed: int = 12345,
) -> tuple[TensorDict, float]:
    """Run the task's scripted expert through the engine; returns the successful episodes'
    steps and the expert's success rate.

    Example:
        >>> demos, rate = collect_demos("tabletop/reach", {"cameras": ("head",)}, 16, 8)
    """
    expert = ExpertPolicy(env, chunk_len=chunk_len)
    with RolloutEngine(
        env,
        expert,
        num_envs=num_envs,
        num_workers=num_workers,
        num_stages=1,
        env_kwargs=env_kwargs,
        seed=seed,
    ) as engine:
        eps = engine.collect_episodes(episodes, 1)
    ok = eps["success"].bool()
    if not ok.any():
        raise RuntimeError(f"the expert for {env!r} succeeded in none of {episodes} episodes")
    return steps(eps[ok]), float(ok.float().mean())


def action_tokens(chunk: torch.Tensor) -> torch.Tensor:
    """Continuous actions in [-1, 1] to the token head's bins (the inverse of its
    ``bin_centers``)."""
    return ((chunk.clamp(-1, 1) + 1) * (NUM_BINS - 1) / 2).round().long()


def behaviour_clone(
    policy: torch.nn.Module,
    demos: TensorDict,
    num_steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """Cross-entropy of the token head on the demonstrations' action bins; returns the loss
    of every step.

    Example:
        >>> losses = behaviour_clone(policy, demos, num_steps=200)
    """
    opt = torch.optim.AdamW(policy.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    targets = action_tokens(demos[schema.ACTION_CHUNK])
    losses = []
    policy.train()
    for _ in range(num_steps):
        idx = torch.randint(len(demos), (min(batch_size, len(demos)),), generator=gen)
        logits = policy.action_logits(demos[idx])
        loss = F.cross_entropy(logits.reshape(-1, NUM_BINS), targets[idx].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    policy.eval()
    return losses
