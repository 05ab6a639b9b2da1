"""Full fine-tuning of a pre-trained encoder (the MAE/BEiT protocol), as a method of the one engine.

The classifier is the encoder's own timm ViT with timm's classifier pieces switched on:
global average pooling of the patch tokens, ``fc_norm`` (LayerNorm) and ``head`` (Linear,
trunc-normal init with std ``head_init``), the pre-trained final ``norm`` dropped, as MAE's
fine-tuning does; or, with ``global_pool: false``, the CLS token after the final norm. Its
``state_dict`` therefore has exactly the key names of ``timm.create_model(name, num_classes=C,
global_pool="avg")``, which is what lets the fine-tuned model export to timm with its head.

The recipe pieces are timm's: RandAugment and the crop/flip pipeline (``create_transform``, in
:mod:`siamae.data.labelled`), ``RandomErasing`` (on the device, per sample), ``Mixup`` (mixup
0.8 / cutmix 1.0 with the switch, label smoothing inside the targets), ``SoftTargetCrossEntropy``
or ``LabelSmoothingCrossEntropy``, layer-wise lr decay groups (``param_groups_layer_decay``,
carried to the engine as each group's ``lr_scale``), ``ModelEmaV3``. Drop-path is the encoder's
``model.drop_path``. Training itself (AdamW, warmup + cosine, lr x batch / 256, DDP, AMP,
accumulation, checkpoints, exact resume) is the engine's.

Determinism. Every random choice is a function of (seed, epoch, index) or (seed, step):
the augmentations and the erasing of a sample come from its own seeds; mixup/cutmix draws its
lambda, its mixup-or-cutmix switch and its box once per optimizer step from (seed, step), and
pairs sample 2k with 2k + 1. A global batch is cut into per-process batches of whole pairs, so
two processes with batch B mix exactly as one process with batch 2B, and a resumed run mixes
as an uninterrupted one. (timm's Mixup flips the batch to find partners; the batch is reordered
so that the flip partners are adjacent pairs, then put back in order.) Drop-path masks are the
one thing drawn per process.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from siamae.config import FinetuneConfig
from siamae.data.image_folder import (
    EvalTransform,
    ImageFolder,
    loader,
    normalize,
    validation_folder,
)
from siamae.data.labelled import (
    LabelledViews,
    folder_classes,
    labelled_source,
    seeded_global_rngs,
)
from siamae.data.shards import is_shard_spec
from siamae.data.sources import Source
from siamae.data.views import MakesViews
from siamae.finetune.heads import classify, make_classifier
from siamae.finetune.layer_decay import layer_decay_groups
from siamae.loading import load_encoder
from siamae.methods.base import Batch, EvalRequest, Method, MethodOutput
from siamae.models.vit import VIT_SIZES, Encoder
from siamae.options import check, option_error
from siamae.world import rank_and_world_size

if TYPE_CHECKING:
    from timm.data.random_erasing import RandomErasing

    from siamae.config import Config

METHOD_NAME = "finetune"


# -- the classifier ---------------------------------------------------------------------------


def _resample_positions(state: dict[str, torch.Tensor], encoder: Encoder, old_grid: int) -> None:
    """Resample the checkpoint's position embedding to the fine-tuning grid (bicubic, as MAE's
    ``interpolate_pos_embed``)."""
    from timm.layers import resample_abs_pos_embed

    if old_grid != encoder.grid_size:
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"],
            new_size=[encoder.grid_size, encoder.grid_size],
            old_size=[old_grid, old_grid],
            num_prefix_tokens=1,
        )


def build_encoder(cfg: Config, path: str | None, field_name: str) -> Encoder:
    """The encoder to fine-tune: checkpoint ``path`` (the task's field ``field_name``) loaded
    (anything ``load_encoder`` reads), or a random initialisation when it is null.
    ``model.*`` must describe it."""
    m = cfg.model
    if path is None:
        return Encoder(m.arch, m.patch_size, m.img_size, m.drop_path)

    pre = load_encoder(path)
    if os.environ.get("RANK", "0") == "0":  # what matched, as every command reports it
        print(pre.load_report.summary())  # type: ignore[attr-defined]
    if pre.arch != m.arch or pre.patch_size != m.patch_size:
        raise option_error(
            "model.arch",
            f"{field_name} {path!r} holds a {pre.arch} patch "
            f"{pre.patch_size} encoder, the config says {m.arch} patch {m.patch_size}; set "
            f"model.arch={pre.arch} model.patch_size={pre.patch_size}",
        )
    size = VIT_SIZES[m.arch]
    dims = {
        k: v
        for k, v in (
            ("depth", pre.depth),
            ("embed_dim", pre.embed_dim),
            ("num_heads", pre.num_heads),
        )
        if v != getattr(size, k)
    }
    # The pre-trained layout (with or without a final norm) is kept; make_classifier then
    # puts a fresh fc_norm after pooling either way, as the published fine-tuning does.
    encoder = Encoder(
        m.arch, m.patch_size, m.img_size, m.drop_path, final_norm=pre.final_norm, **dims
    )
    state = {k: v.clone() for k, v in pre.vit.state_dict().items()}
    _resample_positions(state, encoder, pre.grid_size)
    encoder.vit.load_state_dict(state, strict=True)
    encoder.load_report = pre.load_report  # type: ignore[attr-defined]
    return encoder


# -- batch augmentations on the device ----------------------------------------------------------


def pair_order(batch_size: int) -> torch.Tensor:
    """A permutation under which ``x.flip(0)`` pairs sample 2k with 2k + 1 (timm's batch-mode
    Mixup pairs position i with B - 1 - i)."""
    evens = torch.arange(0, batch_size, 2)
    return torch.cat([evens, (evens + 1).flip(0)])


def mix_batch(
    mixup: Any, images: torch.Tensor, labels: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Mixup`` on adjacent pairs, its random draws seeded by ``seed``. Returns (mixed
    images, soft targets (B, C) summing to 1), in the batch's order."""

    order = pair_order(images.shape[0]).to(images.device)
    with seeded_global_rngs(seed):
        mixed, targets = mixup(images[order], labels[order])
    inverse = torch.argsort(order)
    return mixed[inverse], targets[inverse]


def erase_per_sample(images: torch.Tensor, seeds: torch.Tensor, eraser: Any) -> torch.Tensor:
    """timm ``RandomErasing`` on each (normalised) image with the image's own seed: the same
    erasing whatever batch or process the sample lands in. The global generators are restored."""
    out = images.clone()
    device = images.device
    generator = (
        torch.cuda.default_generators[device.index or 0]
        if device.type == "cuda"
        else torch.default_generator
    )
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        py_state = random.getstate()
        try:
            for image, seed in zip(out, seeds.tolist()):
                random.seed(seed)
                generator.manual_seed(seed)
                eraser(image)
        finally:
            random.setstate(py_state)
    return out


# -- the method ------------------------------------------------------------------------------


class FineTune(Method):
    """Supervised fine-tuning of a pre-trained encoder on a labelled ImageFolder."""

    name = METHOD_NAME
    num_views = 1
    view_kind = "labelled"
    config_sections = {"finetune": FinetuneConfig}
    # Evaluates: top-1/top-5 on the validation folder at every epoch's end; best.pt by top-1.
    best_metric: str | None = "top1"
    eval_every_steps: int | None = None

    @classmethod
    def progress_label(cls) -> str:
        return "classification fine-tuning"

    def __init__(
        self,
        encoder: Encoder,
        classes: list[str],
        cfg: Config,
    ) -> None:
        super().__init__()
        f = cfg.finetune
        self.encoder = encoder
        self.classes = list(classes)
        self.num_classes = encoder.vit.num_classes
        self.layer_decay = f.layer_decay
        self.seed = cfg.run.seed
        self.val_path = f.val
        self.eval_crop_pct = f.eval_crop_pct
        self.eval_batch_size = f.eval_batch_size
        self.eval_workers = cfg.data.num_workers
        self.mixup = None
        if f.mixup > 0 or f.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=f.mixup,
                cutmix_alpha=f.cutmix,
                prob=f.mixup_prob,
                switch_prob=f.mixup_switch_prob,
                mode="batch",
                label_smoothing=f.smoothing,
                num_classes=self.num_classes,
            )
        self.smoothing = f.smoothing
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        # What MAE's fine-tuning picks: soft targets with mixup, else smoothing, else plain CE.
        self.soft_target_loss = SoftTargetCrossEntropy()
        self.hard_target_loss = (
            LabelSmoothingCrossEntropy(f.smoothing) if f.smoothing > 0 else nn.CrossEntropyLoss()
        )
        self.reprob = f.reprob
        self.eraser: Any = None  # timm RandomErasing, made for the device of the first batch
        self._eraser_device: torch.device | None = None
        self.ema = None
        if f.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.encoder, decay=f.ema_decay)
            self.ema.requires_grad_(False)
        # Optimizer steps done: the mixup draws of a step are seeded by it; a buffer so that a
        # resumed run (which restores it) mixes as an uninterrupted one.
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self._val: Any = None
        # The validation folder is scanned now, before any training: a class the training
        # folder lacks is refused, unreadable files are dropped and counted (as in training),
        # rather than found at the first evaluation, an epoch later.
        self.skipped_at_start: list[str] = []
        if self.val_path is not None:
            self.skipped_at_start = list(self._val_set().skipped)

    # -- config ---------------------------------------------------------------------------------
    @classmethod
    def published_defaults(cls, cfg: Config) -> dict[str, Any]:
        # MAE/BEiT fine-tuning: RandomResizedCrop area (0.08, 1), bicubic; no masking.
        return {"global_scale": (0.08, 1.0), "interpolation": "bicubic"}

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        _check_inputs(cfg)
        _check_values(cfg.finetune)
        _check_batches(cfg)
        f = cfg.finetune
        if f.aa is not None:
            try:
                cls.build_views(cfg)
            except Exception as err:  # timm raises assertion/key errors on a bad policy string
                raise option_error(
                    "finetune.aa",
                    f"{f.aa!r} is not a timm augmentation policy "
                    f"({type(err).__name__}: {err}); e.g. rand-m9-mstd0.5-inc1, or null for none",
                ) from None

    @classmethod
    def build_views(cls, cfg: Config) -> MakesViews:
        d = cfg.data
        return LabelledViews(
            cfg.model.img_size,
            auto_augment=cfg.finetune.aa,
            scale=tuple(d.global_scale),
            ratio=tuple(d.ratio),
            hflip=d.hflip,
            color_jitter=d.color_jitter or None,
            interpolation=d.interpolation or "bicubic",
        )

    @classmethod
    def build_source(
        cls, cfg: Config, cache_dir: str | None = None, run_dir: str | None = None
    ) -> Source:
        d = cfg.data
        return labelled_source(d.path, cache_dir, run_dir, cfg.run.progress, d.num_workers)

    @classmethod
    def from_config(cls, cfg: Config) -> FineTune:
        classes = folder_classes(cfg.data.path)
        if len(classes) < 2:
            raise option_error(
                "data.path",
                f"{str(cfg.data.path)!r} has one class folder "
                f"({classes[0]!r}); a classifier needs at least 2 classes: pass a folder with "
                "one sub-folder per class (DIR/<class>/<image>)",
            )
        num_classes = cfg.finetune.num_classes or len(classes)
        if num_classes < len(classes):
            raise option_error(
                "finetune.num_classes",
                f"{num_classes} classes, but {cfg.data.path!r} "
                f"has {len(classes)} class folders; raise it or leave it null",
            )
        encoder = build_encoder(cfg, cfg.finetune.checkpoint, "finetune.checkpoint")
        make_classifier(encoder, num_classes, cfg.finetune.global_pool, cfg.finetune.head_init)
        return cls(encoder, classes, cfg)

    # -- training -------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> MethodOutput:
        images = batch["images"][:, 0]
        labels = batch["label"].long()
        if self.training and self.reprob > 0:
            images = erase_per_sample(images, batch["erase_seed"], self._eraser(images.device))
        logs: dict[str, torch.Tensor] = {}
        if self.training and self.mixup is not None:
            step = int(self.steps_done)
            images, targets = mix_batch(self.mixup, images, labels, self.seed * 1_000_003 + step)
            logits = classify(self.encoder, images)
            loss = self.soft_target_loss(logits.float(), targets)
        else:
            logits = classify(self.encoder, images)
            loss = self.hard_target_loss(logits.float(), labels)
            logs["train_top1"] = (logits.argmax(-1) == labels).float().mean().detach()
        return MethodOutput(loss, logs)

    def _eraser(self, device: torch.device) -> RandomErasing:
        from timm.data.random_erasing import RandomErasing

        if self.eraser is None or self._eraser_device != device:
            # MAE/DeiT recipe: pixel mode (N(0, 1) noise in normalised units), one box.
            self.eraser = RandomErasing(self.reprob, mode="pixel", max_count=1, device=device)
            self._eraser_device = device
        return self.eraser

    def param_groups(self, weight_decay: float, no_decay_tokens: bool = False) -> list[dict]:
        """timm's layer-decay groups of the classifier: block i at ``d^(L + 1 - (i + 1))``, patch
        and position embedding and CLS at ``d^(L + 1)``, fc_norm and head at 1; no weight decay
        on 1-D tensors, the position embedding and CLS (timm's ``no_weight_decay``)."""
        return layer_decay_groups(self.encoder, weight_decay, self.layer_decay)

    def after_step(self, step: int, total_steps: int) -> None:
        self.steps_done.fill_(step)
        if self.ema is not None:
            self.ema.update(self.encoder, step=step)

    def ddp_ignored_names(self) -> list[str]:
        if self.ema is None:
            return []
        names = [f"ema.{n}" for n, _ in self.ema.named_parameters()]
        return names + [f"ema.{n}" for n, _ in self.ema.named_buffers()]

    # -- evaluation -----------------------------------------------------------------------------
    def _val_set(self) -> ImageFolder:
        if self._val is None:
            transform = EvalTransform(self.encoder.img_size, self.eval_crop_pct)
            self._val = validation_folder(self.val_path, transform, self.classes)
        return self._val

    @torch.no_grad()
    def evaluate(self, request: EvalRequest) -> dict[str, float] | None:
        """Top-1/top-5 (percent) and the loss on the validation folder, centre crops (resize to
        img_size / eval_crop_pct, bicubic); of the EMA weights too when kept. Each process takes
        every world-size-th image; the counts are summed over processes."""
        if self.val_path is None:
            return None
        models = {"": self.encoder}
        if self.ema is not None:
            models["_ema"] = self.ema.module
        counts = evaluate_classifier(
            models, self._val_set(), request.device, self.eval_batch_size, self.eval_workers
        )
        n = max(1.0, counts.pop("n"))
        return {k: (100.0 if "top" in k else 1.0) * v / n for k, v in counts.items()}


