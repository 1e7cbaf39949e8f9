"""GRPO on the engine's output: group advantages, dynamic sampling, the clipped loss, eval.

Each function is small enough to copy into a trainer of your own. The data they take is what
``RolloutEngine.collect_episodes`` returns, flattened by :func:`pipeline.record.views.steps`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tensordict import TensorDict

from pipeline import schema
from pipeline.record.views import steps
from pipeline.weights import produced_by


def group_advantages(success: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Per-episode advantages ``[E]``: the success reward normalised within its group.

    Example:
        >>> group_advantages(torch.tensor([1, 0, 0, 0]), group_size=4)
        tensor([ 1.5000, -0.5000, -0.5000, -0.5000])
    """
    r = success.float().view(-1, group_size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)
    return adv.view(-1)


def informative_groups(success: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[G]`` bool: the groups whose members did not all succeed or all fail (only those
    have a non-zero advantage, so only those teach anything)."""
    r = success.bool().view(-1, group_size)
    return r.any(1) & ~r.all(1)


@dataclass
class SampleReport:
    """What dynamic sampling did for one batch."""

    calls: int = 0  # collect_episodes calls (1 + refills)
    groups_kept: int = 0
    dropped_all_success: int = 0
    dropped_all_fail: int = 0
    episodes: int = 0  # every episode collected, dropped ones included
    env_steps: int = 0
    successes: int = 0  # over every episode collected: success at its last step
    success_once: int = 0  # episodes that succeeded at any step (trainer/runlog.py)
    decisions: int = 0  # the episodes' lengths, summed
    capped: bool = False  # the refill cap ended it before the batch was full
    versions: list[int] = field(default_factory=list)  # policy_version of each call
    reset_seeds: list[int] = field(default_factory=list)  # each group's, every call


def dynamic_sample(
    first: TensorDict,
    collect: Callable[[], TensorDict],
    num_groups: int,
    group_size: int,
    max_refills: int,
) -> tuple[TensorDict | None, SampleReport]:
    """Keep the informative groups of ``first`` and of up to ``max_refills`` more calls of
    ``collect()`` until ``num_groups`` are kept; returns their steps (with ``advantage``)
    and what was dropped. Never loops forever: with every group all-success (or all-fail)
    it stops at the cap and says so (``capped``), returning what it has (None if nothing).

    Example:
        >>> collect = lambda: engine.collect_episodes(8, 8)
        >>> batch, report = dynamic_sample(collect(), collect, 8, 8, max_refills=4)
    """
    report = SampleReport()
    kept: list[TensorDict] = []
    eps = first
    while True:
        report.calls += 1
        success = eps["success"]
        report.episodes += len(success)
        report.env_steps += int(eps["env_steps"].sum())
        report.successes += int(success.sum())
        mask = eps["mask"]
        report.success_once += int((eps["next", "success"].reshape(mask.shape) & mask).any(1).sum())
        report.decisions += int(eps["length"].sum())
        report.versions.append(produced_by(eps))
        report.reset_seeds += eps["reset_seed"].reshape(-1)[::group_size].tolist()
        groups = success.bool().view(-1, group_size)
        report.dropped_all_success += int(groups.all(1).sum())
        report.dropped_all_fail += int((~groups).all(1).sum())
        keep = informative_groups(success, group_size)
        keep = keep & (keep.cumsum(0) <= num_groups - report.groups_kept)
        if keep.any():
            eps.set("advantage", group_advantages(success, group_size))
            chosen = keep.repeat_interleave(group_size)
            kept.append(steps(eps[chosen]))
            report.groups_kept += int(keep.sum())
        if report.groups_kept >= num_groups:
            break
        if report.calls > max_refills:
            report.capped = True
            break
        eps = collect()
    return (torch.cat(kept) if kept else None), report


PROX = "prox_token_log_prob"  # the batch's per-token log-probs before this update


@torch.no_grad()
def add_proximal_log_probs(policy: torch.nn.Module, batch: TensorDict, chunk: int = 256) -> None:
    """Store the current policy's per-token log-probs of the batch's tokens (``[M, H, A]``)
    before an update: the proximal policy the ratio is clipped against."""
    tokens = batch[schema.ACTION_TOKENS].to(_device(policy))
    parts = [
        policy.token_log_probs(batch[lo : lo + chunk], tokens[lo : lo + chunk]).cpu()
        for lo in range(0, len(batch), chunk)
    ]
    batch.set(PROX, torch.cat(parts))


def grpo_loss(
    policy: torch.nn.Module, batch: TensorDict, clip: float = 0.2, max_weight: float = 2.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level clipped GRPO loss with the behaviour correction of decoupled PPO.

    - The ratio is per token, against the proximal policy (the weights before this update,
      :func:`add_proximal_log_probs`), and clipped to ``1 +- clip``: a chunk holds H x A
      tokens (56 for chunk 8), and a ratio of their product leaves any clip range at once.
    - Data collected with older weights (overlapped training) is reweighted by
      ``pi_prox / pi_behaviour`` per decision, from the engine's recorded
      ``sample_log_prob``, capped at ``max_weight``. Synchronous, the weight is exactly 1.
    - Every episode weighs the same, whatever its length: failures run to the time limit and
      would otherwise outweigh successes several times over, and a loss dominated by pushing
      sampled tokens down only flattens the policy.

    Example:
        >>> add_proximal_log_probs(policy, batch)   # once per batch, before the epochs
        >>> loss, info = grpo_loss(policy, batch[idx])
        >>> loss.backward()
    """
    device = _device(policy)
    new = policy.token_log_probs(batch, batch[schema.ACTION_TOKENS].to(device))
    prox = batch[PROX].to(device)
    # With lookahead a chunk's frozen prefix is not the policy's draw: only sampled tokens
    # count, as in the recorded sample_log_prob.
    sampled = policy.sampled_mask(batch)
    mask = torch.ones_like(new) if sampled is None else sampled.to(device).unsqueeze(-1).to(new)
    mask = mask.expand_as(new)
    ratio = (new - prox).exp()
    behaviour = batch[schema.SAMPLE_LOG_PROB].to(device)
    weight_behaviour = ((prox * mask).sum(dim=(1, 2)) - behaviour).exp().clamp(max=max_weight)
    adv = batch["advantage"].to(device).view(-1, 1, 1)
    gain = torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    gain = (gain * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2)).clamp(min=1)
    weight = weight_behaviour / batch["length"].to(device).clamp(min=1).float()
    loss = -(weight * gain).sum() / weight.sum()
    with torch.no_grad():
        clipped = (((ratio - 1).abs() > clip).float() * mask).sum() / mask.sum().clamp(min=1)
        # k3 estimate of KL(prox || new) per token; prox is the behaviour policy when
        # synchronous (and the weights the update started from when overlapped)
        kl = (((ratio - 1) - (new - prox)) * mask).sum() / mask.sum().clamp(min=1)
    return loss, {
        "clip_fraction": float(clipped),
        "behaviour_weight": float(weight_behaviour.mean()),
        "kl": float(kl),
    }


