"""MixedAE (Chen et al., CVPR 2023): MAE on mixed images, with homologous recognition.

R images (default 4) of a batch are mixed into one: a random partition of the patch grid into R
equal sets, each set taken from one source, positions kept (:mod:`siamae.data.mixing`). The
encoder sees the whole mixed image, so it encodes as many tokens per source image as MAE's
(N/R = 25 %). Mixing alone hurts (the paper's motivation: the input now tells more about the
target than MAE's visible patches do); MixedAE adds *homologous recognition*: each patch must
find the patches of its own image.

- homologous attention: chosen encoder blocks keep only the top-k attention logits of each
  query (k = ceil((N + 1) / R)), made with the ViT's own weights
  (:mod:`siamae.models.homologous`); after pre-training the encoder is a plain ViT with ordinary
  attention;
- the recognition loss (``mixing.attention_loss_weight``): on the attention logits of chosen
  blocks, -log of the softmax mass each patch query puts on the other patches of its own image.
  The top-k alone is rewarded by nothing for picking homologous keys; this term is what trains
  the selection (docs/mixedae.md: the measurements);
- segment embeddings (``mixing.segment_embed``: encoder / decoder / none): a learned vector per
  source slot, held by the method, not the ViT. At the encoder input they make recognition a
  lookup of the slot id instead of the content, which is why the default is none;
- a homologous contrastive loss (SupCon form, patches of one source are the positives) on a
  projection head (default), the final tokens or an intermediate block's tokens;
- ``mixing.cls_key=false`` removes the shared CLS from the patch queries' keys (it is otherwise a
  channel between the images of a mixture).

The "unmixing" decoder is MAE's decoder, run once per source image: the group's CLS, the
encoder tokens at the positions that image supplied, mask tokens elsewhere. The reconstruction
loss is norm-pix MSE on the positions the image did not supply.

The paper's method section could not be read: the choices marked *inferred* in docs/mixedae.md
are options, with defaults chosen by the measurements there. ``mixing.naive=true`` is the
paper's motivating baseline: mixing with ordinary attention, no segment embeddings, no
recognition or contrastive term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from siamae.config import DecoderConfig, MixingConfig
from siamae.data.image_folder import normalize
from siamae.data.mixing import (
    GroupPartition,
    UnmixIndex,
    group_partition,
    heldout_images,
    heldout_partitions,
    mix_images,
    unmix_index,
    unmix_latent,
)
from siamae.errors import SiamaeError
from siamae.methods.base import (
    Batch,
    EvalRequest,
    Method,
    MethodOutput,
    Reconstruction,
    denormalize,
    encoder_from_config,
    paste_prediction,
)
from siamae.methods.mae import MAE, mae_decoder
from siamae.models.decoder import MAEDecoder
from siamae.models.homologous import (
    homologous_block,
    homologous_precision,
)
from siamae.models.losses import (
    homologous_contrastive_loss,
    homologous_mass_loss,
    masked_mse,
    pixel_targets,
)
from siamae.models.vit import VIT_SIZES, Encoder
from siamae.optim import param_groups
from siamae.options import option_error

if TYPE_CHECKING:
    from siamae.config import Config

SEGMENT_PLACES = ("encoder", "decoder", "none")
CONTRASTIVE_PLACES = ("head", "final")  # or an encoder block's index
HEAD_DIM = 128  # output width of the contrastive projection head (SimCLR's)
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


def default_topk(num_patches: int, ratio: int, cls_key: bool = True) -> int:
    """k = ceil((N + 1) / R): as many keys as one source supplies, plus one (50 at N=196, R=4);
    N / R when the CLS is not among the patch queries' keys."""
    return math.ceil((num_patches + 1) / ratio) if cls_key else num_patches // ratio


def parse_contrastive_features(value: str | int, depth: int) -> str | int:
    """``"head"``, ``"final"`` or an encoder block index (its output tokens) -> the place.

    Raises ValueError naming what is wrong (check_config turns it into a ConfigError).
    """
    text = str(value).strip().lower()
    if text in CONTRASTIVE_PLACES:
        return text
    try:
        block = int(text)
    except ValueError:
        raise ValueError(
            f"expected 'head', 'final' or an encoder block index, got {value!r}"
        ) from None
    if not 0 <= block < depth:
        raise ValueError(f"block index must be in 0..{depth - 1}, got {value!r}")
    return block


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


