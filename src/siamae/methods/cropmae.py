"""CropMAE (Eymaël et al., 2024) and SiamMAE (Gupta et al., 2023): one Siamese model, two data.

Two views pass through one shared encoder: the reference view whole (all patches + CLS), the
other with only a few patches visible (0.985 for CropMAE: 2 of 196). A cross-self decoder
reconstructs the masked view's pixels with the reference view as memory. CropMAE's views are
two crops of one image; SiamMAE's are two frames of one video. The model is the same; the
difference lives in the data (``view_kind``) and in the recipe defaults.
"""

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
from siamae.models.decoder import CrossSelfDecoder
from siamae.models.losses import masked_mse, pixel_targets
from siamae.models.masking import random_masking
from siamae.models.vit import Encoder
from siamae.options import option_error

if TYPE_CHECKING:
    from siamae.config import Config


class CropMAE(Method):
    """Siamese masked autoencoder with a cross-self decoder.

    ``batch["images"]`` is (B, 2, 3, H, W): view 0 the reference (encoded whole), view 1 the
    view to reconstruct (masked at ``mask_ratio``). The loss is norm-pix MSE on its masked patches.

    >>> import torch
    >>> from siamae import CropMAE, CrossSelfDecoder, Encoder
    >>> encoder = Encoder("vit_tiny", patch_size=8, img_size=32, depth=2)
    >>> decoder = CrossSelfDecoder(encoder.embed_dim, encoder.grid_size, 8, dim=64, depth=1)
    >>> model = CropMAE(encoder, decoder, mask_ratio=0.75)
    >>> model({"images": torch.randn(2, 2, 3, 32, 32)}).loss.shape
    torch.Size([])
    """

    name = "cropmae"
    num_views = 2
    view_kind = "pair"
    config_sections = {"cropmae": MaskedObjectiveConfig, "decoder": DecoderConfig}

    def __init__(
        self,
        encoder: Encoder,
        decoder: CrossSelfDecoder,
        mask_ratio: float = 0.985,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss

    @classmethod
    def published_defaults(cls, cfg: Config) -> dict[str, Any]:
        video = cfg.data.source in ("videos", "frames")
        return {
            cls.name: {"mask_ratio": 0.985},
            "decoder": {
                "dim": 256,
                "depth": 4,
                "num_heads": 8,
                "mlp_dim": 2048,
                "dropout": 0.1,
                "norm_style": "post",
            },
            # Global crop area: (0.1, 1) of an image, (0.5, 1) of a video frame.
            "global_scale": (0.5, 1.0) if video else (0.1, 1.0),
        }

    @classmethod
    def from_config(cls, cfg: Config) -> CropMAE:
        encoder = encoder_from_config(cfg)
        d = cfg.section(DecoderConfig)
        decoder = CrossSelfDecoder(
            encoder.embed_dim,
            encoder.grid_size,
            encoder.patch_size,
            dim=d.dim,
            depth=d.depth,
            num_heads=d.num_heads,
            mlp_dim=d.mlp_dim,
            dropout=d.dropout,
            norm_style=d.norm_style,
        )
        objective = cfg.section(MaskedObjectiveConfig)
        return cls(encoder, decoder, objective.mask_ratio, objective.norm_pix_loss)

    def _run(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        images = batch["images"]
        reference, target_view = images[:, 0], images[:, 1]
        b = images.shape[0]
        ids_keep, mask, ids_restore = random_masking(
            b, self.encoder.num_patches, self.mask_ratio, images.device, batch.get("mask_noise")
        )
        # One encoder call for both views would mix lengths (197 vs 1 + K); two calls share weights.
        memory = self.encoder(reference)
        latent = self.encoder(target_view, ids_keep)
        pred = self.decoder(latent, ids_restore, memory)
        return reference, target_view, pred, mask

    def forward(self, batch: Batch) -> MethodOutput:
        _, target_view, pred, mask = self._run(batch)
        target = pixel_targets(target_view, self.encoder.patch_size, self.norm_pix_loss)
        loss = masked_mse(pred, target, mask)
        return MethodOutput(loss, {})

    @torch.no_grad()
    def reconstruct(self, batch: Batch) -> Reconstruction:
        reference, target_view, pred, mask = self._run(batch)
        masked, pasted = paste_prediction(
            pred.float(), target_view.float(), mask, self.encoder.patch_size, self.norm_pix_loss
        )
        return Reconstruction(reference, masked, pasted, target_view)

    def picture(self, batch: Batch) -> Picture | None:
        return reconstruction_picture(self, batch)


class SiamMAE(CropMAE):
    """SiamMAE: the CropMAE model on two frames of one video; second frame masked at 0.95.

    >>> import siamae
    >>> siamae.create_method("siammae", "vit_tiny_patch16_224", img_size=32).mask_ratio
    0.95
    """

    name = "siammae"
    view_kind = "frames"
    config_sections = {"siammae": MaskedObjectiveConfig, "decoder": DecoderConfig}

    @classmethod
    def published_defaults(cls, cfg: Config) -> dict[str, Any]:
        defaults = super().published_defaults(cfg)
        defaults[cls.name] = {"mask_ratio": 0.95}
        defaults["global_scale"] = (0.5, 1.0)
        return defaults

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        if cfg.data.source == "images":
            raise option_error(
                "data.source",
                "siammae learns from video frames; use 'videos', 'frames' or 'synthetic'",
            )