def evaluate_classifier(
    models: dict[str, Encoder],
    dataset: Any,
    device: torch.device,
    batch_size: int = 128,
    num_workers: int = 0,
) -> dict[str, float]:
    """Summed correct top-1/top-5 counts and loss of each classifier (``{suffix: encoder}``) on
    this process's share of ``dataset`` (an ImageFolder of uint8 centre crops), summed over
    processes. Keys: ``top1{suffix}``, ``top5{suffix}``, ``val_loss{suffix}``, and ``n``."""
    import torch.distributed as dist

    rank, world = rank_and_world_size()
    share = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    modes = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    names = [f"{what}{k}" for k in models for what in ("top1", "top5", "val_loss")]
    totals = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)
    try:
        for images, labels in loader(share, batch_size, num_workers):
            x = normalize(images, device)
            y = labels.to(device)
            values = []
            for model in models.values():
                logits = classify(model, x).float()
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                values += [
                    (top[:, 0] == y).sum(),
                    (top == y[:, None]).any(dim=1).sum(),
                    F.cross_entropy(logits, y, reduction="sum"),
                ]
            values.append(torch.tensor(y.shape[0], device=device))
            totals += torch.stack([v.to(torch.float64) for v in values])
    finally:
        for k, m in models.items():
            m.train(modes[k])
    if world > 1:
        dist.all_reduce(totals)
    out = {name: float(v) for name, v in zip(names, totals[:-1].tolist())}
    out["n"] = float(totals[-1])
    return out


