"""Batch-invariant layers: each batch element computed on its own, so that a row's output
never depends on the rest of its batch (what lets dynamic batching match synchronous
rollouts bit for bit). The parameters are torch's own layers', so checkpoints load either way.

Training needs no batch invariance, and the row-by-row kernels cost it 1.6-2x the time of
torch's batched ones: :func:`batched_kernels` switches a model to those for a block.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` computed for each batch element (dim 0) on its own.

    A ``[B * n, in] @ [in, out]`` GEMM picks its CPU kernel by ``B * n``, and a row's result
    then differs in the last bits with the batch it came in. Measured on TinyVLA with torch's
    own layers: ``sample_log_prob`` moved by up to 1.5e-5, on AVX-512 in the small state
    projection, on AVX2 (``MKL_ENABLE_INSTRUCTIONS=AVX2``) in the transformer layers too,
    enough to flip a sampled token now and then. A batched matmul gives every element the
    same ``[n, in] @ [in, out]`` product in any batch, which is what lets dynamic batching
    match synchronous rollouts bit for bit.
    """
    if x.dim() < 2:
        return F.linear(x, weight, bias)
    b = x.shape[0]
    rows = x.reshape(b, -1, x.shape[-1])
    w = weight.t().unsqueeze(0).expand(b, -1, -1)
    if bias is None:
        y = torch.bmm(rows, w)
    else:
        y = torch.baddbmm(bias.view(1, 1, -1).expand(b, 1, -1), rows, w)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class BatchInvariant:
    """A layer that computes each row on its own while ``batch_invariant`` holds (the
    default), and with torch's batched kernels inside :func:`batched_kernels`."""

    batch_invariant: bool = True

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return row_linear(x, weight, bias) if self.batch_invariant else F.linear(x, weight, bias)


@contextlib.contextmanager
def batched_kernels(model: nn.Module) -> Iterator[None]:
    """torch's batched kernels in ``model``'s batch-invariant layers for the block, for
    training: forward and backward took 0.5-0.6 of the time (TinyVLA with the FiLM tower,
    256 rows, one CPU thread: 5.5-7.1 s against 11.4-11.7 s). A row's output then depends on its
    batch in the last bits (a token's log-probability by up to 4e-5), which a gradient step
    does not need; rollouts must not run inside it. Another copy of the model (an overlapped
    rollout's) is left alone.

    Example:
        >>> with batched_kernels(policy):
        ...     loss = policy.token_log_probs(batch, tokens).sum()
        ...     loss.backward()
    """
    layers = [m for m in model.modules() if isinstance(m, BatchInvariant)]
    before = [m.batch_invariant for m in layers]
    for m in layers:
        m.batch_invariant = False
    try:
        yield
    finally:
        for m, b in zip(layers, before, strict=True):
            m.batch_invariant = b


