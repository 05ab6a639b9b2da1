"""MAE: encode the visible 25 % of one view, reconstruct the rest (He et al., 2022)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from siamae.config import DecoderConfig, MaskedObjectiveConfig
from siamae.methods.base import (
    Batch,
    Method,
    MethodOutput,
    Picture,
    Reconstruction,
    encoder_from_config,
    paste_prediction,
    reconstruction_picture,
)
from siamae.models.decoder import MAEDecoder
from siamae.models.losses import masked_mse, pixel_targets
from siamae.models.masking import random_masking
from siamae.models.vit import Encoder

if TYPE_CHECKING:
    from siamae.config import Config


def mae_decoder(cfg: Config, encoder: Encoder) -> MAEDecoder:
    """MAE's decoder with the config's ``decoder`` fields (also MixedAE's unmixing decoder)."""
    d = cfg.section(DecoderConfig)
    return MAEDecoder(
        encoder.embed_dim,
        encoder.grid_size,
        encoder.patch_size,
        dim=d.dim,
        depth=d.depth,
        num_heads=d.num_heads,
        mlp_ratio=d.mlp_dim / d.dim,
    )


class MAE(Method):
    """Masked autoencoder baseline: ViT encoder on visible patches + CLS, ViT decoder.

    >>> import torch, siamae
    >>> model = siamae.create_method("mae", "vit_tiny_patch16_224", img_size=32, patch_size=8)
    >>> model({"images": torch.randn(2, 1, 3, 32, 32)}).loss.ndim
    0
    """

    name = "mae"
    num_views = 1
    view_kind = "single"
    config_sections = {"mae": MaskedObjectiveConfig, "decoder": DecoderConfig}

    def __init__(
        self,
        encoder: Encoder,
        decoder: MAEDecoder,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss

    @classmethod
    def published_defaults(cls, cfg: Config) -> dict[str, Any]:
        # MAE ViT-B/16 recipe: ratio 0.75; decoder 512-d, 8 blocks, 16 heads; RRC area (0.2, 1).
        return {
            "mae": {"mask_ratio": 0.75},
            "decoder": {
                "dim": 512,
                "depth": 8,
                "num_heads": 16,
                "mlp_dim": 2048,
                "dropout": 0.0,
                "norm_style": "pre",
            },
            "global_scale": (0.2, 1.0),
            # RandomResizedCrop(..., interpolation=3) in MAE's pre-training script.
            "interpolation": "bicubic",
        }

    @classmethod
    def from_config(cls, cfg: Config) -> MAE:
        encoder = encoder_from_config(cfg)
        objective = cfg.section(MaskedObjectiveConfig)
        return cls(
            encoder, mae_decoder(cfg, encoder), objective.mask_ratio, objective.norm_pix_loss
        )

    def _run(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = batch["images"][:, 0]
        b = images.shape[0]
        ids_keep, mask, ids_restore = random_masking(
            b, self.encoder.num_patches, self.mask_ratio, images.device, batch.get("mask_noise")
        )
        latent = self.encoder(images, ids_keep)
        pred = self.decoder(latent, ids_restore)
        return images, pred, mask

    def forward(self, batch: Batch) -> MethodOutput:
        images, pred, mask = self._run(batch)
        target = pixel_targets(images, self.encoder.patch_size, self.norm_pix_loss)
        loss = masked_mse(pred, target, mask)
        return MethodOutput(loss, {"mask_ratio_real": mask.mean().detach()})

    @torch.no_grad()
    def reconstruct(self, batch: Batch) -> Reconstruction:
        images, pred, mask = self._run(batch)
        masked, pasted = paste_prediction(
            pred.float(), images.float(), mask, self.encoder.patch_size, self.norm_pix_loss
        )
        return Reconstruction(None, masked, pasted, images)

    def picture(self, batch: Batch) -> Picture | None:
        return reconstruction_picture(self, batch)