def _check_inputs(cfg: Config) -> None:
    """The labelled folders and the encoder to start from."""
    f = cfg.finetune
    check(
        cfg.data.source == "images",
        "data.source",
        f"fine-tuning reads a labelled ImageFolder (DIR/<class>/<image>), got "
        f"{cfg.data.source!r}; pass --data DIR (or set data.source=images, data.path=DIR)",
    )
    if f.checkpoint is not None:
        check(
            Path(f.checkpoint).exists(),
            "finetune.checkpoint",
            f"{f.checkpoint!r} does not exist; pass the pre-trained encoder's checkpoint, "
            "run folder or export (null: random initialisation)",
        )
    if f.val is not None:
        check(
            Path(f.val).is_dir() or is_shard_spec(f.val),
            "finetune.val",
            f"{f.val!r} is not a folder; pass the validation ImageFolder or its tar shards "
            "(or null: none)",
        )
    if f.num_classes is not None:
        check(
            f.num_classes >= 2,
            "finetune.num_classes",
            f"expected 2 or more, got {f.num_classes}",
        )


def _check_values(f: FinetuneConfig) -> None:
    """The recipe's numbers: layer decay, mixing, smoothing, EMA, evaluation."""
    check(
        0 < f.layer_decay <= 1,
        "finetune.layer_decay",
        f"expected 0 < d <= 1, got {f.layer_decay}",
    )
    check(f.mixup >= 0, "finetune.mixup", f"expected 0 (off) or a positive alpha, got {f.mixup}")
    check(
        f.cutmix >= 0,
        "finetune.cutmix",
        f"expected 0 (off) or a positive alpha, got {f.cutmix}",
    )
    for name in ("mixup_prob", "mixup_switch_prob", "reprob"):
        value = getattr(f, name)
        check(0 <= value <= 1, f"finetune.{name}", f"expected a probability, got {value}")
    check(0 <= f.smoothing < 1, "finetune.smoothing", f"expected 0 <= s < 1, got {f.smoothing}")
    check(f.head_init >= 0, "finetune.head_init", f"expected 0 or more, got {f.head_init}")
    check(0 < f.ema_decay < 1, "finetune.ema_decay", f"expected 0 < d < 1, got {f.ema_decay}")
    check(
        0 < f.eval_crop_pct <= 1,
        "finetune.eval_crop_pct",
        f"expected 0 < crop_pct <= 1, got {f.eval_crop_pct}",
    )
    check(
        f.eval_batch_size >= 1,
        "finetune.eval_batch_size",
        f"expected 1 or more, got {f.eval_batch_size}",
    )


def _check_batches(cfg: Config) -> None:
    f = cfg.finetune
    check(
        cfg.data.repeated_sampling == 1,
        "data.repeated_sampling",
        "fine-tuning samples each image once per epoch; set it to 1",
    )
    if f.mixup > 0 or f.cutmix > 0:
        check(
            cfg.data.batch_size % 2 == 0,
            "data.batch_size",
            f"mixup/cutmix mixes pairs of images; use an even batch size, got "
            f"{cfg.data.batch_size}",
        )
