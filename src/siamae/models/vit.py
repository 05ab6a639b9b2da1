"""The encoder: a timm VisionTransformer held (not re-written), so its state_dict is timm-native.

Keys are exactly timm's (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.*``,
``norm``), which is what lets an exported encoder load strictly into ``timm.create_model``.

An encoder without a final norm (SiameseIM's ViT has none) takes timm's own layout for that:
``global_pool="avg"``, where ``norm`` is an identity and ``fc_norm`` (a LayerNorm) follows the
pooling of the patch tokens, as in SiameseIM's fine-tuning and linear probing. The tokens this
class returns are then the last block's output, unnormalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from siamae.models.masking import gather_tokens
from siamae.models.pos_embed import POS_RESAMPLE_MODES, resample_position_table, sincos_2d


@dataclass(frozen=True)
class ViTSize:
    embed_dim: int
    depth: int
    num_heads: int


VIT_SIZES: dict[str, ViTSize] = {
    "vit_tiny": ViTSize(192, 12, 3),
    "vit_small": ViTSize(384, 12, 6),
    "vit_base": ViTSize(768, 12, 12),
    "vit_large": ViTSize(1024, 24, 16),
}


SUPPORTED_PATCH_SIZES: tuple[int, ...] = (8, 14, 16, 32)


def timm_name(arch: str, patch_size: int, img_size: int = 224) -> str:
    """The timm model name with the same shapes, e.g. ``vit_small_patch16_224``."""
    return f"{arch}_patch{patch_size}_{img_size}"


class Encoder(nn.Module):
    """A plain ViT that encodes all tokens, a per-sample subset of tokens, or any image size.

    The 2-D sin-cos position embedding is fixed (``requires_grad=False``) with a zero vector
    for CLS. Images of another size than ``img_size`` get a bicubically interpolated grid,
    by DINO's formula (``pos_resample="dino"``, what the published evaluations ran) or timm's
    antialiased ``resample_abs_pos_embed`` (``"timm"``). Pre-training encodes the trained size,
    where nothing is resampled; only evaluation sizes differ.

    >>> import torch
    >>> from siamae import Encoder
    >>> encoder = Encoder("vit_tiny", patch_size=8, img_size=32, depth=2)
    >>> encoder(torch.randn(1, 3, 32, 32)).shape  # CLS + 16 patches
    torch.Size([1, 17, 192])
    >>> encoder.patch_features(torch.randn(1, 3, 48, 32)).shape  # another size: resampled grid
    torch.Size([1, 192, 6, 4])
    """

    def __init__(
        self,
        arch: str = "vit_small",
        patch_size: int = 16,
        img_size: int = 224,
        drop_path_rate: float = 0.0,
        pos_resample: str = "dino",
        final_norm: bool = True,
        pos_order: str = "wh",
        **overrides: int,
    ) -> None:
        super().__init__()
        self.pos_resample = pos_resample
        if arch not in VIT_SIZES:
            raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(VIT_SIZES)}")
        if patch_size not in SUPPORTED_PATCH_SIZES:
            raise ValueError(f"patch_size must be 8, 14, 16 or 32, got {patch_size}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        size = VIT_SIZES[arch]
        dims = {
            "embed_dim": size.embed_dim,
            "depth": size.depth,
            "num_heads": size.num_heads,
            **overrides,
        }
        self.arch = arch
        self.patch_size = patch_size
        self.img_size = img_size
        self.final_norm = final_norm
        self.pos_order = pos_order
        self.vit = VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            num_classes=0,
            # No final norm: timm's average-pool layout (norm = Identity, fc_norm after pooling).
            global_pool="token" if final_norm else "avg",
            mlp_ratio=4.0,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            drop_path_rate=drop_path_rate,
            weight_init="skip",  # initialize_weights() below sets every tensor (MAE scheme)
            **dims,
        )
        # Other image sizes are handled here (interpolated grid), not by timm's strict check.
        self.vit.patch_embed.strict_img_size = False
        self.embed_dim: int = dims["embed_dim"]
        self.num_heads: int = dims["num_heads"]
        self.depth: int = dims["depth"]
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.vit.pos_embed.requires_grad_(False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE's initialisation: fixed sin-cos positions, xavier patch projection, N(0, .02) CLS."""
        with torch.no_grad():
            self.vit.pos_embed.copy_(
                sincos_2d(
                    self.embed_dim, self.grid_size, self.grid_size, order=self.pos_order
                ).unsqueeze(0)
            )
            w = self.vit.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.normal_(self.vit.cls_token, std=0.02)
        for name, module in self.vit.named_modules():
            if name.startswith("patch_embed"):
                continue
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def pos_resample(self) -> str:
        """How the position grid is resampled for another image size: "dino" or "timm"."""
        return self._pos_resample

    @pos_resample.setter
    def pos_resample(self, mode: str) -> None:
        if mode not in POS_RESAMPLE_MODES:
            raise ValueError(
                f"pos_resample must be one of {', '.join(POS_RESAMPLE_MODES)}, got {mode!r}"
            )
        self._pos_resample = mode

    # -- pieces ---------------------------------------------------------------------------
    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, 1 + gh*gw, D): the fixed embedding, resampled (``pos_resample``) for another grid."""
        return resample_position_table(
            self.vit.pos_embed,
            (self.grid_size, self.grid_size),
            tuple(grid),  # type: ignore[arg-type]
            mode=self.pos_resample,
        )

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Patch tokens with positions added, and the CLS token with its position.

        Returns (patches (B, N, D), cls (B, 1, D), grid (gh, gw)).
        """
        b, _, h, w = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        grid = (h // p, w // p)
        tokens = self.vit.patch_embed(images)
        pos = self.position_embedding(grid)
        tokens = tokens + pos[:, 1:]
        cls = (self.vit.cls_token + pos[:, :1]).expand(b, -1, -1)
        return tokens, cls, grid

    def run_blocks(self, tokens: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        """The blocks, then the final norm (an identity in the no-final-norm layout) unless
        ``final_norm`` is False (SiameseIM's probe reads the last block's output)."""
        for block in self.vit.blocks:
            tokens = block(tokens)
        return self.vit.norm(tokens) if final_norm else tokens

    # -- the three ways to encode -----------------------------------------------------------
    def forward(
        self,
        images: torch.Tensor,
        ids_keep: torch.Tensor | None = None,
        final_norm: bool = True,
    ) -> torch.Tensor:
        """Encode images.

        Args:
            images: (B, 3, H, W), normalised. H and W multiples of the patch size.
            ids_keep: optional (B, K) indices of the patches to encode (the visible ones).
            final_norm: False skips the final norm (the last block's output).
        Returns:
            (B, 1 + N, D) or (B, 1 + K, D): CLS first, after the final norm.
        """
        tokens, cls, _ = self.embed(images)
        if ids_keep is not None:
            tokens = gather_tokens(tokens, ids_keep)
        return self.run_blocks(torch.cat([cls, tokens], dim=1), final_norm)

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D, H/p, W/p): last block after the final norm, patch tokens only."""
        tokens, cls, (gh, gw) = self.embed(images)
        out = self.run_blocks(torch.cat([cls, tokens], dim=1))[:, 1:]
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], gh, gw)


def build_encoder(
    arch: str = "vit_small", patch_size: int = 16, img_size: int = 224, **kw: int
) -> Encoder:
    return Encoder(arch=arch, patch_size=patch_size, img_size=img_size, **kw)
