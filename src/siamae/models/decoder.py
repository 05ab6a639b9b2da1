"""Decoders: MAE's ViT decoder and CropMAE/SiamMAE's cross-self decoder."""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from siamae.models.masking import unshuffle_with_mask_tokens
from siamae.models.pos_embed import sincos_2d


class Attention(nn.Module):
    """Multi-head attention with separate query and key/value inputs, on fused SDPA kernels.

    Used as self-attention (``context is None``) and as cross-attention. Attention dropout is
    applied inside the kernel, as ``nn.MultiheadAttention(dropout=...)`` does in the published
    decoder.
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop

    @torch.no_grad()
    def init_joint_in_projection(self) -> None:
        """Initialise q, k and v as ONE Xavier-uniform (3D, D) matrix, zero bias.

        The published decoder uses ``nn.MultiheadAttention``, whose ``in_proj_weight`` is a
        single (3D, D) tensor drawn Xavier-uniform as a whole (std sqrt(2 / 4D): 0.0442 at
        D=256). Drawing q (D, D) and kv (2D, D) one by one would make them 1.41x and 1.15x
        wider, so they are cut from one joint draw instead.
        """
        dim = self.q.in_features
        joint = torch.empty(3 * dim, dim, device=self.q.weight.device, dtype=self.q.weight.dtype)
        nn.init.xavier_uniform_(joint)
        self.q.weight.copy_(joint[:dim])
        self.kv.weight.copy_(joint[dim:])
        nn.init.zeros_(self.q.bias)
        nn.init.zeros_(self.kv.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, Nq, D) queries; context: (B, Nk, D) keys/values (x itself when None)."""
        b, nq, d = x.shape
        ctx = x if context is None else context
        h = self.num_heads
        q = self.q(x).reshape(b, nq, h, d // h).transpose(1, 2)
        k, v = self.kv(ctx).reshape(b, ctx.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).reshape(b, nq, d))


class CrossSelfBlock(nn.Module):
    """One cross-self decoder block, in the published order.

    Post-norm (default, as the published checkpoints):
        x = norm_cross(x + drop(cross_attn(x, memory)))
        x = norm_ffn(x + drop(ffn(x)))
        x = norm_self(x + drop(self_attn(x)))
    Pre-norm (option): x = x + drop(sublayer(norm(x))) for the same three sub-layers.
    The feed-forward is Linear(D, mlp_dim) -> GELU -> dropout -> Linear(mlp_dim, D).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        dropout: float = 0.1,
        norm_style: Literal["post", "pre"] = "post",
    ) -> None:
        super().__init__()
        if norm_style not in ("post", "pre"):
            raise ValueError(f"norm_style must be 'post' or 'pre', got {norm_style!r}")
        self.norm_style = norm_style
        self.cross_attn = Attention(dim, num_heads, attn_drop=dropout)
        self.self_attn = Attention(dim, num_heads, attn_drop=dropout)
        self.ffn = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim)
        )
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.norm_ffn = nn.LayerNorm(dim, eps=1e-6)
        self.norm_self = nn.LayerNorm(dim, eps=1e-6)
        self.drop_cross = nn.Dropout(dropout)
        self.drop_ffn = nn.Dropout(dropout)
        self.drop_self = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x: (B, Nq, D) queries; memory: (B, Nk, D) the reference view's tokens."""
        if self.norm_style == "post":
            x = self.norm_cross(x + self.drop_cross(self.cross_attn(x, memory)))
            x = self.norm_ffn(x + self.drop_ffn(self.ffn(x)))
            x = self.norm_self(x + self.drop_self(self.self_attn(x)))
        else:
            x = x + self.drop_cross(self.cross_attn(self.norm_cross(x), memory))
            x = x + self.drop_ffn(self.ffn(self.norm_ffn(x)))
            x = x + self.drop_self(self.self_attn(self.norm_self(x)))
        return x


