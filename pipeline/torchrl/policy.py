"""TorchRL's VLA policies as the engine's policy: :class:`TorchRLPolicy`.

TorchRL's ``VLAWrapperBase`` policies (``TinyVLA``, ``LeRobotPolicyWrapper``) read
``("observation", "image")`` as one ``[B, C, H, W]`` tensor (and ``("observation",
"wrist_image")``), where the engine keeps one entry per camera under ``("observation",
"image", <camera>)``. :meth:`TorchRLPolicy.to_torchrl` maps one layout onto the other, for the
rollout (``forward``) and for TorchRL's own losses on the engine's batches, so the module
TorchRL trains is the one that acted.

Sampling (token heads). ``sampling="per_row"`` (the default) takes the policy's token
distribution (``get_dist``, TorchRL's loss-time API) and draws each row's tokens from its own
``sample_seed`` (:mod:`pipeline.policies.sampling`): a row's draw depends on nothing else in
its batch, so a rollout is the same under any schedule. ``sampling="torchrl"`` lets the
policy sample itself, from torch's global RNG: a row's tokens then depend on the other rows of
its batch and on the order of calls, so rollouts differ between schedules (measured in
docs/torchrl.md). :attr:`TorchRLPolicy.reproducible` says which, and the engine records it
(``describe()["policy_reproducible"]``, which every profile carries).

Per-row draws are not enough on their own: TorchRL's layers are not batch-invariant. On the
CPU a row's logits from a batch of 1 to 11 rows differ from the same row's in a batch of 64
by up to 1e-6 (torch picks other kernels for small matrices), so a schedule that batches
differently would move log-probs, and now and then a token. ``fixed_batch=k`` (default 8) runs
the policy on batches of exactly ``k`` rows (the last block padded with copies of the last
row), and at a fixed batch size a row's logits did not depend on its position (measured at
k = 8 and 16, one and two threads): rollouts are then the same under every schedule, bit for
bit (tested). The padding costs compute when a batch is not a multiple of ``k``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import InteractionType, set_interaction_type
from torch import nn
from torchrl.data.vla import UniformActionTokenizer
from torchrl.modules.vla import VLAWrapperBase

from pipeline import schema
from pipeline.policies.sampling import row_uniform, sample_categorical

Sampling = Literal["per_row", "torchrl"]


class TorchRLPolicy(nn.Module):
    """Any TorchRL ``VLAWrapperBase`` policy as the engine's policy.

    Example:
        >>> from torchrl.modules.vla import TinyVLA
        >>> vla = TinyVLA(action_dim=7, chunk_size=8, action_head="tokens", vocab_size=64)
        >>> policy = TorchRLPolicy(vla, image="head")
        >>> engine = RolloutEngine("tabletop/reach", policy, num_envs=8,
        ...                        env_kwargs={"cameras": ("head",), "image_size": 32})
        >>> eps = engine.collect_episodes(2, 4)   # tokens, chunks and sample_log_prob per row
        >>> loss_input = policy.to_torchrl(steps(eps))   # what TorchRL's losses read

    Args:
        vla: the TorchRL policy (``input_mode="canonical"``). Its ``chunk_size`` is the
            engine's chunk length.
        image: the camera fed as ``("observation", "image")``, or several, stacked along the
            channels (``[B, 3k, H, W]``, in the order given); None: the first camera (sorted
            by name) that is not ``wrist_image``.
        wrist_image: the camera fed as ``("observation", "wrist_image")``; None: none.
        sampling: ``"per_row"`` (reproducible) or ``"torchrl"`` (the policy's own sampler).
        deterministic: token heads: argmax tokens instead of sampling (evaluation); None:
            sample with a token head. A continuous head is deterministic (TorchRL's is a
            regressor: it has no distribution to sample).
        tokenizer: token heads: tokens to actions; None: the policy's ``action_tokenizer``, else
            uniform bins over the engine's action range [-1, 1].
        fixed_batch: run the policy on batches of exactly this many rows (padded), so a row's
            output does not depend on its batch; None: on the engine's batches as they come.
        state_stats: ``(mean, std)`` of the state: the policy reads ``(state - mean) / std``
            (VLA recipes normalise proprioception by dataset statistics; TorchRL's TinyVLA has
            no normaliser of its own). Kept as buffers, so weight updates carry them: give
            the rollout copy stats too (identity ones will do) before the engine starts.

    Raises:
        TypeError: ``vla`` is not a ``VLAWrapperBase``.
        ValueError: a preprocessed-input policy, an unknown ``sampling``, sampling asked of
            a continuous head, a tokenizer whose vocabulary is not the policy's, or
            ``fixed_batch < 1``.
    """

    def __init__(
        self,
        vla: VLAWrapperBase,
        *,
        image: str | Sequence[str] | None = None,
        wrist_image: str | None = None,
        sampling: Sampling = "per_row",
        deterministic: bool | None = None,
        tokenizer: nn.Module | None = None,
        fixed_batch: int | None = 8,
        state_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(vla, VLAWrapperBase):
            raise TypeError(f"TorchRLPolicy wraps a VLAWrapperBase, got {type(vla).__name__}")
        if vla.input_mode != "canonical":
            raise ValueError(
                f"TorchRLPolicy feeds canonical VLA keys; the policy has input_mode="
                f"{vla.input_mode!r}"
            )
        if sampling not in ("per_row", "torchrl"):
            raise ValueError(f"sampling={sampling!r}: choose 'per_row' or 'torchrl'")
        self.vla = vla
        self.token_head = vla.action_head == "tokens"
        if deterministic is None:
            deterministic = not self.token_head
        if not deterministic and not self.token_head:
            raise ValueError(
                "deterministic=False needs a token head: TorchRL's continuous head is a "
                "regressor with no distribution to sample"
            )
        if fixed_batch is not None and fixed_batch < 1:
            raise ValueError(f"fixed_batch={fixed_batch} must be >= 1 (or None)")
        self.fixed_batch = fixed_batch
        self.deterministic = bool(deterministic)
        self.sampling: Sampling = sampling
        self.chunk_len, self.action_dim = vla.chunk_size, vla.action_dim
        self.image = (image,) if isinstance(image, str) else None if image is None else tuple(image)
        self.wrist_image = wrist_image
        self.tokenizer = None
        if self.token_head:
            tok = tokenizer or vla.action_tokenizer
            if tok is None:
                tok = UniformActionTokenizer(vla.vocab_size, low=-1.0, high=1.0)
            if tok.vocab_size != vla.vocab_size:
                raise ValueError(
                    f"tokenizer has {tok.vocab_size} tokens, the policy {vla.vocab_size}"
                )
            self.tokenizer = tok
        self._warned = False
        self.state_mean: torch.Tensor | None
        self.state_std: torch.Tensor | None
        self.register_buffer("state_mean", None)
        self.register_buffer("state_std", None)
        if state_stats is not None:
            self.set_state_stats(*state_stats)

    def set_state_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Normalise the state the policy reads: ``(state - mean) / std``.

        Example:
            >>> s = demos.get(("observation", "state"))
            >>> policy.set_state_stats(s.mean(0), s.std(0).clamp(min=1e-2))
        """
        mean, std = torch.as_tensor(mean).float(), torch.as_tensor(std).float()
        if mean.shape != std.shape or mean.dim() != 1 or not (std > 0).all():
            raise ValueError(
                f"state stats must be two [D] tensors with std > 0, got {list(mean.shape)} "
                f"and {list(std.shape)}"
            )
        self.state_mean, self.state_std = mean, std

    def materialize(self, spec) -> TorchRLPolicy:
        """Give the policy's lazy layers (TorchRL's TinyVLA has them) their shapes, from one
        greedy forward on a zero observation of ``spec`` (an :class:`envs.EnvSpec`); returns
        the policy. Do it before copying the policy or handing its parameters to a loss.

        Example:
            >>> policy = TorchRLPolicy(TinyVLA(...)).materialize(envs.make("toy").spec)
        """
        obs = {k: np.zeros(f.shape, f.dtype) for k, f in spec.obs.items()}
        before, self.deterministic = self.deterministic, True
        try:
            self(schema.make_batch([obs], [""], sample_seeds=[0]))
        finally:
            self.deterministic = before
        return self

    @property
    def reproducible(self) -> bool:
        """Whether a row's outputs depend only on its observation and ``sample_seed``, bit for
        bit (so a rollout is the same under every schedule): not when a token head samples
        with TorchRL's own sampler, nor without fixed batches (then the logits move in their
        last bits with the batch)."""
        own_draws = self.deterministic or not self.token_head or self.sampling == "per_row"
        return own_draws and self.fixed_batch is not None

    # -- layouts -----------------------------------------------------------------------------
    def to_torchrl(self, td: TensorDictBase) -> TensorDictBase:
        """``td`` with the engine's cameras replaced by TorchRL's image keys; every other entry
        (tokens, log-probs, advantages, masks) is kept. A shallow copy: ``td`` is untouched.

        Raises:
            KeyError: the batch has no camera, or not the ones asked for (named).
        """
        cams = schema.cameras_of(td)
        picked = self.image or tuple(c for c in cams if c != self.wrist_image)[:1]
        missing = [c for c in (*picked, self.wrist_image) if c is not None and c not in cams]
        if not picked or missing:
            raise KeyError(
                f"TorchRL's VLA policies read ('observation', 'image'): the batch has cameras "
                f"{cams}, the policy needs {list(missing) or 'one'} (make the env with cameras=)"
            )
        images = [td.get(schema.image_key(c)) for c in picked]
        out = td.clone(recurse=False)
        obs = td.get(schema.OBSERVATION).clone(recurse=False)
        obs.del_("image")
        obs.set("image", images[0] if len(images) == 1 else torch.cat(images, dim=-3))
        if self.wrist_image is not None:
            obs.set("wrist_image", td.get(schema.image_key(self.wrist_image)))
        if self.state_mean is not None and "state" in obs.keys():
            state = obs.get("state")
            obs.set(
                "state",
                (state - self.state_mean.to(state.device)) / self.state_std.to(state.device),
            )
        out.set(schema.OBSERVATION, obs)
        return out

    def token_distribution(self, td: TensorDictBase) -> torch.distributions.Distribution:
        """The policy's token distribution for the engine batch ``td`` (TorchRL's
        ``get_dist``), with grad."""
        return self.vla.get_dist(self.to_torchrl(td))

    # -- the engine's policy call ------------------------------------------------------------
    @torch.no_grad()
    def forward(self, td: TensorDictBase) -> TensorDict:
        x = self.to_torchrl(td)
        batch = td.batch_size
        if not self.token_head:
            key = self.vla.tensor_keys.action_chunk
            chunk = self._in_blocks(x, lambda b: self.vla(b).get(key))
            return TensorDict({schema.ACTION_CHUNK: chunk}, batch_size=batch)
        if self.sampling == "torchrl" and not self.deterministic:
            tokens, logp = self._sample_torchrl(x)
        else:
            logits = self._in_blocks(x, lambda b: _logits(self.vla.get_dist(b)))
            if self.deterministic:
                tokens = logits.argmax(-1)
            else:
                seeds = td.get(schema.SAMPLE_SEED)
                u = row_uniform(seeds, tuple(logits.shape[1:-1]), logits.device)
                tokens = sample_categorical(logits, u)
            # what TorchRL's get_dist(...).log_prob gives (a Categorical over each token)
            logp = torch.distributions.Categorical(logits=logits).log_prob(tokens)
        logp = logp.reshape(batch[0], -1).sum(-1).float()
        return TensorDict(
            {
                schema.ACTION_CHUNK: self.tokenizer.decode(tokens).float(),
                schema.ACTION_TOKENS: tokens,
                schema.SAMPLE_LOG_PROB: logp,
            },
            batch_size=batch,
        )

    def _in_blocks(self, x: TensorDictBase, fn) -> torch.Tensor:
        """``fn`` over ``x`` in batches of exactly ``fixed_batch`` rows; the rows of ``x``."""
        n, k = x.batch_size[0], self.fixed_batch
        if k is None:
            return fn(x)
        padded = x[torch.arange(-(-n // k) * k).clamp_(max=n - 1)]
        return torch.cat([fn(padded[lo : lo + k]) for lo in range(0, len(padded), k)])[:n]

    def _sample_torchrl(self, x: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._warned:
            warnings.warn(
                "TorchRLPolicy(sampling='torchrl'): the policy samples from torch's global RNG, "
                "so rollouts are not reproducible across schedules (use sampling='per_row')",
                stacklevel=3,
            )
            self._warned = True
        keys = self.vla.tensor_keys
        with set_interaction_type(InteractionType.RANDOM):
            out = self.vla(x)
        tokens, logp = out.get(keys.action_tokens, None), out.get(keys.log_probs, None)
        if tokens is None or logp is None:
            raise ValueError(
                "sampling='torchrl' needs a policy that writes tokens and log-probs "
                "(output_mode 'tokens' or 'both', return_log_probs=True)"
            )
        return tokens, logp


def _logits(dist: torch.distributions.Distribution) -> torch.Tensor:
    """``[B, H, A, V]`` logits of TorchRL's token distribution (``Categorical``, or
    ``Independent`` over one in ``log_probs_mode="sequence"``)."""
    base = dist.base_dist if isinstance(dist, torch.distributions.Independent) else dist
    return base.logits