@dataclass
class Recognition:
    """What one pass of the encoder over mixed images says about homologous recognition.

    ``precision`` / ``mass``: per measured block, the share of the kept (top-k) keys from the
    query's own image and the soft homologous mass (detached); ``attention_loss``: the mean
    recognition loss of the loss blocks (with gradient), None without loss blocks;
    ``features``: the patch tokens after the block the contrastive term reads, when it reads one.
    """

    precision: dict[int, torch.Tensor] = field(default_factory=dict)
    mass: dict[int, torch.Tensor] = field(default_factory=dict)
    attention_loss: torch.Tensor | None = None
    features: torch.Tensor | None = None

    def logs(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """``homologous_precision`` (mean over the measured blocks), one per block, and
        ``homologous_mass`` (mean over the same blocks)."""
        if not self.precision:
            return {}
        out = {f"{prefix}homologous_precision": torch.stack(list(self.precision.values())).mean()}
        out.update({f"{prefix}homologous_precision/block{i}": v for i, v in self.precision.items()})
        out[f"{prefix}homologous_mass"] = torch.stack(list(self.mass.values())).mean()
        return out


@dataclass(frozen=True)
class HeldoutSet:
    """A fixed set of images and partitions for the homologous figures (``mixing.homology_*``)."""

    path: str
    count: int = 64
    seed: int = 0


class MixedAE(Method):
    """Mixed autoencoder: one mixed image per group of R, homologous attention and recognition.

    ``batch["images"]``: (B, 1, 3, H, W), B a multiple of R; ``batch["mask_noise"]``: (B, N),
    the group's partition is made from its first sample's noise.

    >>> import siamae
    >>> model = siamae.create_method("mixedae", "vit_tiny_patch16_224", img_size=32, patch_size=8)
    >>> model.ratio  # images mixed into one; a batch holds whole groups of them
    4
    """

    name = "mixedae"
    num_views = 1
    view_kind = "single"
    config_sections = {"mixing": MixingConfig, "decoder": DecoderConfig}
    # Evaluates: the held-out homologous figures at every epoch's end, no best checkpoint.
    best_metric: str | None = None
    eval_every_steps: int | None = None

    def __init__(
        self,
        encoder: Encoder,
        decoder: MAEDecoder,
        ratio: int = 4,
        topk: int | None = None,
        topk_blocks: tuple[int, ...] | None = None,
        segment_embed: str = "none",
        segment_init_std: float | None = None,
        contrastive_weight: float = 0.0,
        temperature: float = 0.1,
        contrastive_features: str | int = "head",
        attention_loss_weight: float = 1.0,
        attention_loss_blocks: tuple[int, ...] | None = None,
        cls_key: bool = True,
        norm_pix_loss: bool = True,
        heldout: HeldoutSet | None = None,
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
        self.cls_key = cls_key
        self.topk = default_topk(n, ratio, cls_key) if topk is None else topk
        every_block = tuple(range(encoder.depth))
        self.topk_blocks = every_block if topk_blocks is None else topk_blocks
        self.attention_loss_weight = attention_loss_weight
        self.attention_loss_blocks = (
            every_block if attention_loss_blocks is None else attention_loss_blocks
        )
        if attention_loss_weight == 0:
            self.attention_loss_blocks = ()
        self.segment_place = segment_embed
        self.contrastive_weight = contrastive_weight
        self.temperature = temperature
        self.contrastive_features = contrastive_features
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = 1 - 1 / ratio  # the share each image does not supply (for pictures)
        self.heldout = heldout
        self._heldout_pixels: torch.Tensor | None = None
        # A learned vector per source slot, held by the method (not the ViT): the encoder's
        # state dict stays a plain timm ViT and evaluation never sees segment embeddings.
        if segment_embed == "none":
            self.segment_embed = None
        else:
            if segment_embed == "encoder":
                dim, positions = encoder.embed_dim, encoder.vit.pos_embed
            else:
                dim, positions = decoder.dim, decoder.pos_embed
            # At the position embedding's scale (0.71 for sin-cos), so that the vectors are
            # visible next to the tokens they are added to; 0.02 left them inert (docs).
            std = float(positions[0, 1:].std()) if segment_init_std is None else segment_init_std
            self.segment_embed = nn.Parameter(torch.empty(ratio, dim))
            nn.init.normal_(self.segment_embed, std=std)
        # The contrastive term reads a projection head, never the tokens the decoder reads.
        self.contrastive_head = None
        if contrastive_features == "head" and contrastive_weight > 0:
            d = encoder.embed_dim
            self.contrastive_head = nn.Sequential(
                nn.Linear(d, d), nn.GELU(), nn.Linear(d, HEAD_DIM)
            )

    @property
    def measured_blocks(self) -> tuple[int, ...]:
        """The blocks whose homologous figures are logged: top-k blocks and loss blocks."""
        return tuple(sorted(set(self.topk_blocks) | set(self.attention_loss_blocks)))

    # -- config --------------------------------------------------------------------------------
    @classmethod
    def published_defaults(cls, cfg: Config) -> dict[str, Any]:
        # MAE's recipe (decoder, crop area, bicubic crops); each image supplies 1/R of the grid,
        # so the masking ratio is 1 - 1/R (0.75 at R=4, MAE's): set by mixing.ratio, no field.
        defaults = MAE.published_defaults(cfg)
        defaults.pop(MAE.name)
        return defaults

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        m = cfg.section(MixingConfig)
        r = m.ratio

        n = (cfg.model.img_size // cfg.model.patch_size) ** 2
        depth = _depth(cfg)
        if r < 2:
            raise option_error("mixing.ratio", f"expected 2 or more images mixed into one, got {r}")
        if n % r or n // r < 2:
            raise option_error(
                "mixing.ratio",
                f"the {n} patches of a {cfg.model.img_size}px image (patch "
                f"{cfg.model.patch_size}) must split into {r} equal sets of 2 or more",
            )
        if cfg.data.batch_size % r:
            raise option_error(
                "data.batch_size",
                f"{cfg.data.batch_size} is not a multiple of mixing.ratio={r}: MixedAE mixes "
                f"groups of {r} images of each device's batch; use e.g. "
                f"{max(r, cfg.data.batch_size // r * r)}",
            )
        if cfg.data.repeated_sampling != 1:
            raise option_error(
                "data.repeated_sampling",
                "MixedAE mixes different images; repeated samples of one image cannot be mixed",
            )
        keys = n + 1 if m.cls_key else n
        if m.topk is not None and not 1 <= m.topk <= keys:
            raise option_error(
                "mixing.topk",
                f"expected 1 <= k <= {keys} (the keys a patch query may attend), got {m.topk}",
            )
        for name in ("topk_blocks", "attention_loss_blocks"):
            try:
                parse_topk_blocks(getattr(m, name), depth)
            except ValueError as err:
                raise option_error(f"mixing.{name}", str(err)) from None
        try:
            parse_contrastive_features(m.contrastive_features, depth)
        except ValueError as err:
            raise option_error("mixing.contrastive_features", str(err)) from None
        if m.temperature <= 0:
            raise option_error(
                "mixing.temperature", f"expected a positive number, got {m.temperature}"
            )
        for name in ("contrastive_weight", "attention_loss_weight"):
            if getattr(m, name) < 0:
                raise option_error(f"mixing.{name}", f"expected 0 or more, got {getattr(m, name)}")
        if m.segment_init_std is not None and m.segment_init_std <= 0:
            raise option_error(
                "mixing.segment_init_std",
                f"expected a positive std (or null: the position embedding's), got "
                f"{m.segment_init_std}",
            )
        if m.homology_data is not None:
            if not Path(m.homology_data).exists():
                raise option_error(
                    "mixing.homology_data",
                    f"{m.homology_data!r} does not exist; give a folder (or list file) of "
                    "held-out images, or null",
                )
            if m.homology_images < r:
                raise option_error(
                    "mixing.homology_images",
                    f"expected at least {r} images (one group of mixing.ratio), got "
                    f"{m.homology_images}",
                )

    @classmethod
    def from_config(cls, cfg: Config) -> MixedAE:
        encoder = encoder_from_config(cfg)
        decoder = mae_decoder(cfg, encoder)
        m = cfg.section(MixingConfig)
        heldout = (
            HeldoutSet(m.homology_data, m.homology_images, m.homology_seed)
            if m.homology_data is not None
            else None
        )
        if m.naive:
            # The paper's motivation: mixing alone (ordinary attention, no segments, no
            # recognition or contrastive term).
            return cls(
                encoder,
                decoder,
                m.ratio,
                topk_blocks=(),
                segment_embed="none",
                contrastive_weight=0.0,
                temperature=m.temperature,
                contrastive_features="final",
                attention_loss_weight=0.0,
                norm_pix_loss=m.norm_pix_loss,
                heldout=heldout,
            )
        return cls(
            encoder,
            decoder,
            m.ratio,
            topk=m.topk,
            topk_blocks=parse_topk_blocks(m.topk_blocks, encoder.depth),
            segment_embed=m.segment_embed,
            segment_init_std=m.segment_init_std,
            contrastive_weight=m.contrastive_weight,
            temperature=m.temperature,
            contrastive_features=parse_contrastive_features(m.contrastive_features, encoder.depth),
            attention_loss_weight=m.attention_loss_weight,
            attention_loss_blocks=parse_topk_blocks(m.attention_loss_blocks, encoder.depth),
            cls_key=m.cls_key,
            norm_pix_loss=m.norm_pix_loss,
            heldout=heldout,
        )

    def param_groups(self, weight_decay: float, no_decay_tokens: bool = False) -> list[dict]:
        # Segment embeddings are a table of per-slot vectors, like position embeddings: decay
        # would pull them towards zero, where they are inert.
        return param_groups(self, weight_decay, no_decay_tokens, exempt=("segment_embed",))

    # -- the model -----------------------------------------------------------------------------
    def partition(self, batch: Batch) -> GroupPartition:
        images = batch["images"]
        noise = batch.get("mask_noise")
        if noise is None:
            noise = torch.rand(images.shape[0], self.encoder.num_patches, device=images.device)
        return group_partition(noise, self.ratio)

    def encode_mixed(
        self,
        images: torch.Tensor,
        part: GroupPartition,
        measure_blocks: tuple[int, ...] | None = None,
    ) -> tuple[torch.Tensor, Recognition]:
        """(B, 3, H, W) sources -> (G, 1 + N, E) encoded mixed sequences (after the final norm)
        and what the pass says about recognition.

        Top-k blocks run homologous attention, loss blocks give the recognition loss, and the
        measured blocks (default :attr:`measured_blocks`) their precision and homologous mass;
        a measured block without top-k keeps its ordinary attention, and its precision is that
        of the k keys a top-k would keep. Every other block runs timm's fused attention.
        """
        measure = self.measured_blocks if measure_blocks is None else measure_blocks
        mixed = mix_images(images, part, self.encoder.patch_size)
        tokens, cls, _ = self.encoder.embed(mixed)
        if self.segment_place == "encoder":
            tokens = tokens + self.segment_embed[part.source_of].to(tokens.dtype)
        x = torch.cat([cls, tokens], dim=1)
        rec = Recognition()
        losses = []
        for i, block in enumerate(self.encoder.vit.blocks):
            in_loss = i in self.attention_loss_blocks
            if i in self.topk_blocks or in_loss or i in measure:
                x, logits, kept = homologous_block(
                    block, x, self.topk if i in self.topk_blocks else None, self.cls_key
                )
                if in_loss:
                    loss, mass = homologous_mass_loss(logits, part.source_of, self.cls_key)
                    losses.append(loss)
                if i in measure:
                    with torch.no_grad():
                        if kept is None:
                            kept = _topk_keys(logits, self.topk, self.cls_key)
                        rec.precision[i] = homologous_precision(kept, part.source_of)
                        if not in_loss:
                            _, mass = homologous_mass_loss(logits, part.source_of, self.cls_key)
                        rec.mass[i] = mass
            else:
                x = block(x)
            if self.contrastive_features == i:
                rec.features = x[:, 1:]
        if losses:
            rec.attention_loss = torch.stack(losses).mean()
        return self.encoder.vit.norm(x), rec

    def decode(self, latent: torch.Tensor, index: UnmixIndex) -> torch.Tensor:
        """Unmixing: (G, 1 + N, E) -> (B, N, p*p*3), one decoder sequence per source image."""
        x = self.decoder.queries(unmix_latent(latent, index), index.ids_restore)
        if self.segment_place == "decoder":
            # Tells the decoder which slot it unmixes (every token of that sequence).
            x = x + self.segment_embed[index.slot].unsqueeze(1).to(x.dtype)
        for block in self.decoder.blocks:
            x = block(x)
        return self.decoder.predict(x)

    def _run(self, batch: Batch) -> dict[str, Any]:
        images = batch["images"][:, 0]
        part = self.partition(batch)
        latent, rec = self.encode_mixed(images, part)
        index = unmix_index(part)
        pred = self.decode(latent, index)
        return {
            "images": images,
            "part": part,
            "index": index,
            "latent": latent,
            "pred": pred,
            "recognition": rec,
        }

    def contrastive_tokens(self, latent: torch.Tensor, rec: Recognition) -> torch.Tensor:
        """The (G, N, D') patch features the contrastive term compares."""
        if self.contrastive_features == "final":
            return latent[:, 1:]
        if self.contrastive_features == "head":
            if self.contrastive_head is None:  # weight 0: logged on the final tokens
                return latent[:, 1:]
            return self.contrastive_head(latent[:, 1:])
        assert rec.features is not None
        return rec.features

    def forward(self, batch: Batch) -> MethodOutput:
        run = self._run(batch)
        rec: Recognition = run["recognition"]
        target = pixel_targets(run["images"], self.encoder.patch_size, self.norm_pix_loss)
        recon = masked_mse(run["pred"], target, run["index"].mask)
        loss = recon
        logs = {"loss_recon": recon.detach()}
        source_of = run["part"].source_of
        if self.contrastive_weight > 0:
            features = self.contrastive_tokens(run["latent"], rec)
            contrast = homologous_contrastive_loss(features, source_of, self.temperature)
            loss = loss + self.contrastive_weight * contrast
        else:
            with torch.no_grad():  # logged for comparison (naive mixing), no gradient
                contrast = homologous_contrastive_loss(
                    run["latent"][:, 1:], source_of, self.temperature
                )
        logs["loss_contrast"] = contrast.detach()
        if rec.attention_loss is not None:
            loss = loss + self.attention_loss_weight * rec.attention_loss
            logs["loss_attention"] = rec.attention_loss.detach()
        logs.update(rec.logs())
        return MethodOutput(loss, logs)

    # -- held-out homologous figures -------------------------------------------------------------
    @torch.no_grad()
    def homology(
        self,
        pixels: torch.Tensor,
        noise: torch.Tensor,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        blocks: tuple[int, ...] | None = None,
    ) -> dict[str, float]:
        """Homologous precision (mean and per block) and mass on fixed images and partitions.

        Args:
            pixels: uint8 (M, 3, S, S), M a multiple of R; groups of R consecutive images.
            noise: (M, N) the partition noise (:func:`~siamae.data.mixing.heldout_partitions`).
            blocks: the blocks to measure (default: :attr:`measured_blocks`, or every block for
                a model with none, such as naive mixing).
        Returns:
            ``homologous_precision``, ``homologous_precision/block{i}``, ``homologous_mass``.
        """
        if blocks is None:
            blocks = self.measured_blocks or tuple(range(self.encoder.depth))
        batch_size = max(self.ratio, batch_size // self.ratio * self.ratio)
        was_training = self.training
        self.eval()
        sums: dict[str, float] = {}
        groups = 0
        try:
            for start in range(0, pixels.shape[0], batch_size):
                images = normalize(pixels[start : start + batch_size], device)
                part = group_partition(noise[start : start + batch_size].to(device), self.ratio)
                _, rec = self.encode_mixed(images, part, measure_blocks=blocks)
                g = part.source_of.shape[0]  # every group weighs the same in every mean
                for key, value in rec.logs().items():
                    sums[key] = sums.get(key, 0.0) + float(value) * g
                groups += g
        finally:
            self.train(was_training)
        return {key: value / groups for key, value in sums.items()}

    def evaluate(self, request: EvalRequest) -> dict[str, float] | None:
        """The held-out homologous figures (``mixing.homology_data``), prefixed ``heldout_``."""
        if self.heldout is None:
            return None
        if self._heldout_pixels is None:  # decoded once, kept as uint8
            self._heldout_pixels = heldout_images(
                self.heldout.path, self.encoder.img_size, self.heldout.count, self.ratio
            )
        pixels = self._heldout_pixels
        noise = heldout_partitions(
            pixels.shape[0], self.encoder.num_patches, self.ratio, self.heldout.seed
        )
        figures = self.homology(pixels, noise, request.device)
        return {f"heldout_{key}": value for key, value in figures.items()}

    # -- pictures ------------------------------------------------------------------------------
    def _whole_groups(self, batch: Batch) -> dict[str, torch.Tensor] | None:
        b = batch["images"].shape[0] // self.ratio * self.ratio
        if b == 0:
            return None
        return {k: v[:b] for k, v in batch.items() if torch.is_tensor(v)}

    @torch.no_grad()
    def reconstruct(self, batch: Batch) -> Reconstruction:
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
    def picture(self, batch: Batch) -> list[tuple[str, torch.Tensor]] | None:
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


def _topk_keys(logits: torch.Tensor, k: int, cls_key: bool) -> torch.Tensor:
    """The (B, H, L, k) keys a top-k would keep from ordinary-attention logits."""
    if not cls_key:
        logits = logits.clone()
        logits[:, :, 1:, 0] = float("-inf")
    return logits.topk(k, dim=-1).indices


def _depth(cfg: Config) -> int:
    return VIT_SIZES[cfg.model.arch].depth
