"""TinyVLA: the tutorial architecture (ViT patches + character-level text + state projection +
fusion transformer) with an OpenVLA-style token head or a pi0-style flow-matching head.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tensordict import TensorDictBase
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline import schema
from pipeline.policies.layers import (
    Encoder,
    FiLMTower,
    RowConv2d,
    RowLinear,
    RowPatchEmbed,
    SpatialSoftmax,
)
from pipeline.policies.sampling import row_normal, row_uniform, sample_categorical
from pipeline.runtime.spans import mark

NUM_BINS = 256
KEYPOINTS = 32  # channels of the keypoint vision tower, one token each
VISIONS = ("patches", "keypoints", "film")
# Top-level attributes that encode images and the instruction (perception_parameters).
PERCEPTION_MODULES = frozenset(
    {"patch_embed", "patch_pos", "tower", "stem", "keypoints", "keypoint_proj", "keypoint_id",
     "camera_embed", "vision", "char_embed", "text_pos", "text"}
)  # fmt: skip
RTC_MAX_GUIDANCE = 5.0  # the guidance weight's clip (beta in Black et al. 2025)


def action_tokens(chunk: torch.Tensor) -> torch.Tensor:
    """Continuous actions in [-1, 1] to the token head's bins (the inverse of its
    ``bin_centers``; exact for actions the token head produced)."""
    return ((chunk.clamp(-1, 1) + 1) * (NUM_BINS - 1) / 2).round().long()


def frozen_mask(td: TensorDictBase, horizon: int) -> torch.Tensor | None:
    """``[B, H]`` True where the chunk's action is frozen (lookahead's prefix), or None when
    the batch has no prefix."""
    n = td.get(schema.PREFIX_LEN, None)
    if n is None:
        return None
    return torch.arange(horizon, device=n.device) < n.reshape(-1, 1)


def rtc_weights(td: TensorDictBase, horizon: int) -> torch.Tensor:
    """Real-time chunking's soft mask ``[B, H]``: 1 on the frozen prefix (``i < d``), then
    decaying exponentially to 0 over the rest of the previous chunk's reach (``i < o``,
    ``o = prefix_overlap``), 0 beyond (Black et al. 2025, eq. 5)."""
    d = td[schema.PREFIX_LEN].reshape(-1, 1).float()
    o = td[schema.PREFIX_OVERLAP].reshape(-1, 1).float()
    i = torch.arange(horizon, device=d.device).float().unsqueeze(0)
    c = ((o - i) / (o - d + 1)).clamp(min=0)
    soft = c * torch.expm1(c) / (torch.e - 1)
    w = torch.where(i < d, torch.ones_like(soft), torch.where(i < o, soft, torch.zeros_like(soft)))
    return torch.where(d > 0, w, torch.zeros_like(w))


@dataclass(frozen=True)
class VLAConfig:
    image_size: int  # images are resized to this before patching
    patch: int
    dim: int
    heads: int
    vision_layers: int
    text_layers: int
    fusion_layers: int
    action_layers: int  # flow head's action expert
    text_len: int = 64


SIZES = {
    "tiny": VLAConfig(64, 8, 128, 4, 2, 1, 2, 2),
    "base": VLAConfig(224, 16, 768, 12, 6, 2, 6, 2),
}


class TinyVLA(nn.Module):
    """A small VLA that reads and writes the canonical TensorDict layout.

    Inputs: ``("observation","image",cam)`` uint8 ``[B,3,H,W]``, ``("observation","state")``,
    ``"language_instruction"`` and ``"sample_seed"`` (int64 ``[B]``). Outputs:
    ``("vla_action","chunk")`` ``[B,H,A]`` in [-1, 1]; the token head also writes
    ``("vla_action","tokens")`` ``[B,H,A]`` and ``"sample_log_prob"`` ``[B]``.

    Example:
        >>> policy = TinyVLA(state_dim=27, cameras=("head",), chunk_len=8, head="tokens")
        >>> td = policy(td)          # td: TensorDict [B] in the canonical layout
        >>> td["vla_action", "chunk"].shape
        torch.Size([B, 8, 7])

    Lookahead (``RolloutEngine(..., lookahead=d)``): built with ``prefix_conditioning=True``
    it conditions on the frozen prefix of each chunk. The token head adds an embedding of
    each frozen action to its first ``d`` queries (a learned "free" embedding to the others),
    sets those tokens to the frozen ones, and ``sample_log_prob`` covers the sampled tokens
    only; it must be trained with random delays to use the prefix (``behaviour_clone(...,
    max_delay=...)``). The flow head inpaints the prefix by guidance, as real-time chunking
    does (soft mask, guidance weight clipped at 5), and keeps the frozen actions exactly.
    With ``flow_sigma > 0`` its last denoising step is Gaussian, so it has a
    ``sample_log_prob`` over the sampled actions that ``log_prob`` recomputes from the
    recorded data (the noise start comes from ``sample_seed``).

    Batch-invariant on CPU with the token head at one intra-op thread: a row's outputs are
    bitwise the same in any batch (tested over random batch compositions, with MKL's
    AVX-512 and AVX2 kernels), so dynamic batching and any stage split reproduce synchronous
    rollouts exactly; ``RolloutEngine(..., inference_threads=1)`` gives that. Every GEMM is
    per batch element (:func:`row_linear`), which costs the base size 8-16% against torch's
    fused layers. With more threads MKL may split a one-row batch's GEMMs differently (seen
    on AVX2). Not the flow head (its action expert is torch's decoder layer: equal to float
    rounding), and not claimed on CUDA, where cuBLAS may choose its algorithm by batch size.

    Args:
        state_dim: width of ``("observation","state")``; a batch of another width raises
            ``ValueError`` in ``forward``.
        action_dim: ``A``, the action size of each step of a chunk.
        cameras: the camera names it reads (kept sorted); a batch must hold exactly these
            images, else ``forward`` raises ``ValueError``.
        chunk_len: ``H``, the actions per chunk.
        head: ``"tokens"`` (OpenVLA-style, 256 bins per action) or ``"flow"`` (pi0-style).
        size: a key of ``SIZES``: ``"tiny"`` or ``"base"``.
        temperature: the token head samples from ``softmax(logits / temperature)``.
        flow_steps: the flow head's Euler denoising steps.
        deterministic: argmax tokens, or denoising from zero noise with no Gaussian last
            step; then ``sample_seed`` is not needed (a stochastic policy raises without it).
        prefix_conditioning: condition on lookahead's frozen prefix (see Lookahead above).
        flow_sigma: standard deviation of the flow head's Gaussian last step; 0: none (the
            chunk is the clamped mean, with no ``sample_log_prob``).
        vision: ``"patches"`` (ViT patch tokens), ``"keypoints"`` (a conv stem whose 32
            channels become keypoints by a spatial softmax, one token each) or ``"film"``
            (:class:`~pipeline.policies.layers.FiLMTower`: a conv tower conditioned on the
            instruction, read out as a scene token and a token per cell of an 8x8 grid;
            the one that learns where the named object is from pixels, docs/training.md).

    Raises:
        ValueError: ``head``, ``size`` or ``vision`` is not one of the above, ``temperature <= 0``,
            ``chunk_len < 1``, ``flow_steps < 1``, or ``flow_sigma`` is not ``>= 0``.
    """

    def __init__(
        self,
        state_dim: int,
        action_dim: int = 7,
        cameras: tuple[str, ...] = ("head",),
        chunk_len: int = 8,
        head: str = "tokens",
        size: str = "tiny",
        temperature: float = 1.6,
        flow_steps: int = 10,
        deterministic: bool = False,
        prefix_conditioning: bool = False,
        flow_sigma: float = 0.0,
        vision: str = "patches",
    ) -> None:
        super().__init__()
        if head not in ("tokens", "flow"):
            raise ValueError(f"head={head!r}: choose 'tokens' or 'flow'")
        if size not in SIZES:
            raise ValueError(f"size={size!r}: choose from {sorted(SIZES)}")
        if vision not in VISIONS:
            raise ValueError(f"vision={vision!r}: choose from {VISIONS}")
        if temperature <= 0 or chunk_len < 1 or flow_steps < 1 or not flow_sigma >= 0:
            raise ValueError(
                "temperature must be > 0, flow_sigma >= 0; chunk_len and flow_steps >= 1"
            )
        cfg = self.cfg = SIZES[size]
        self.state_dim, self.action_dim, self.chunk_len = state_dim, action_dim, chunk_len
        self.cameras = tuple(sorted(cameras))
        self.head, self.size, self.vision_kind = head, size, vision
        self.temperature, self.flow_steps, self.deterministic = (
            temperature,
            flow_steps,
            deterministic,
        )
        self.conditions_on_prefix, self.flow_sigma = prefix_conditioning, float(flow_sigma)
        d = cfg.dim
        n_patches = (cfg.image_size // cfg.patch) ** 2

        # Vision: one shared tower for every camera, plus a learned embedding per camera.
        if vision == "patches":  # ViT: one token per patch
            self.patch_embed = RowPatchEmbed(3, d, cfg.patch, cfg.patch)
            self.patch_pos = nn.Parameter(torch.randn(1, n_patches, d) * 0.02)
        elif vision == "film":  # a conv tower that reads the instruction (layers.py)
            self.tower = FiLMTower(d, d, cfg.image_size)
            self.scene_to_queries = RowLinear(d, d)
        else:  # a conv stem at half resolution, one token per keypoint
            c = KEYPOINTS
            self.stem = nn.Sequential(
                RowConv2d(3, c, 5, stride=2, padding=2),
                nn.GELU(),
                RowConv2d(c, c, 3, padding=1),
                nn.GELU(),
                RowConv2d(c, c, 3, padding=1),
                nn.GELU(),
                RowConv2d(c, c, 1),
            )
            self.keypoints = SpatialSoftmax()
            self.keypoint_proj = RowLinear(2, d)
            self.keypoint_id = nn.Parameter(torch.randn(1, c, d) * 0.02)
        self.camera_embed = nn.Parameter(torch.randn(max(1, len(self.cameras)), 1, d) * 0.02)
        self.vision = Encoder(d, cfg.heads, cfg.vision_layers)
        # Language: characters -> embeddings -> transformer.
        self.char_embed = nn.Embedding(128, d, padding_idx=0)
        self.text_pos = nn.Parameter(torch.randn(1, cfg.text_len, d) * 0.02)
        self.text = Encoder(d, cfg.heads, cfg.text_layers)
        # Body sense: one token from the proprioceptive state.
        self.state_proj = nn.Sequential(RowLinear(state_dim, d), nn.GELU(), RowLinear(d, d))
        # Fusion over [vision | text | state] (+ H action queries for the token head).
        self.fusion = Encoder(d, cfg.heads, cfg.fusion_layers)
        self.norm = nn.LayerNorm(d)
        if head == "tokens":
            self.queries = nn.Parameter(torch.randn(1, chunk_len, d) * 0.02)
            self.token_head = RowLinear(d, action_dim * NUM_BINS)
            if prefix_conditioning:  # one embedding per (action dim, bin), summed over dims
                self.prefix_embed = nn.Embedding(action_dim * NUM_BINS, d)
                nn.init.normal_(self.prefix_embed.weight, std=0.02)
                self.free_embed = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        else:
            self.action_in = RowLinear(action_dim + 1, d)
            layer = nn.TransformerDecoderLayer(
                d, cfg.heads, 4 * d, 0.0, "gelu", batch_first=True, norm_first=True
            )
            self.action_expert = nn.TransformerDecoder(layer, cfg.action_layers)
            self.velocity_out = RowLinear(d, action_dim)
        self.register_buffer("bin_centers", torch.linspace(-1, 1, NUM_BINS), persistent=False)
        self._char_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_spec(cls, spec, **kwargs) -> TinyVLA:
        """Build a policy for an :class:`envs.EnvSpec` (state size, action size, cameras)."""
        return cls(
            state_dim=spec.state_dim, action_dim=spec.action_dim, cameras=spec.cameras, **kwargs
        )

    # -- encoders ----------------------------------------------------------------------------
    def _chars(self, texts: list[str], device) -> torch.Tensor:
        rows = []
        for t in texts:
            ids = self._char_cache.get(t)
            if ids is None:
                codes = [min(ord(c), 127) for c in t.lower()[: self.cfg.text_len]]
                ids = torch.zeros(self.cfg.text_len, dtype=torch.long)
                ids[: len(codes)] = torch.tensor(codes, dtype=torch.long)
                self._char_cache[t] = ids
            rows.append(ids)
        return torch.stack(rows).to(device, non_blocking=True)

    def _vision_tokens(
        self, td: TensorDictBase, text: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Each camera's tokens, and (``vision="film"``) the sum of the cameras' scene tokens
        as they leave the tower; ``text`` ``[B, d]`` (the pooled instruction) conditions the
        FiLM tower."""
        present = schema.cameras_of(td)
        if present != list(self.cameras):
            raise ValueError(
                f"TinyVLA was built for cameras {list(self.cameras)}, td has {present}"
            )
        out, scene = [], None
        for i, cam in enumerate(self.cameras):
            img = td[schema.image_key(cam)]
            if img.dtype != torch.uint8 or img.ndim != 4 or img.shape[1] != 3:
                raise ValueError(
                    f"image {cam!r} must be uint8 [B,3,H,W], got {img.dtype}{list(img.shape)}"
                )
            x = img.to(self.camera_embed.dtype).div_(255.0)
            if x.shape[-1] != self.cfg.image_size or x.shape[-2] != self.cfg.image_size:
                x = F.interpolate(x, size=self.cfg.image_size, mode="bilinear", align_corners=False)
            if self.vision_kind == "patches":
                p = self.patch_embed(x) + self.patch_pos
            elif self.vision_kind == "film":
                p = self.tower(x, text)
                scene = p[:, 0] if scene is None else scene + p[:, 0]
            else:
                p = self.keypoint_proj(self.keypoints(self.stem(x))) + self.keypoint_id
            out.append(self.vision(p) + self.camera_embed[i])
        return out, scene

    def _context(self, td: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fusion's context tokens, and the scene summary of :meth:`_vision_tokens`."""
        state = td[schema.STATE]
        if state.shape[-1] != self.state_dim:
            raise ValueError(f"state has {state.shape[-1]} dims, TinyVLA expects {self.state_dim}")
        chars = self._chars(schema.instructions(td), state.device)
        text = self.text(self.char_embed(chars) + self.text_pos, pad=chars == 0)
        words = (chars != 0).unsqueeze(-1)
        text = text.masked_fill(~words, 0.0)
        pooled = text.sum(1) / words.sum(1).clamp_min(1)
        vision, scene = self._vision_tokens(td, pooled)
        tokens = [*vision, text, self.state_proj(state.float()).unsqueeze(1)]
        return torch.cat(tokens, dim=1), scene

    def perception_parameters(self) -> list[nn.Parameter]:
        """The vision tower's and the instruction encoder's parameters: what turns pixels and
        text into tokens, as opposed to the fusion, the state projection and the action head.
        RL fine-tuning can hold them fixed (the trainer's ``--freeze-perception``).

        Example:
            >>> for p in policy.perception_parameters():
            ...     p.requires_grad_(False)
        """
        return [
            p for name, p in self.named_parameters() if name.split(".", 1)[0] in PERCEPTION_MODULES
        ]

    # -- heads -------------------------------------------------------------------------------
    def query_features(self, td: TensorDictBase) -> torch.Tensor:
        """The token head's input ``[B, H, d]``: the action queries after fusion with the
        images, the instruction and the state (what an auxiliary training loss reads).

        Example:
            >>> feats = policy.query_features(td)       # [B, chunk_len, dim]
        """
        if self.head != "tokens":
            raise RuntimeError("query_features() needs head='tokens'")
        ctx, scene = self._context(td)
        queries = self._queries(td, ctx.shape[0])
        if scene is not None:
            # The scene token straight into every query: read through attention alone, one
            # token among a hundred starts diluted a hundredfold, and cloning from a few
            # thousand frames never undid that (docs/training.md).
            queries = queries + self.scene_to_queries(scene).unsqueeze(1)
        fused = self.fusion(torch.cat([ctx, queries], dim=1))
        return self.norm(fused[:, -self.chunk_len :])

    def action_logits(
        self, td: TensorDictBase, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token-head logits ``[B, H, A, 256]`` (before temperature); ``features`` from
        :meth:`query_features` when the caller has them already."""
        q = self.query_features(td) if features is None else features
        return self.token_head(q).view(q.shape[0], self.chunk_len, self.action_dim, NUM_BINS)

    def _queries(self, td: TensorDictBase, b: int) -> torch.Tensor:
        """The action queries; with prefix conditioning, the frozen actions' embeddings on
        the first ``d`` of them and the "free" embedding on the others."""
        q = self.queries.expand(b, -1, -1)
        if not self.conditions_on_prefix:
            return q
        frozen = frozen_mask(td, self.chunk_len)
        if frozen is None:
            return q + self.free_embed
        dims = torch.arange(self.action_dim, device=q.device) * NUM_BINS
        emb = self.prefix_embed(action_tokens(td[schema.ACTION_PREFIX]) + dims).sum(-2)
        return q + torch.where(frozen.unsqueeze(-1), emb.to(q.dtype), self.free_embed)

    def sampled_mask(self, td: TensorDictBase) -> torch.Tensor | None:
        """``[B, H]`` True where the chunk's action is the policy's (not a frozen prefix), or
        None when every action is; a policy that ignores the prefix samples them all."""
        if not self.conditions_on_prefix:
            return None
        frozen = frozen_mask(td, self.chunk_len)
        return None if frozen is None else ~frozen

    def token_log_probs(self, td: TensorDictBase, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token log-probabilities ``[B, H, A]`` of ``tokens`` under the sampling
        distribution (``softmax(logits / temperature)``), for token-level PPO/GRPO."""
        logp = torch.log_softmax(self.action_logits(td).float() / self.temperature, dim=-1)
        return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    def log_prob(self, td: TensorDictBase, actions: torch.Tensor) -> torch.Tensor:
        """Per-row log-probability ``[B]`` of a chunk: the token head's ``tokens`` summed, or
        the flow head's ``chunk`` under its Gaussian last step. What the engine records as
        ``sample_log_prob``: with a frozen prefix, only the sampled actions count.

        Example:
            >>> logp = policy.log_prob(batch, batch["vla_action", "tokens"])
        """
        sampled = self.sampled_mask(td)
        if self.head == "flow":
            return self._flow_log_prob(td, actions, sampled)
        per = self.token_log_probs(td, actions)
        if sampled is not None:
            per = per * sampled.unsqueeze(-1)
        return per.sum(dim=(1, 2))

    def _seeds(self, td: TensorDictBase) -> torch.Tensor:
        seeds = td.get(schema.SAMPLE_SEED, None)
        if seeds is None:
            if not self.deterministic:
                raise ValueError("a stochastic policy needs 'sample_seed' (int64 [B]) in the td")
            return torch.zeros(td.batch_size[0], dtype=torch.long)
        return seeds.reshape(-1).to("cpu", torch.long)

    @torch.no_grad()
    def forward(self, td: TensorDictBase) -> TensorDictBase:
        if self.head == "tokens":
            logits = self.action_logits(td).float() / self.temperature
            mark("sample")
            if self.deterministic:
                tokens = logits.argmax(-1)
            else:
                u = row_uniform(self._seeds(td), (self.chunk_len, self.action_dim), logits.device)
                tokens = sample_categorical(logits, u)
            sampled = self.sampled_mask(td)
            if sampled is not None:  # the frozen prefix stands, and is not the policy's draw
                frozen = action_tokens(td[schema.ACTION_PREFIX].to(tokens.device))
                tokens = torch.where(sampled.unsqueeze(-1), tokens, frozen)
            logp = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            if sampled is not None:
                logp = logp * sampled.unsqueeze(-1)
            td.set(schema.ACTION_TOKENS, tokens)
            td.set(schema.SAMPLE_LOG_PROB, logp.sum(dim=(1, 2)))
            td.set(schema.ACTION_CHUNK, self.bin_centers[tokens])
            return td
        mark("sample")  # the flow head samples by denoising: all of it is sampling
        with self._flow_numerics(td, recompute=False):
            mean = self._flow_mean(td, self.norm(self.fusion(self._context(td)[0]))).detach()
        sampled = self.sampled_mask(td)
        if self.flow_sigma > 0 and not self.deterministic:
            eps = row_normal(self._seeds(td), mean.shape[1:], mean.device, stream=1)
            x = mean + self.flow_sigma * eps
            td.set(schema.SAMPLE_LOG_PROB, self._gaussian_log_prob(x, mean, sampled))
        else:
            x = mean.clamp(-1.0, 1.0)
        if sampled is not None:  # the frozen prefix stands exactly
            x = torch.where(sampled.unsqueeze(-1), x, td[schema.ACTION_PREFIX].to(x))
        td.set(schema.ACTION_CHUNK, x)
        return td

    # -- the flow head's denoising ------------------------------------------------------------
    def _velocity(self, x: torch.Tensor, tau: float, ctx: torch.Tensor) -> torch.Tensor:
        t = torch.full((*x.shape[:2], 1), tau, device=x.device, dtype=x.dtype)
        return self.velocity_out(self.action_expert(self.action_in(torch.cat([x, t], -1)), ctx))

    def _guided_velocity(
        self, x: torch.Tensor, tau: float, ctx: torch.Tensor, target: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        """The velocity plus real-time chunking's inpainting guidance: a vector-Jacobian
        product that pulls the predicted final chunk towards the previous chunk where the
        soft mask ``w`` says so, weighted by ``min(beta, (1 - tau) / (tau * r^2))``."""
        keep_graph = torch.is_grad_enabled()  # log_prob under autograd: differentiate it too
        with torch.enable_grad():
            xg = x if x.requires_grad else x.detach().requires_grad_(True)
            v = self._velocity(xg, tau, ctx)
            final = xg + (1.0 - tau) * v  # the chunk this step predicts
            err = ((target - final) * w.unsqueeze(-1)).detach()
            (g,) = torch.autograd.grad((err * final).sum(), xg, create_graph=keep_graph)
        if not keep_graph:
            v = v.detach()
        r2 = (1.0 - tau) ** 2 / (tau**2 + (1.0 - tau) ** 2)
        beta = RTC_MAX_GUIDANCE if tau == 0 else min(RTC_MAX_GUIDANCE, (1 - tau) / (tau * r2))
        return v + beta * g

    def _flow_mean(self, td: TensorDictBase, ctx: torch.Tensor) -> torch.Tensor:
        """Euler integration of the (guided) velocity field from the row's noise; with
        ``flow_sigma > 0`` this is the mean of the Gaussian last step."""
        b, shape = ctx.shape[0], (self.chunk_len, self.action_dim)
        if self.deterministic:
            x = torch.zeros((b, *shape), device=ctx.device)
        else:
            x = row_normal(self._seeds(td), shape, ctx.device)
        guide = None
        if self.conditions_on_prefix and frozen_mask(td, self.chunk_len) is not None:
            w = rtc_weights(td, self.chunk_len).to(ctx.device)
            if bool((w > 0).any()):
                guide = (td[schema.ACTION_PREFIX].to(ctx.device, x.dtype), w)
        dt = 1.0 / self.flow_steps
        for k in range(self.flow_steps):
            tau = k * dt
            if guide is None:
                v = self._velocity(x, tau, ctx)
            else:
                v = self._guided_velocity(x, tau, ctx, *guide)
            x = x + dt * v
        return x

    def _gaussian_log_prob(
        self, x: torch.Tensor, mean: torch.Tensor, sampled: torch.Tensor | None
    ) -> torch.Tensor:
        z = (x - mean) / self.flow_sigma
        per = -0.5 * z.square() - math.log(self.flow_sigma) - 0.5 * math.log(2 * math.pi)
        if sampled is not None:
            per = per * sampled.unsqueeze(-1)
        return per.sum(dim=(1, 2))

    def _flow_log_prob(
        self, td: TensorDictBase, chunk: torch.Tensor, sampled: torch.Tensor | None
    ) -> torch.Tensor:
        if self.flow_sigma <= 0 or self.deterministic:
            raise RuntimeError("the flow head has a log-prob only with flow_sigma > 0, stochastic")
        with self._flow_numerics(td, recompute=True):
            ctx = self.norm(self.fusion(self._context(td)[0]))
            mean = self._flow_mean(td, ctx)
        return self._gaussian_log_prob(chunk.to(ctx), mean, sampled)

    def _flow_numerics(self, td: TensorDictBase, recompute: bool):
        """With prefix guidance, sampling and ``log_prob`` run the same kernels: guidance
        amplifies any rounding difference between them (an untrained network's Jacobian can
        be large), and differentiating it needs attention's double backward, which only the
        math kernel has on CPU. So both use the math kernel and torch's regular (not the
        inference fast-path) attention, which autograd mode would otherwise switch."""
        if not (self.conditions_on_prefix and frozen_mask(td, self.chunk_len) is not None):
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if not recompute:
            stack.enter_context(torch.enable_grad())
        return stack
