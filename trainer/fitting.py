"""The supervised loop the warm starts share: AdamW over random minibatches of a dataset.

Cloning (``bc.py``), perception pre-training (``perception.py``) and TorchRL's ``BCLoss``
warm start (``torchrl_grpo.py``) differ only in the loss of a minibatch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from pipeline.policies.layers import batched_kernels


def fit_minibatches(
    policy: torch.nn.Module,
    params: Iterable[torch.nn.Parameter],
    size: int,
    num_steps: int,
    batch_loss: Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]],
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    before_step: Callable[[int], None] | None = None,
) -> list[float]:
    """``num_steps`` AdamW steps on ``params``, each on ``batch_size`` rows of ``range(size)``
    drawn with a generator seeded by ``seed``; ``batch_loss(idx, gen)`` returns the loss to
    minimise and the loss to record (the first may add auxiliary terms). ``policy`` is in
    train mode meanwhile, with torch's batched kernels (``batched_kernels``), and in eval
    mode after. ``before_step(step)`` runs before every
    step and once after the last (``step == num_steps``), e.g. to evaluate held-out data.
    Returns the recorded loss of every step.

    Example:
        >>> def nll(idx, gen):
        ...     loss = loss_fn(demos[idx])["loss_bc"]
        ...     return loss, loss
        >>> losses = fit_minibatches(policy, policy.parameters(), len(demos), 200, nll)
    """
    opt = torch.optim.AdamW(list(params), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    policy.train()
    with batched_kernels(policy):
        for step in range(num_steps):
            if before_step is not None:
                before_step(step)
            idx = torch.randint(size, (min(batch_size, size),), generator=gen)
            loss, recorded = batch_loss(idx, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(recorded.detach()))
        if before_step is not None:
            before_step(num_steps)
    policy.eval()
    return losses