class RowLinear(BatchInvariant, nn.Linear):
    """``nn.Linear`` computed by :func:`row_linear`; the parameters are ``nn.Linear``'s, so
    checkpoints load either way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.weight, self.bias)


class RowPatchEmbed(BatchInvariant, nn.Conv2d):
    """ViT's patch embedding (a conv whose stride is its kernel) as :func:`row_linear` over
    each image's patches: a conv picks its algorithm by batch size too. The parameters are
    ``nn.Conv2d``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), dim]``, patches row-major."""
        b, c, h, w = x.shape
        p = self.kernel_size[0]
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        patches = x.reshape(b, (h // p) * (w // p), c * p * p)
        return self.linear(patches, self.weight.view(self.out_channels, -1), self.bias)


class RowConv2d(BatchInvariant, nn.Conv2d):
    """``nn.Conv2d`` as :func:`row_linear` over each image's unfolded windows (a conv picks
    its algorithm by batch size, as a GEMM does). Zero padding, no groups or dilation. The
    parameters are ``nn.Conv2d``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, out, H', W']``."""
        if self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros":
            raise NotImplementedError("RowConv2d: zero padding, groups=1, dilation=1 only")
        if not self.batch_invariant:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        b, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        cols = F.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw))  # [B, C*kh*kw, L]
        y = row_linear(cols.transpose(1, 2), self.weight.view(self.out_channels, -1), self.bias)
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        return y.transpose(1, 2).reshape(b, self.out_channels, oh, ow)


def pixel_grid(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """``[2, H, W]``: each pixel's ``x`` and ``y`` in ``[-1, 1]``, in ``like``'s dtype and
    device."""
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, h, dtype=like.dtype, device=like.device),
        torch.linspace(-1, 1, w, dtype=like.dtype, device=like.device),
        indexing="ij",
    )
    return torch.stack([xs, ys])


class RowGroupNorm(BatchInvariant, nn.GroupNorm):
    """``nn.GroupNorm`` computed per image from plain reductions: torch's kernel gave a row
    other bits in a batch than alone (measured on the FiLM tower's conv outputs, 1e-6). The
    parameters are ``nn.GroupNorm``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_invariant:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        b, c = x.shape[:2]
        g = x.reshape(b, self.num_groups, -1)
        mean = g.mean(-1, keepdim=True)
        var = (g - mean).square().mean(-1, keepdim=True)
        y = ((g - mean) / torch.sqrt(var + self.eps)).reshape(x.shape)
        shape = (1, c) + (1,) * (x.dim() - 2)
        return y * self.weight.view(shape) + self.bias.view(shape)


def with_coordinates(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` -> ``[B, 5, H, W]``: each pixel's ``x`` and ``y`` in ``[-1, 1]`` as
    two more channels (CoordConv, Liu et al. 2018)."""
    b, _, h, w = images.shape
    return torch.cat([images, pixel_grid(h, w, images).expand(b, 2, h, w)], dim=1)


class FiLMTower(nn.Module):
    """A conv tower conditioned on the instruction (FiLM, Perez et al. 2018; as RT-1's
    FiLM-EfficientNet): three stride-2 convs over the image and its pixel coordinates, each
    layer's channels scaled and shifted by a linear map of the pooled instruction. The 8x8
    feature map becomes one *scene* token (an MLP over all of it: where things are, as
    values) and one token per cell.

    Why: from a few thousand frames, a patch ViT or a conv tower read out by attention did
    not learn where the named cube is (held-out error at chance after 1,000 steps), while
    this one did (docs/training.md). The FiLM maps start at zero, so the tower starts as a
    plain conv net and learns to listen. Batch-invariant (:class:`RowConv2d`,
    :class:`RowLinear`).

    Example:
        >>> tower = FiLMTower(text_dim=128, dim=128, image_size=64)
        >>> tokens = tower(images, text)        # [B, 1 + 64, 128]
    """

    CHANNELS = (32, 64, 64)

    def __init__(self, text_dim: int, dim: int, image_size: int) -> None:
        super().__init__()
        c1, c2, c3 = self.CHANNELS
        self.convs = nn.ModuleList(
            [
                RowConv2d(5, c1, 5, stride=2, padding=2),
                RowConv2d(c1, c2, 3, stride=2, padding=1),
                RowConv2d(c2, c3, 3, stride=2, padding=1),
            ]
        )
        # Per-image normalisation (GroupNorm, not BatchNorm: a row must not see its batch)
        # keeps the signal from shrinking layer by layer, as torch's default init does, to
        # where a readout several layers on cannot find it.
        self.norms = nn.ModuleList([RowGroupNorm(8, c) for c in self.CHANNELS])
        self.films = nn.ModuleList([RowLinear(text_dim, 2 * c) for c in self.CHANNELS])
        for film in self.films:
            nn.init.zeros_(film.weight)
            nn.init.zeros_(film.bias)
        cells = (image_size // 8) ** 2
        self.scene = nn.Sequential(
            nn.LayerNorm(c3 * cells), RowLinear(c3 * cells, dim), nn.GELU(), RowLinear(dim, dim)
        )
        self.cell = RowLinear(c3, dim)
        self.cell_pos = nn.Parameter(torch.randn(1, cells, dim) * 0.02)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` and ``[B, text_dim]`` -> ``[B, 1 + cells, dim]``."""
        h = with_coordinates(images)
        for conv, norm, film in zip(self.convs, self.norms, self.films, strict=True):
            scale, shift = film(text).chunk(2, dim=-1)
            h = F.gelu(norm(conv(h)) * (1 + scale[..., None, None]) + shift[..., None, None])
        grid = h.flatten(2)  # [B, c3, cells]
        scene = self.scene(grid.flatten(1)).unsqueeze(1)
        return torch.cat([scene, self.cell(grid.transpose(1, 2)) + self.cell_pos], dim=1)


class SpatialSoftmax(BatchInvariant, nn.Module):
    """Each channel of a feature map as a keypoint: the expected ``(x, y)`` in ``[-1, 1]``
    under a softmax over its positions (Levine et al. 2016, "End-to-End Training of Deep
    Visuomotor Policies"). It hands the policy object positions as numbers, which a patch
    grid has to learn to read out of its position embeddings. Batch-invariant: a softmax
    per row and :func:`row_linear`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, K, H, W]`` -> ``[B, K, 2]``."""
        b, k, h, w = features.shape
        grid = pixel_grid(h, w, features).reshape(2, h * w)
        attn = torch.softmax(features.reshape(b, k, h * w) / self.log_temperature.exp(), dim=-1)
        return self.linear(attn, grid, None)


class RowEncoderLayer(BatchInvariant, nn.TransformerEncoderLayer):
    """torch's pre-norm encoder layer (same parameters and initialisation) computed with
    :func:`row_linear` and per-(row, head) ``scaled_dot_product_attention``, so that a row's
    output never depends on the rest of its batch. Built for TinyVLA: GELU, ``norm_first``.
    """

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if src_mask is not None or is_causal or not self.norm_first:
            raise NotImplementedError("RowEncoderLayer: norm_first, key padding masks only")
        x = src
        x = x + self.dropout1(self._attention(self.norm1(x), src_key_padding_mask))
        h = self.activation(self.linear(self.norm2(x), self.linear1.weight, self.linear1.bias))
        return x + self.dropout2(
            self.linear(self.dropout(h), self.linear2.weight, self.linear2.bias)
        )

    def _attention(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        attn, (b, n, d) = self.self_attn, x.shape
        qkv = self.linear(x, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
        mask = None
        if pad is not None:  # True = padding; a row that is all padding attends to all of it
            mask = (~pad | pad.all(-1, keepdim=True))[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.linear(
            out.transpose(1, 2).reshape(b, n, d), attn.out_proj.weight, attn.out_proj.bias
        )


class Encoder(nn.Module):
    """A stack of :class:`RowEncoderLayer`: ``nn.TransformerEncoder``'s parameter names and
    initialisation (every layer a copy of the first), with the padding mask kept boolean."""

    def __init__(self, dim: int, heads: int, layers: int) -> None:
        super().__init__()
        layer = RowEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(layers))

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, n, d]``; ``pad [B, n]`` True where a position is padding (not attended)."""
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=pad)
        return x
