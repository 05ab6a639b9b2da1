"""MixedAE (Chen et al., CVPR 2023): MAE on mixed images, with homologous recognition.

R images (default 4) of a batch are mixed into one: a random partition of the patch grid into R
equal sets, each set taken from one source, positions kept (:mod:`siamae.data.mixing`). The
encoder sees the whole mixed image, so it encodes as many tokens per source image as MAE's
(N/R = 25 %). Mixing alone hurts (the paper's motivation: the input now tells more about the
target than MAE's visible patches do); MixedAE adds *homologous recognition*:

- homologous attention: every encoder block keeps only the top-k attention logits of each query
  (k = ceil((N + 1) / R)), made with the ViT's own weights (:mod:`siamae.models.homologous`);
  after pre-training the encoder is a plain ViT with ordinary attention;
- segment embeddings: a learned vector per source slot added to the patch tokens (outside the
  ViT, so the exported encoder stays a plain timm ViT);
- a homologous contrastive loss (SupCon form) on the final patch tokens of each mixed sequence:
  patches of the same source are the positives.

The "unmixing" decoder is MAE's decoder, run once per source image: the group's CLS, the
encoder tokens at the positions that image supplied, mask tokens elsewhere. The reconstruction
loss is norm-pix MSE on the positions the image did not supply.

The paper's method section could not be read: the choices marked *inferred* in docs/mixedae.md
are options with the defaults below. ``mixing.naive=true`` is the paper's motivating baseline:
mixing with ordinary attention, no segment embeddings, no contrastive term.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from siamae.data.mixing import (
    GroupPartition,
    UnmixIndex,
    group_partition,
    mix_images,
    unmix_index,
    unmix_latent,
)
from siamae.errors import ConfigError, SiamaeError
from siamae.methods.base import (
    Method,
    MethodOutput,
    Reconstruction,
    denormalize,
    encoder_from_config,
    paste_prediction,
)
from siamae.methods.mae import MAE, mae_decoder
from siamae.models.decoder import MAEDecoder
from siamae.models.homologous import homologous_block, homologous_precision
from siamae.models.masking import masked_mse, pixel_targets
from siamae.models.vit import VIT_SIZES, Encoder

if TYPE_CHECKING:
    from siamae.config import Config

SEGMENT_PLACES = ("encoder", "decoder", "none")
# One colour per source slot in the pictures (cycled beyond eight sources).
PALETTE = (
    (0.90, 0.10, 0.10),
    (0.10, 0.45, 0.95),
    (0.10, 0.80, 0.20),
    (1.00, 0.80, 0.00),
    (0.80, 0.20, 0.90),
    (0.00, 0.85, 0.85),
    (1.00, 0.50, 0.00),
    (1.00, 1.00, 1.00),
)


def default_topk(num_patches: int, ratio: int) -> int:
    """k = ceil((N + 1) / R): as many keys as one source supplies, plus one (50 at N=196, R=4)."""
    return math.ceil((num_patches + 1) / ratio)


def parse_topk_blocks(value: str | int, depth: int) -> tuple[int, ...]:
    """``"all"``, ``"none"``, one block index, or a comma list ``"0,1,2"`` -> block indices.

    Raises ValueError naming what is wrong (check_config turns it into a ConfigError).
    """
    text = str(value).strip().lower()
    if text == "all":
        return tuple(range(depth))
    if text in ("none", ""):
        return ()
    try:
        blocks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(
            f"expected 'all', 'none' or block indices like '0,1,2', got {value!r}"
        ) from None
    if any(not 0 <= b < depth for b in blocks):
        raise ValueError(f"block indices must be in 0..{depth - 1}, got {value!r}")
    return tuple(blocks)


def homologous_contrastive_loss(
    tokens: torch.Tensor, source_of: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """SupCon loss of the patch tokens of each mixed sequence, positives = same source.

    For anchor i of a sequence: candidates A(i) = every other patch, positives
    P(i) = the other patches of i's source, and
    ``l_i = -1/|P(i)| sum_{p in P(i)} log(exp(s_ip / t) / sum_{a in A(i)} exp(s_ia / t))``
    with s the cosine similarity. The loss is the mean of l_i over all patches of all sequences.

    Args:
        tokens: (G, N, D) final encoder patch tokens (CLS excluded).
        source_of: (G, N) source slot of each patch.
    """
    # fp32 even under autocast (which would run the similarity matmul in bf16/fp16).
    with torch.autocast(tokens.device.type, enabled=False):
        z = F.normalize(tokens.float(), dim=-1)
        sim = z @ z.transpose(1, 2) / temperature  # (G, N, N)
        n = sim.shape[1]
        self_pair = torch.eye(n, dtype=torch.bool, device=sim.device)
        sim = sim.masked_fill(self_pair, float("-inf"))
        log_prob = sim - torch.logsumexp(sim, dim=-1, keepdim=True)
        positive = (source_of.unsqueeze(2) == source_of.unsqueeze(1)) & ~self_pair
        per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(-1) / positive.sum(-1)
        return per_anchor.mean()


def outline_sources(
    rgb: torch.Tensor, source_of: torch.Tensor, patch_size: int, width: int = 1
) -> torch.Tensor:
    """Draw each patch's border in its source's colour: (G, 3, H, W) in [0, 1] -> same shape."""
    g, _, h, w = rgb.shape
    gh, gw = h // patch_size, w // patch_size
    palette = torch.tensor(PALETTE, dtype=rgb.dtype, device=rgb.device)
    colour = palette[source_of % len(PALETTE)].view(g, gh, gw, 3).permute(0, 3, 1, 2)
    colour = colour.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
    inside = torch.arange(patch_size, device=rgb.device)
    edge = (inside < width) | (inside >= patch_size - width)
    border = (edge.view(-1, 1) | edge.view(1, -1)).repeat(gh, gw)  # (H, W)
    return torch.where(border, colour, rgb)


class MixedAE(Method):
    """Mixed autoencoder: one mixed image per group of R, homologous attention and contrast.

    ``batch["images"]``: (B, 1, 3, H, W), B a multiple of R; ``batch["mask_noise"]``: (B, N),
    the group's partition is made from its first sample's noise.
    """

    name = "mixedae"
    num_views = 1
    view_kind = "single"

    def __init__(
        self,
        encoder: Encoder,
        decoder: MAEDecoder,
        ratio: int = 4,
        topk: int | None = None,
        topk_blocks: tuple[int, ...] | None = None,
        segment_embed: str = "encoder",
        contrastive_weight: float = 1.0,
        temperature: float = 0.1,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        if segment_embed not in SEGMENT_PLACES:
            raise ValueError(
                f"segment_embed must be one of {SEGMENT_PLACES}, got {segment_embed!r}"
            )
        n = encoder.num_patches
        if ratio < 2 or n % ratio or n // ratio < 2:
            raise ValueError(f"{n} patches cannot be split among {ratio} sources of 2+ patches")
        self.encoder = encoder
        self.decoder = decoder
        self.ratio = ratio
        self.topk = default_topk(n, ratio) if topk is None else topk
        self.topk_blocks = tuple(range(encoder.depth)) if topk_blocks is None else topk_blocks
        self.segment_place = segment_embed
        self.contrastive_weight = contrastive_weight
        self.temperature = temperature
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = 1 - 1 / ratio  # the share each image does not supply (for pictures)
        # A learned vector per source slot, held by the method (not the ViT): the encoder's
        # state dict stays a plain timm ViT and evaluation never sees segment embeddings.
        if segment_embed == "none":
            self.segment_embed = None
        else:
            dim = encoder.embed_dim if segment_embed == "encoder" else decoder.dim
            self.segment_embed = nn.Parameter(torch.empty(ratio, dim))
            nn.init.trunc_normal_(self.segment_embed, std=0.02)

    # -- config --------------------------------------------------------------------------------
    @classmethod
    def published_defaults(cls, cfg: Config) -> dict[str, Any]:
        # MAE's recipe (decoder, crop area, bicubic crops); each image supplies 1/R of the grid,
        # so the masking ratio is 1 - 1/R (0.75 at R=4, MAE's).
        defaults = MAE.published_defaults(cfg)
        defaults["mask_ratio"] = 1 - 1 / max(cfg.mixing.ratio, 1)
        return defaults

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        m = cfg.mixing
        r = m.ratio

        def fail(field_name: str, message: str) -> None:
            raise ConfigError(f"config field '{field_name}': {message}")

        n = (cfg.model.img_size // cfg.model.patch_size) ** 2
        if r < 2:
            fail("mixing.ratio", f"expected 2 or more images mixed into one, got {r}")
        if n % r or n // r < 2:
            fail(
                "mixing.ratio",
                f"the {n} patches of a {cfg.model.img_size}px image (patch "
                f"{cfg.model.patch_size}) must split into {r} equal sets of 2 or more",
            )
        if cfg.data.batch_size % r:
            fail(
                "data.batch_size",
                f"{cfg.data.batch_size} is not a multiple of mixing.ratio={r}: MixedAE mixes "
                f"groups of {r} images of each device's batch; use e.g. "
                f"{max(r, cfg.data.batch_size // r * r)}",
            )
        if cfg.data.repeated_sampling != 1:
            fail(
                "data.repeated_sampling",
                "MixedAE mixes different images; repeated samples of one image cannot be mixed",
            )
        if abs(cfg.mask_ratio - (1 - 1 / r)) > 1e-9:
            fail(
                "mask_ratio",
                f"MixedAE's masking is set by mixing.ratio (each image supplies 1/{r} of the "
                f"grid: {1 - 1 / r}); leave mask_ratio null, got {cfg.mask_ratio}",
            )
        if m.topk is not None and not 1 <= m.topk <= n + 1:
            fail("mixing.topk", f"expected 1 <= k <= {n + 1} (tokens of a sequence), got {m.topk}")
        try:
            parse_topk_blocks(m.topk_blocks, _depth(cfg))
        except ValueError as err:
            fail("mixing.topk_blocks", str(err))
        if m.temperature <= 0:
            fail("mixing.temperature", f"expected a positive number, got {m.temperature}")
        if m.contrastive_weight < 0:
            fail("mixing.contrastive_weight", f"expected 0 or more, got {m.contrastive_weight}")

    @classmethod
    def from_config(cls, cfg: Config) -> MixedAE:
        encoder = encoder_from_config(cfg)
        decoder = mae_decoder(cfg, encoder)
        m = cfg.mixing
        if m.naive:
            # The paper's motivation: mixing alone (ordinary attention, no segments, no contrast).
            return cls(
                encoder,
                decoder,
                m.ratio,
                topk_blocks=(),
                segment_embed="none",
                contrastive_weight=0.0,
                temperature=m.temperature,
                norm_pix_loss=cfg.norm_pix_loss,
            )
        return cls(
            encoder,
            decoder,
            m.ratio,
            topk=m.topk,
            topk_blocks=parse_topk_blocks(m.topk_blocks, encoder.depth),
            segment_embed=m.segment_embed,
            contrastive_weight=m.contrastive_weight,
            temperature=m.temperature,
            norm_pix_loss=cfg.norm_pix_loss,
        )

    # -- the model -----------------------------------------------------------------------------
    def partition(self, batch: dict[str, torch.Tensor]) -> GroupPartition:
        images = batch["images"]
        noise = batch.get("mask_noise")
        if noise is None:
            noise = torch.rand(images.shape[0], self.encoder.num_patches, device=images.device)
        return group_partition(noise, self.ratio)

    def encode_mixed(
        self, images: torch.Tensor, part: GroupPartition
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, H, W) sources -> (G, 1 + N, E) encoded mixed sequences (after the final norm),
        and the homologous precision averaged over the top-k blocks (None without top-k)."""
        mixed = mix_images(images, part, self.encoder.patch_size)
        tokens, cls, _ = self.encoder.embed(mixed)
        if self.segment_place == "encoder":
            tokens = tokens + self.segment_embed[part.source_of].to(tokens.dtype)
        x = torch.cat([cls, tokens], dim=1)
        precisions = []
        for i, block in enumerate(self.encoder.vit.blocks):
            if i in self.topk_blocks:
                x, kept = homologous_block(block, x, self.topk)
                with torch.no_grad():
                    precisions.append(homologous_precision(kept, part.source_of))
            else:
                x = block(x)
        precision = torch.stack(precisions).mean() if precisions else None
        return self.encoder.vit.norm(x), precision

    def decode(self, latent: torch.Tensor, index: UnmixIndex) -> torch.Tensor:
        """Unmixing: (G, 1 + N, E) -> (B, N, p*p*3), one decoder sequence per source image."""
        x = self.decoder.queries(unmix_latent(latent, index), index.ids_restore)
        if self.segment_place == "decoder":
            # Tells the decoder which slot it unmixes (every token of that sequence).
            x = x + self.segment_embed[index.slot].unsqueeze(1).to(x.dtype)
        for block in self.decoder.blocks:
            x = block(x)
        return self.decoder.predict(x)

    def _run(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        images = batch["images"][:, 0]
        part = self.partition(batch)
        latent, precision = self.encode_mixed(images, part)
        index = unmix_index(part)
        pred = self.decode(latent, index)
        return {
            "images": images,
            "part": part,
            "index": index,
            "latent": latent,
            "pred": pred,
            "precision": precision,
        }

    def forward(self, batch: dict[str, torch.Tensor]) -> MethodOutput:
        run = self._run(batch)
        target = pixel_targets(run["images"], self.encoder.patch_size, self.norm_pix_loss)
        recon = masked_mse(run["pred"], target, run["index"].mask)
        patches = run["latent"][:, 1:]
        if self.contrastive_weight > 0:
            contrast = homologous_contrastive_loss(patches, run["part"].source_of, self.temperature)
            loss = recon + self.contrastive_weight * contrast
        else:
            with torch.no_grad():  # logged for comparison (naive mixing), no gradient
                contrast = homologous_contrastive_loss(
                    patches, run["part"].source_of, self.temperature
                )
            loss = recon
        logs = {"loss_recon": recon.detach(), "loss_contrast": contrast.detach()}
        if run["precision"] is not None:
            logs["homologous_precision"] = run["precision"]
        return MethodOutput(loss, logs)

    # -- pictures ------------------------------------------------------------------------------
    def _whole_groups(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        b = batch["images"].shape[0] // self.ratio * self.ratio
        if b == 0:
            return None
        return {k: v[:b] for k, v in batch.items() if torch.is_tensor(v)}

    @torch.no_grad()
    def reconstruct(self, batch: dict[str, torch.Tensor]) -> Reconstruction:
        """Per source image: the mixed image (reference), its own patches, the reconstruction.

        Only whole groups of R samples can be mixed: a batch is cut to a multiple of R.
        """
        whole = self._whole_groups(batch)
        if whole is None:
            raise SiamaeError(
                f"MixedAE mixes groups of {self.ratio} images: a picture needs at least "
                f"{self.ratio} samples (e.g. --count {self.ratio})"
            )
        run = self._run(whole)
        index = run["index"]
        masked, pasted = paste_prediction(
            run["pred"].float(),
            run["images"].float(),
            index.mask,
            self.encoder.patch_size,
            self.norm_pix_loss,
        )
        mixed = mix_images(run["images"], run["part"], self.encoder.patch_size)[index.group]
        return Reconstruction(mixed, masked, pasted, run["images"])

    @torch.no_grad()
    def picture(self, batch: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]] | None:
        """One row per source image, its group's rows together: the mixed input with every
        source's patches outlined in its own colour, the patches this image supplied (outlined
        in its colour), its reconstruction, the original. RGB in [0, 1]."""
        batch = self._whole_groups(batch)
        if batch is None:
            return None
        rec = self.reconstruct(batch)
        part = self.partition(batch)
        index = unmix_index(part)
        p = self.encoder.patch_size
        b, n = index.mask.shape
        grid = (rec.original.shape[2] // p, rec.original.shape[3] // p)
        mixed = outline_sources(denormalize(rec.reference), part.source_of[index.group], p)
        # The image's own patches outlined in its colour; the positions it did not supply grey.
        own_colour = outline_sources(denormalize(rec.masked), index.slot[:, None].expand(b, n), p)
        hidden = index.mask.view(b, 1, *grid).repeat_interleave(p, 2).repeat_interleave(p, 3)
        supplied = torch.where(hidden.bool(), torch.full_like(own_colour, 0.5), own_colour)
        return [
            ("mixed input (colour = source)", mixed),
            ("patches it supplied", supplied),
            ("reconstruction", denormalize(rec.prediction)),
            ("original", denormalize(rec.original)),
        ]


def _depth(cfg: Config) -> int:
    return VIT_SIZES[cfg.model.arch].depth
