"""Perception pre-training: teach the vision tower where things are, from reset scenes.

A thousand demonstrations give a pixels policy a few thousand decisions, mostly neighbouring
frames of the same few scenes, and cloning's cross-entropy says only indirectly where the
instructed cube is. A reset is cheap (about a millisecond of SAPIEN plus one small render),
so thousands of fresh scenes take seconds, and the simulator knows what is in each
(``observation.privileged``: the instructed object's and the target's poses). Regressing
that from the image and the instruction, before cloning, teaches the tower to find the named
cube among two and the target (``python bench.py training --part perception`` measures how
well). The regression head is a training signal only: the policy never reads
``observation.privileged``, and the head is dropped once the warm start is done.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tensordict import TensorDict

import envs
from pipeline import schema
from trainer.fitting import fit_minibatches


class PrivilegedHead(torch.nn.Module):
    """A small MLP from the pooled :meth:`TinyVLA.query_features` to the env's privileged
    state, standardised per dimension over a reference sample. Dimensions that do not vary
    in the reference (a fixed height, an initial pose) are left out: they carry no signal.
    The reference should cover every state the head will see: a dimension that barely moves
    in it (a cube's orientation at reset, std 3e-4) would turn a turned cube into a target
    of hundreds of standard deviations; the scale is floored at 1e-3 for the same reason.

    Example:
        >>> head = PrivilegedHead(policy.cfg.dim, scenes.get(schema.PRIVILEGED))
        >>> loss = head.loss(policy.query_features(batch), batch.get(schema.PRIVILEGED))
    """

    def __init__(self, width: int, reference: torch.Tensor) -> None:
        super().__init__()
        reference = reference.float()
        std = reference.std(0)
        keep = std > 1e-4
        if not keep.any():
            raise ValueError("the privileged state does not vary over the reference sample")
        self.register_buffer("keep", keep)
        self.register_buffer("mean", reference.mean(0)[keep])
        self.register_buffer("std", std[keep].clamp_min(1e-3))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, int(keep.sum()))
        )

    def standardise(self, privileged: torch.Tensor) -> torch.Tensor:
        """The kept dimensions of ``privileged``, in the reference's standard deviations."""
        return (privileged.float()[:, self.keep] - self.mean) / self.std

    def loss(self, features: torch.Tensor, privileged: torch.Tensor) -> torch.Tensor:
        """Mean squared error in standard deviations; ``features`` is ``[B, Q, D]``."""
        return F.mse_loss(self.net(features.mean(1)), self.standardise(privileged))

    def baseline(self, privileged: torch.Tensor) -> float:
        """The loss of predicting ``privileged``'s own mean: what a head that saw nothing scores."""
        return float(self.standardise(privileged).var(0, unbiased=False).mean())


def reset_scenes(env: str, env_kwargs: dict, count: int, seed: int) -> TensorDict:
    """``count`` freshly reset scenes of ``env`` as one canonical batch with
    ``observation.privileged``; reset seeds ``seed .. seed + count - 1``.

    Example:
        >>> scenes = reset_scenes("tabletop/pick-place", pixels_kwargs, 4000, seed=10**7)
    """
    e = envs.make(env, **env_kwargs)
    try:
        obs, texts = [], []
        for i in range(count):
            o, _ = e.reset(seed=seed + i)
            obs.append(o)
            texts.append(e.instruction)
    finally:
        e.close()
    if "privileged" not in obs[0]:
        raise ValueError(f"{env!r} with {env_kwargs} has no privileged state to learn from")
    td = schema.make_batch(obs, texts)
    td.set(schema.PRIVILEGED, torch.from_numpy(np.stack([o["privileged"] for o in obs])))
    return td


def pretrain_perception(
    policy: torch.nn.Module,
    head: PrivilegedHead,
    scenes: TensorDict,
    num_steps: int,
    batch_size: int = 32,
    lr: float = 2e-4,
    seed: int = 0,
    held_out: TensorDict | None = None,
    report_every: int = 500,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """Regress ``scenes``' privileged state from their images and instructions through
    ``policy``'s vision and fusion, with ``head`` on top (its action head is untouched);
    returns the training loss of every step. With ``held_out``, ``log`` gets its loss every
    ``report_every`` steps, next to what predicting its mean scores.

    lr 2e-4, not the 1e-3 that suits the full-state policy: at 1e-3 every TinyVLA vision
    tower stayed at the mean (docs/training.md, the perception probe).

    Example:
        >>> head = PrivilegedHead(policy.cfg.dim, scenes.get(schema.PRIVILEGED))
        >>> losses = pretrain_perception(policy, head, scenes, 2000, held_out=probe, log=print)
    """
    report = None
    if held_out is not None and log is not None:
        truth = held_out.get(schema.PRIVILEGED)
        floor = head.baseline(truth)

        def report(step: int) -> None:
            if step % report_every == 0 or step == num_steps:
                with torch.no_grad():
                    policy.eval()
                    err = float(head.loss(policy.query_features(held_out), truth))
                    policy.train()
                log(f"perception step {step}: held-out loss {err:.3f} (the mean: {floor:.3f})")

    def batch_loss(idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        batch = scenes[idx]
        loss = head.loss(policy.query_features(batch), batch.get(schema.PRIVILEGED))
        return loss, loss

    params = [*policy.parameters(), *head.parameters()]
    return fit_minibatches(
        policy, params, len(scenes), num_steps, batch_loss, batch_size, lr, seed, report
    )
