"""Semantic-segmentation fine-tuning (UperNet, the BEiT/MAE protocol) as a method of the one engine.

The encoder is built as for classification fine-tuning (``segmentation.checkpoint``: anything
``load_encoder`` reads, its position grid resampled to ``model.img_size``, the crop size; null:
random init), its position embedding made trainable. Blocks ``segmentation.out_indices``
(3, 5, 7, 11 at depth 12) feed the multi-scale neck, the UperNet head and the auxiliary FCN
head (:mod:`siamae.models.upernet`). The final norm is not used (BEiT takes the block outputs)
and is frozen, so the encoder's state dict stays timm's whole ViT and exports as one.

Loss: cross-entropy of the decode logits upsampled (bilinear) to the label size, plus
``aux_weight`` (0.4) x that of the auxiliary logits; ignored pixels (255) left out, the mean
taken over labelled pixels. Optimizer groups: the classification fine-tuning's layer decay on
the ViT (:func:`siamae.finetune.layer_decay.layer_decay_groups`), the neck and heads at lr scale 1
(no weight decay on 1-D tensors). The norms of neck and heads are batch norms synchronised
across processes (SyncBN in the recipe; :class:`SyncBatchNorm2d` also runs on CPU/gloo).

Evaluation: every ``eval_every_steps`` (at the next epoch end) and at the end, on the whole
validation split, sliding windows (crop ``model.img_size``, stride ``eval_stride``) over images
resized into ``scale``; the last one also writes ``<run>/segmentation/``: ``summary.json``,
``pred/<stem>.png`` and ``pictures.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from siamae.config import SegmentationConfig
from siamae.data.segmentation import (
    IGNORE_INDEX,
    SegmentationSet,
    SegmentationViews,
    open_segmentation,
)
from siamae.finetune.classification import build_encoder
from siamae.finetune.command import encoder_and_out_overrides
from siamae.finetune.layer_decay import layer_decay_groups
from siamae.methods.base import Batch, EvalRequest, Method, MethodOutput
from siamae.methods.siameseim import TokenBatchNorm
from siamae.models.upernet import UperNet, block_features, default_out_indices
from siamae.models.vit import Encoder
from siamae.optim import param_groups
from siamae.options import check, option_error
from siamae.segmentation_scores import InferenceConfig, evaluate_segmentation
from siamae.world import world_size

if TYPE_CHECKING:
    from siamae.config import Config

METHOD_NAME = "segmentation"
RESULTS_DIR = METHOD_NAME  # the engine hands the last evaluation <run>/<method name>/


class SyncBatchNorm2d(TokenBatchNorm):
    """BatchNorm2d whose statistics are those of every pixel of every process (SyncBN), on CPU
    (gloo) as on GPU; parameter and buffer names are BatchNorm2d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels of the global batch (0 when it has none).

    Under DDP each process divides its sum by the global count / world size, so the average
    DDP takes of the processes' losses is the mean over all labelled pixels, exactly as one
    process with the whole batch computes it (a mean of per-process means would weigh the
    processes' pixels unequally)."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (labels != IGNORE_INDEX).sum().to(total.dtype)
    world = world_size()
    if world > 1:
        count = count.clone()
        dist.all_reduce(count)
        count = count / world
    return total / count.clamp(min=1)


def _upsample(logits: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class SegmentationFineTune(Method):
    """Encoder + UperNet trained on a segmentation data set; mIoU on its validation split."""

    name = METHOD_NAME
    num_views = 1
    view_kind = "segmentation"
    config_sections = {"segmentation": SegmentationConfig}
    # Evaluates: mIoU on the validation split every eval_every_steps; best.pt by mIoU.
    best_metric: str | None = "mIoU"
    # The evaluation clock before the engine kept it (a resume of such a run drops them).
    retired_tensors = frozenset({"steps_done", "total_steps", "eval_due"})

    @classmethod
    def progress_label(cls) -> str:
        return "segmentation fine-tuning"

    def __init__(self, encoder: Encoder, train_set: SegmentationSet, cfg: Config) -> None:
        super().__init__()
        s = cfg.segmentation
        self.encoder = encoder
        self.class_names = list(train_set.class_names)
        self.num_classes = train_set.num_classes
        # The training split's images without a mask and listed names that are missing: the
        # engine lists them in skipped_files.txt and counts them, as the val split's are in
        # summary.json (a model read back from a file has no training split: nothing).
        self.skipped_at_start: list[str] = list(getattr(train_set, "unpaired", []))
        self.out_indices = tuple(s.out_indices or default_out_indices(encoder.depth))
        self.head = UperNet(
            encoder.embed_dim,
            self.num_classes,
            channels=s.channels,
            aux_channels=s.aux_channels,
            dropout=s.dropout,
            norm_layer=SyncBatchNorm2d,
        )
        self.aux_weight = s.aux_weight
        self.layer_decay = cfg.segmentation.layer_decay
        self.eval_every_steps: int | None = s.eval_every_steps
        self.inference = InferenceConfig(
            scale=tuple(s.scale), mode=s.eval_mode, crop=cfg.model.img_size, stride=s.eval_stride
        )
        self.val_root = s.val or cfg.data.path
        self.val_args = (s.val_split, s.layout, s.num_classes)
        self.pictures = s.pictures
        self._val: SegmentationSet | None = None

    # -- config ---------------------------------------------------------------------------------
    @classmethod
    def published_defaults(cls, cfg: Config) -> dict[str, Any]:
        return {"global_scale": (0.08, 1.0), "interpolation": "bilinear"}

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        s = cfg.section(SegmentationConfig)

        check(
            cfg.data.source == "images" and cfg.data.path is not None,
            "data.source",
            "segmentation reads a data set folder (ADE20K, VOC, images/+masks/); pass --data DIR",
        )
        if s.checkpoint is not None:
            check(
                Path(s.checkpoint).exists(),
                "segmentation.checkpoint",
                f"{s.checkpoint!r} does not exist; pass the pre-trained encoder's checkpoint, "
                "run folder or export (null: random initialisation)",
            )
        if s.val is not None:
            check(Path(s.val).is_dir(), "segmentation.val", f"{s.val!r} is not a folder")
        check(
            0 < s.layer_decay <= 1,
            "segmentation.layer_decay",
            f"expected 0 < d <= 1, got {s.layer_decay}",
        )
        check(
            min(s.scale) > 0,
            "segmentation.scale",
            f"expected two positive sizes, got {list(s.scale)}",
        )
        check(
            0 < s.ratio_range[0] <= s.ratio_range[1],
            "segmentation.ratio_range",
            f"expected 0 < min <= max, got {list(s.ratio_range)}",
        )
        check(
            0 < s.cat_max_ratio <= 1,
            "segmentation.cat_max_ratio",
            f"expected 0 < r <= 1, got {s.cat_max_ratio}",
        )
        check(
            s.aux_weight >= 0, "segmentation.aux_weight", f"expected 0 or more, got {s.aux_weight}"
        )
        check(0 <= s.dropout < 1, "segmentation.dropout", f"expected 0 <= p < 1, got {s.dropout}")
        check(
            s.channels >= 1 and s.aux_channels >= 1, "segmentation.channels", "expected 1 or more"
        )
        check(
            s.eval_stride >= 1,
            "segmentation.eval_stride",
            f"expected 1 or more, got {s.eval_stride}",
        )
        check(
            s.eval_every_steps >= 1,
            "segmentation.eval_every_steps",
            f"expected 1 or more, got {s.eval_every_steps}",
        )
        if s.num_classes is not None:
            check(
                s.num_classes >= 2,
                "segmentation.num_classes",
                f"expected 2 or more, got {s.num_classes}",
            )
        if s.out_indices is not None:
            check(
                list(s.out_indices) == sorted(set(s.out_indices)) and min(s.out_indices) >= 0,
                "segmentation.out_indices",
                f"expected 4 increasing block indices, got {list(s.out_indices)}",
            )
        check(
            cfg.data.repeated_sampling == 1,
            "data.repeated_sampling",
            "segmentation samples each image once per epoch; set it to 1",
        )

    @classmethod
    def build_views(cls, cfg: Config) -> SegmentationViews:
        s = cfg.segmentation
        return SegmentationViews(
            cfg.model.img_size,
            tuple(s.scale),
            tuple(s.ratio_range),
            s.cat_max_ratio,
            cfg.data.hflip,
            s.photometric,
        )

    @classmethod
    def build_source(
        cls, cfg: Config, cache_dir: str | None = None, run_dir: str | None = None
    ) -> SegmentationSet:
        s = cfg.segmentation
        return open_segmentation(cfg.data.path, s.train_split, s.layout, s.num_classes)

    @classmethod
    def from_config(cls, cfg: Config) -> SegmentationFineTune:
        train_set = cls.build_source(cfg)
        encoder = build_encoder(cfg, cfg.segmentation.checkpoint, "segmentation.checkpoint")
        indices = cfg.segmentation.out_indices
        if indices is not None and max(indices) >= encoder.depth:
            raise option_error(
                "segmentation.out_indices",
                f"{list(indices)} but the encoder has "
                f"{encoder.depth} blocks (0..{encoder.depth - 1})",
            )
        encoder.vit.pos_embed.requires_grad_(True)  # trained, as in MAE's segmentation code
        encoder.vit.norm.requires_grad_(False)  # unused: the neck takes the blocks' outputs
        return cls(encoder, train_set, cfg)

    # -- training -------------------------------------------------------------------------------
    def logits(
        self, images: torch.Tensor, with_aux: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # (decode, aux)
        return self.head(block_features(self.encoder, images, self.out_indices), with_aux)

    def forward(self, batch: Batch) -> MethodOutput:
        images = batch["images"][:, 0]
        labels = batch["label"].long()
        decode, aux = self.logits(images)
        decode = _upsample(decode, labels.shape[-2:])
        decode_loss = masked_cross_entropy(decode, labels)
        aux_loss = masked_cross_entropy(_upsample(aux, labels.shape[-2:]), labels)
        labelled = labels != IGNORE_INDEX
        correct = ((decode.argmax(1) == labels) & labelled).sum()
        return MethodOutput(
            decode_loss + self.aux_weight * aux_loss,
            {
                "decode_loss": decode_loss.detach(),
                "aux_loss": aux_loss.detach(),
                "train_pixel_acc": (correct / labelled.sum().clamp(min=1)).detach().float(),
            },
        )

    def param_groups(self, weight_decay: float, no_decay_tokens: bool = False) -> list[dict]:
        """The encoder's layer-decay groups, then the neck and heads (decayed conv weights,
        undecayed biases and norms) at lr scale 1."""
        heads = [dict(g, lr_scale=1.0) for g in param_groups(self.head, weight_decay)]
        encoder = layer_decay_groups(
            self.encoder, weight_decay, self.layer_decay, head_outside=True
        )
        return encoder + heads

    # -- evaluation -----------------------------------------------------------------------------
    def val_set(self) -> SegmentationSet:
        if self._val is None:
            split, layout, num_classes = self.val_args
            self._val = open_segmentation(self.val_root, split, layout, num_classes)
            if self._val.num_classes != self.num_classes:
                raise option_error(
                    "segmentation.val",
                    f"{self._val.num_classes} classes there, "
                    f"{self.num_classes} in the training set",
                )
        return self._val

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) normalised -> (B, C, h, w) logits (decode head, no auxiliary)."""
        decode, _ = self.logits(images, with_aux=False)
        return _upsample(decode, images.shape[-2:])

    @torch.no_grad()
    def evaluate(self, request: EvalRequest) -> dict[str, float] | None:
        """mIoU, mAcc and aAcc on the validation split; the last evaluation also writes its
        predictions, ``summary.json`` and pictures into ``request.results_dir``."""
        was_training = self.training
        self.eval()
        try:
            summary = evaluate_segmentation(
                self.segment,
                self.val_set(),
                request.device,
                self.inference,
                self.encoder.patch_size,
                out_dir=request.results_dir if request.final else None,
                pictures=self.pictures,
                title=f"UperNet, step {request.step}",
                extra={"protocol": "UperNet fine-tuning", "step": request.step},
            )
        finally:
            self.train(was_training)
        return {"mIoU": summary["mIoU"], "mAcc": summary["mAcc"], "aAcc": summary["aAcc"]}


# -- the command line -----------------------------------------------------------------------------


def command_overrides(
    data: str | None, val: str | None, checkpoint: str | None, out: str | None
) -> list[str]:
    """What ``siamae finetune``'s own flags set, for segmentation: a layer of overrides below
    ``--set`` (:func:`siamae.recipes.load_config`)."""
    overrides = [f"method={METHOD_NAME}"]
    if data is not None:
        overrides += ["data.source=images", f"data.path={data}"]
    if val is not None:
        overrides.append(f"segmentation.val={val}")
    return overrides + encoder_and_out_overrides(checkpoint, out, METHOD_NAME)
