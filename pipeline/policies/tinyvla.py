"""TinyVLA: the tutorial architecture (ViT patches + character-level text + state projection +
fusion transformer) with an OpenVLA-style token head or a pi0-style flow-matching head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tensordict import TensorDictBase
from torch import nn

from pipeline import schema
from pipeline.policies.sampling import row_normal, row_uniform, sample_categorical
from pipeline.profiler.spans import mark

NUM_BINS = 256


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


def _encoder(dim: int, heads: int, layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class RowLinear(nn.Linear):
    """``nn.Linear`` that computes each batch element (dim 0) on its own.

    A ``[B * n, in] @ [in, out]`` GEMM picks its CPU kernel by ``B * n``, and a row's result
    then differs in the last bits with the batch it came in (measured on TinyVLA:
    ``sample_log_prob`` moved by up to 1.5e-5). A batched matmul gives every element the
    same ``[n, in] @ [in, out]`` product in any batch, which is what lets dynamic batching
    match synchronous rollouts bit for bit. The parameters are ``nn.Linear``'s, so
    checkpoints load either way.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            return super().forward(x)
        b = x.shape[0]
        rows = x.reshape(b, -1, self.in_features)
        w = self.weight.t().unsqueeze(0).expand(b, -1, -1)
        if self.bias is None:
            y = torch.bmm(rows, w)
        else:
            y = torch.baddbmm(self.bias.view(1, 1, -1).expand(b, 1, -1), rows, w)
        return y.reshape(*x.shape[:-1], self.out_features)


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

    Batch-invariant on CPU with the token head: a row's outputs are bitwise the same in any
    batch (tested over random batch compositions), so dynamic batching reproduces
    synchronous rollouts exactly. Not the flow head (its action expert is torch's decoder
    layer, whose GEMMs over batch x chunk rows pick kernels by batch size: equal to float
    rounding), and not claimed on CUDA, where cuBLAS may choose its algorithm by batch size.
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
    ) -> None:
        super().__init__()
        if head not in ("tokens", "flow"):
            raise ValueError(f"head={head!r}: choose 'tokens' or 'flow'")
        if size not in SIZES:
            raise ValueError(f"size={size!r}: choose from {sorted(SIZES)}")
        if temperature <= 0 or chunk_len < 1 or flow_steps < 1:
            raise ValueError("temperature must be > 0; chunk_len and flow_steps >= 1")
        cfg = self.cfg = SIZES[size]
        self.state_dim, self.action_dim, self.chunk_len = state_dim, action_dim, chunk_len
        self.cameras = tuple(sorted(cameras))
        self.head, self.size = head, size
        self.temperature, self.flow_steps, self.deterministic = (
            temperature,
            flow_steps,
            deterministic,
        )
        d = cfg.dim
        n_patches = (cfg.image_size // cfg.patch) ** 2

        # Vision: one shared ViT patch encoder, plus a learned embedding per camera.
        self.patch_embed = nn.Conv2d(3, d, cfg.patch, cfg.patch)
        self.patch_pos = nn.Parameter(torch.randn(1, n_patches, d) * 0.02)
        self.camera_embed = nn.Parameter(torch.randn(max(1, len(self.cameras)), 1, d) * 0.02)
        self.vision = _encoder(d, cfg.heads, cfg.vision_layers)
        # Language: characters -> embeddings -> transformer.
        self.char_embed = nn.Embedding(128, d, padding_idx=0)
        self.text_pos = nn.Parameter(torch.randn(1, cfg.text_len, d) * 0.02)
        self.text = _encoder(d, cfg.heads, cfg.text_layers)
        # Body sense: one token from the proprioceptive state.
        self.state_proj = nn.Sequential(RowLinear(state_dim, d), nn.GELU(), RowLinear(d, d))
        # Fusion over [vision | text | state] (+ H action queries for the token head).
        self.fusion = _encoder(d, cfg.heads, cfg.fusion_layers)
        self.norm = nn.LayerNorm(d)
        if head == "tokens":
            self.queries = nn.Parameter(torch.randn(1, chunk_len, d) * 0.02)
            self.token_head = RowLinear(d, action_dim * NUM_BINS)
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

    def _vision_tokens(self, td: TensorDictBase) -> list[torch.Tensor]:
        present = schema.cameras_of(td)
        if present != list(self.cameras):
            raise ValueError(
                f"TinyVLA was built for cameras {list(self.cameras)}, td has {present}"
            )
        out = []
        for i, cam in enumerate(self.cameras):
            img = td[schema.image_key(cam)]
            if img.dtype != torch.uint8 or img.ndim != 4 or img.shape[1] != 3:
                raise ValueError(
                    f"image {cam!r} must be uint8 [B,3,H,W], got {img.dtype}{list(img.shape)}"
                )
            x = img.to(self.patch_pos.dtype).div_(255.0)
            if x.shape[-1] != self.cfg.image_size or x.shape[-2] != self.cfg.image_size:
                x = F.interpolate(x, size=self.cfg.image_size, mode="bilinear", align_corners=False)
            p = self.patch_embed(x).flatten(2).transpose(1, 2) + self.patch_pos
            out.append(self.vision(p) + self.camera_embed[i])
        return out

    def _context(self, td: TensorDictBase) -> torch.Tensor:
        state = td[schema.STATE]
        if state.shape[-1] != self.state_dim:
            raise ValueError(f"state has {state.shape[-1]} dims, TinyVLA expects {self.state_dim}")
        chars = self._chars(schema.instructions(td), state.device)
        text = self.text(self.char_embed(chars) + self.text_pos, src_key_padding_mask=chars == 0)
        text = text.masked_fill((chars == 0).unsqueeze(-1), 0.0)
        tokens = [*self._vision_tokens(td), text, self.state_proj(state.float()).unsqueeze(1)]
        return torch.cat(tokens, dim=1)

    # -- heads -------------------------------------------------------------------------------
    def action_logits(self, td: TensorDictBase) -> torch.Tensor:
        """Token-head logits ``[B, H, A, 256]`` (before temperature)."""
        if self.head != "tokens":
            raise RuntimeError("action_logits() needs head='tokens'")
        ctx = self._context(td)
        b = ctx.shape[0]
        fused = self.fusion(torch.cat([ctx, self.queries.expand(b, -1, -1)], dim=1))
        q = self.norm(fused[:, -self.chunk_len :])
        return self.token_head(q).view(b, self.chunk_len, self.action_dim, NUM_BINS)

    def token_log_probs(self, td: TensorDictBase, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token log-probabilities ``[B, H, A]`` of ``tokens`` under the sampling
        distribution (``softmax(logits / temperature)``), for token-level PPO/GRPO."""
        logp = torch.log_softmax(self.action_logits(td).float() / self.temperature, dim=-1)
        return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    def log_prob(self, td: TensorDictBase, tokens: torch.Tensor) -> torch.Tensor:
        """Per-row log-probability ``[B]`` of ``tokens`` (the chunk's tokens summed): what
        the engine records as ``sample_log_prob``."""
        return self.token_log_probs(td, tokens).sum(dim=(1, 2))

    def _seeds(self, td: TensorDictBase) -> torch.Tensor:
        seeds = td.get(schema.SAMPLE_SEED, None)
        if seeds is None:
            if not self.deterministic:
                raise ValueError("a stochastic policy needs 'sample_seed' (int64 [B]) in the td")
            return torch.zeros(td.batch_size[0], dtype=torch.long)
        return seeds.reshape(-1).to("cpu", torch.long)

    @torch.no_grad()
    def forward(self, td: TensorDictBase) -> TensorDictBase:
        b = td.batch_size[0]
        if self.head == "tokens":
            logits = self.action_logits(td).float() / self.temperature
            mark("sample")
            if self.deterministic:
                tokens = logits.argmax(-1)
            else:
                u = row_uniform(self._seeds(td), (self.chunk_len, self.action_dim), logits.device)
                tokens = sample_categorical(logits, u)
            logp = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            td.set(schema.ACTION_TOKENS, tokens)
            td.set(schema.SAMPLE_LOG_PROB, logp.sum(dim=(1, 2)))
            td.set(schema.ACTION_CHUNK, self.bin_centers[tokens])
            return td
        ctx = self._context(td)
        ctx = self.norm(self.fusion(ctx))
        shape = (self.chunk_len, self.action_dim)
        mark("sample")  # the flow head samples by denoising: all of it is sampling
        if self.deterministic:
            x = torch.zeros((b, *shape), device=ctx.device)
        else:
            x = row_normal(self._seeds(td), shape, ctx.device)
        dt = 1.0 / self.flow_steps
        for k in range(self.flow_steps):  # Euler integration of the learned velocity field
            t = torch.full((b, self.chunk_len, 1), k * dt, device=ctx.device)
            h = self.action_expert(self.action_in(torch.cat([x, t], -1)), ctx)
            x = x + dt * self.velocity_out(h)
        td.set(schema.ACTION_CHUNK, x.clamp(-1.0, 1.0))
        return td