@contextlib.contextmanager
def deterministic(policy: torch.nn.Module, value: bool = True) -> Iterator[None]:
    """``policy.deterministic = value`` for the block, put back after it (policies without
    the attribute are left alone).

    Example:
        >>> with deterministic(engine.policy):    # argmax tokens
        ...     eps = engine.collect_episodes(8, 1, reset_seeds=seeds)
    """
    before = getattr(policy, "deterministic", None)
    if before is None:
        yield
        return
    policy.deterministic = value
    try:
        yield
    finally:
        policy.deterministic = before


def evaluate(engine, seeds: Sequence[int]) -> dict[str, float]:
    """Held-out success of the engine's policy on fixed reset seeds, two ways: ``greedy``
    (made deterministic: argmax tokens) and ``sampled`` (the stochastic policy GRPO trains,
    with fresh sampling noise).

    Example:
        >>> evaluate(engine, range(10**9, 10**9 + 32))
        {'greedy': 0.41, 'sampled': 0.38}
    """
    rates = {}
    for name, greedy in (("greedy", True), ("sampled", False)):
        with deterministic(engine.policy, greedy):
            eps = engine.collect_episodes(len(seeds), 1, reset_seeds=list(seeds))
        rates[name] = float(eps["success"].float().mean())
    return rates


def _device(policy: torch.nn.Module) -> torch.device:
    return next(policy.parameters()).device