class MaskedDecoderBase(nn.Module):
    """Shared pieces of both decoders: embedding Linear, mask token, fixed positions, head."""

    def __init__(
        self, encoder_dim: int, dim: int, grid_size: int, patch_size: int, in_chans: int = 3
    ) -> None:
        super().__init__()
        self.dim = dim
        self.grid_size = grid_size
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer(
            "pos_embed", sincos_2d(dim, grid_size, grid_size).unsqueeze(0), persistent=True
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, patch_size * patch_size * in_chans)

    def initialize_weights(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # After the per-Linear pass, as in the published model: its init loop never reaches
        # nn.MultiheadAttention's joint in-projection (the output projection it does reach).
        for module in self.modules():
            if isinstance(module, Attention):
                module.init_joint_in_projection()

    def queries(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Encoder output of the masked view (B, 1 + K, E) -> (B, 1 + N, D) decoder queries."""
        x = self.embed(latent)
        patches = unshuffle_with_mask_tokens(x[:, 1:], self.mask_token, ids_restore)
        return torch.cat([x[:, :1], patches], dim=1) + self.pos_embed.to(x.dtype)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, D) -> (B, N, p*p*3): norm, head, CLS dropped."""
        return self.head(self.norm(x))[:, 1:]


class MAEDecoder(MaskedDecoderBase):
    """MAE's decoder: Linear to ``dim``, mask tokens put back, fixed positions, ViT blocks.

    >>> import torch
    >>> from siamae import MAEDecoder
    >>> decoder = MAEDecoder(192, grid_size=4, patch_size=8, dim=64, depth=1, num_heads=4)
    >>> latent, ids_restore = torch.randn(2, 1 + 4, 192), torch.arange(16).repeat(2, 1)
    >>> decoder(latent, ids_restore).shape  # a prediction per patch
    torch.Size([2, 16, 192])
    """

    def __init__(
        self,
        encoder_dim: int,
        grid_size: int,
        patch_size: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__(encoder_dim, dim, grid_size, patch_size)
        self.blocks = nn.ModuleList(
            [
                Block(
                    dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias=True,
                    norm_layer=partial(nn.LayerNorm, eps=1e-6),
                )
                for _ in range(depth)
            ]
        )
        self.initialize_weights()

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.queries(latent, ids_restore)
        for block in self.blocks:
            x = block(x)
        return self.predict(x)


class CrossSelfDecoder(MaskedDecoderBase):
    """CropMAE/SiamMAE decoder: masked-view queries attend to the reference view's tokens.

    One Linear projects both views. The memory (keys/values) is every reference token, CLS
    included, *without* decoder position embedding, the same for every block.

    >>> import torch
    >>> from siamae import CrossSelfDecoder
    >>> decoder = CrossSelfDecoder(192, grid_size=4, patch_size=8, dim=64, depth=1, num_heads=4)
    >>> latent, memory = torch.randn(2, 1 + 4, 192), torch.randn(2, 1 + 16, 192)
    >>> decoder(latent, torch.arange(16).repeat(2, 1), memory).shape
    torch.Size([2, 16, 192])
    """

    def __init__(
        self,
        encoder_dim: int,
        grid_size: int,
        patch_size: int,
        dim: int = 256,
        depth: int = 4,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        dropout: float = 0.1,
        norm_style: Literal["post", "pre"] = "post",
    ) -> None:
        super().__init__(encoder_dim, dim, grid_size, patch_size)
        self.blocks = nn.ModuleList(
            [CrossSelfBlock(dim, num_heads, mlp_dim, dropout, norm_style) for _ in range(depth)]
        )
        self.initialize_weights()

    def forward(
        self, latent: torch.Tensor, ids_restore: torch.Tensor, reference: torch.Tensor
    ) -> torch.Tensor:
        """latent: (B, 1+K, E) masked view; reference: (B, 1+N, E) whole view -> (B, N, p*p*3)."""
        x = self.queries(latent, ids_restore)
        memory = self.embed(reference)
        for block in self.blocks:
            x = block(x, memory)
        return self.predict(x)
