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
from pipeline.policies.tinyvla import NUM_BINS, action_tokens
from pipeline.record.views import steps
from trainer.fitting import fit_minibatches
from trainer.perception import PrivilegedHead


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


def behaviour_clone(
    policy: torch.nn.Module,
    demos: TensorDict,
    num_steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    max_delay: int = 0,
    state_noise: float = 0.0,
    privileged_weight: float = 0.0,
    privileged_head: PrivilegedHead | None = None,
) -> list[float]:
    """Cross-entropy of the token head on the demonstrations' action bins; returns the loss
    of every step.

    ``max_delay > 0`` trains for lookahead (training-time action conditioning): every sample
    gets a random delay ``d`` in ``[0, max_delay]``, its first ``d`` demonstrated actions
    become the frozen prefix, and the loss covers the rest, so the policy learns to continue
    from a prefix. It needs ``TinyVLA(..., prefix_conditioning=True)``.

    ``state_noise > 0`` adds Gaussian noise of that std to the state of every sample: with
    few demonstrations, a state that is unique to its episode (initial joint noise) lets a
    policy memorise episodes instead of reading the images.

    ``privileged_weight > 0`` adds an auxiliary loss, a simulator-only training signal: a
    small head on the pooled :meth:`TinyVLA.query_features` regresses the env's privileged
    state (``observation.privileged``: object and target positions, standardised per
    dimension over the demonstrations; :class:`PrivilegedHead`, or ``privileged_head``, e.g.
    the one :func:`pretrain_perception` trained), weighted by ``privileged_weight``. The head
    is dropped afterwards; the policy still sees only images, instruction and ``state``. Cloning
    alone does not teach a small vision tower where things are from a few thousand
    decisions; this says it outright (as asymmetric actor-critic or privileged-information
    distillation use what only the simulator knows).

    Example:
        >>> losses = behaviour_clone(policy, demos, num_steps=200)
        >>> losses = behaviour_clone(pixels_policy, demos, 200, privileged_weight=1.0)
        >>> losses = behaviour_clone(rtc_policy, demos, num_steps=200, max_delay=3)
    """
    if max_delay and not getattr(policy, "conditions_on_prefix", False):
        raise ValueError("max_delay needs a policy built with prefix_conditioning=True")
    params = list(policy.parameters())
    if privileged_weight:
        if schema.PRIVILEGED not in demos.keys(include_nested=True):
            raise ValueError("privileged_weight needs demos with observation.privileged")
        aux = privileged_head
        if aux is None:
            aux = PrivilegedHead(policy.cfg.dim, demos.get(schema.PRIVILEGED))
        params += list(aux.parameters())
    chunks = demos[schema.ACTION_CHUNK]
    targets = action_tokens(chunks)
    horizon = targets.shape[1]
    if not 0 <= max_delay < horizon:
        raise ValueError(f"max_delay={max_delay} must be in [0, chunk_len={horizon})")

    def batch_loss(idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        batch, target = demos[idx], targets[idx]
        if state_noise:
            batch = batch.clone(recurse=False)
            state = batch.get(schema.STATE)
            noise = torch.randn(state.shape, generator=gen, dtype=state.dtype)
            batch.set(schema.STATE, state + state_noise * noise)
        if max_delay:
            d = torch.randint(max_delay + 1, (len(idx),), generator=gen)
            frozen = torch.arange(horizon) < d[:, None]
            batch = batch.clone(recurse=False)
            batch.set(schema.ACTION_PREFIX, chunks[idx] * frozen.unsqueeze(-1))
            batch.set(schema.PREFIX_LEN, d)
            batch.set(schema.PREFIX_OVERLAP, d)
            target = target.masked_fill(frozen.unsqueeze(-1), -100)  # ignore_index
        features = policy.query_features(batch)
        logits = policy.action_logits(batch, features)
        clone = F.cross_entropy(logits.reshape(-1, NUM_BINS), target.reshape(-1))
        if not privileged_weight:
            return clone, clone
        aux_loss = aux.loss(features, batch.get(schema.PRIVILEGED))
        return clone + privileged_weight * aux_loss, clone

    return fit_minibatches(policy, params, len(demos), num_steps, batch_loss, batch_size, lr, seed)
