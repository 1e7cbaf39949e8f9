"""Batch-invariant layers: each batch element computed on its own, so that a row's output
never depends on the rest of its batch (what lets dynamic batching match synchronous
rollouts bit for bit). The parameters are torch's own layers', so checkpoints load either way.
"""

from __future__ import annotations

import copy

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


class RowLinear(nn.Linear):
    """``nn.Linear`` computed by :func:`row_linear`; the parameters are ``nn.Linear``'s, so
    checkpoints load either way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return row_linear(x, self.weight, self.bias)


class RowPatchEmbed(nn.Conv2d):
    """ViT's patch embedding (a conv whose stride is its kernel) as :func:`row_linear` over
    each image's patches: a conv picks its algorithm by batch size too. The parameters are
    ``nn.Conv2d``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), dim]``, patches row-major."""
        b, c, h, w = x.shape
        p = self.kernel_size[0]
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        patches = x.reshape(b, (h // p) * (w // p), c * p * p)
        return row_linear(patches, self.weight.view(self.out_channels, -1), self.bias)


class RowConv2d(nn.Conv2d):
    """``nn.Conv2d`` as :func:`row_linear` over each image's unfolded windows (a conv picks
    its algorithm by batch size, as a GEMM does). Zero padding, no groups or dilation. The
    parameters are ``nn.Conv2d``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, out, H', W']``."""
        if self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros":
            raise NotImplementedError("RowConv2d: zero padding, groups=1, dilation=1 only")
        b, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        cols = F.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw))  # [B, C*kh*kw, L]
        y = row_linear(cols.transpose(1, 2), self.weight.view(self.out_channels, -1), self.bias)
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        return y.transpose(1, 2).reshape(b, self.out_channels, oh, ow)


class SpatialSoftmax(nn.Module):
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
        ys, xs = torch.meshgrid(
            torch.linspace(-1, 1, h, device=features.device, dtype=features.dtype),
            torch.linspace(-1, 1, w, device=features.device, dtype=features.dtype),
            indexing="ij",
        )
        grid = torch.stack([xs.reshape(-1), ys.reshape(-1)])  # [2, H*W]
        attn = torch.softmax(features.reshape(b, k, h * w) / self.log_temperature.exp(), dim=-1)
        return row_linear(attn, grid, None)


class RowEncoderLayer(nn.TransformerEncoderLayer):
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
        h = self.activation(row_linear(self.norm2(x), self.linear1.weight, self.linear1.bias))
        return x + self.dropout2(
            row_linear(self.dropout(h), self.linear2.weight, self.linear2.bias)
        )

    def _attention(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        attn, (b, n, d) = self.self_attn, x.shape
        qkv = row_linear(x, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
        mask = None
        if pad is not None:  # True = padding; a row that is all padding attends to all of it
            mask = (~pad | pad.all(-1, keepdim=True))[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return row_linear(
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
