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

from siamae.errors import CheckpointError, ConfigError
from siamae.methods.base import Method, MethodOutput, Picture, Reconstruction
from siamae.models.vit import VIT_SIZES, Encoder

if TYPE_CHECKING:
    from siamae.config import Config

METHOD_NAME = "finetune"


# -- the classifier ---------------------------------------------------------------------------


def make_classifier(
    encoder: Encoder, num_classes: int, global_pool: bool = True, head_init: float = 2e-5
) -> Encoder:
    """Turn ``encoder`` (in place) into a classifier with timm's avg-pool or CLS head layout.

    Average pooling (``global_pool``): ``norm`` becomes Identity (its pre-trained weights are
    dropped, as MAE does), ``fc_norm`` a fresh LayerNorm. CLS: ``norm`` kept, no ``fc_norm``.
    The head's weights are drawn from the global torch generator (seeded by the engine).
    The position embedding becomes trainable, as in the published fine-tuning code.
    """
    vit = encoder.vit
    dim = encoder.embed_dim
    if global_pool:
        vit.global_pool = "avg"
        vit.norm = nn.Identity()
        vit.fc_norm = nn.LayerNorm(dim, eps=1e-6)
    else:
        vit.global_pool = "token"
        vit.fc_norm = nn.Identity()
    vit.head = nn.Linear(dim, num_classes)
    vit.num_classes = num_classes
    # MAE's call, timm's trunc_normal_(w, std=2e-5): the bounds are +-2 absolute, so at this
    # std the draw is a plain normal one.
    nn.init.trunc_normal_(vit.head.weight, std=head_init)
    nn.init.zeros_(vit.head.bias)
    vit.pos_embed.requires_grad_(True)
    return encoder


def classify(encoder: Encoder, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised -> (B, C) logits (any size a multiple of the patch: the position
    grid is interpolated)."""
    return encoder.vit.forward_head(encoder(images))


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


def build_encoder(cfg: Config) -> Encoder:
    """The encoder to fine-tune: ``finetune.checkpoint`` loaded (anything ``load_encoder``
    reads), or a random initialisation when it is null. ``model.*`` must describe it."""
    m = cfg.model
    path = cfg.finetune.checkpoint
    if path is None:
        return Encoder(m.arch, m.patch_size, m.img_size, m.drop_path)
    from siamae.loading import load_encoder

    pre = load_encoder(path)
    if os.environ.get("RANK", "0") == "0":  # what matched, as every command reports it
        print(pre.load_report.summary())  # type: ignore[attr-defined]
    if pre.arch != m.arch or pre.patch_size != m.patch_size:
        raise ConfigError(
            f"config field 'model.arch': finetune.checkpoint {path!r} holds a {pre.arch} patch "
            f"{pre.patch_size} encoder, the config says {m.arch} patch {m.patch_size}; set "
            f"model.arch={pre.arch} model.patch_size={pre.patch_size}"
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


def layer_decay_groups(
    encoder: Encoder, weight_decay: float, layer_decay: float, head_outside: bool = False
) -> list[dict]:
    """timm's layer-decay groups of the encoder's ViT: block i at ``d^(L + 1 - (i + 1))``, patch
    and position embedding and CLS at ``d^(L + 1)``, the head (fc_norm, head) at 1; no weight
    decay on 1-D tensors, the position embedding and CLS (timm's ``no_weight_decay``). Frozen
    tensors are left out. Each group carries ``lr_scale``.

    ``head_outside``: the head is another module (a segmentation head, at scale 1). timm then
    sees no layer above the last block and would put it at 1; every scale is multiplied by
    ``d`` so the blocks get the same scales as with a head inside (BEiT's segmentation rule).
    """
    from timm.optim import param_groups_layer_decay

    vit = encoder.vit
    groups = param_groups_layer_decay(
        vit,
        weight_decay=weight_decay,
        no_weight_decay_list=list(vit.no_weight_decay()),
        layer_decay=layer_decay,
    )
    if head_outside:
        for group in groups:
            group["lr_scale"] *= layer_decay
    return groups


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
    from siamae.data.labelled import seeded_global_rngs

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
    best_metric = "top1"

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
        return {"mask_ratio": 0.0, "global_scale": (0.08, 1.0), "interpolation": "bicubic"}

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        f = cfg.finetune

        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"config field '{name}': {message}")

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
                Path(f.val).is_dir(),
                "finetune.val",
                f"{f.val!r} is not a folder; pass the validation ImageFolder (or null: none)",
            )
        if f.num_classes is not None:
            check(
                f.num_classes >= 2,
                "finetune.num_classes",
                f"expected 2 or more, got {f.num_classes}",
            )
        check(
            0 < f.layer_decay <= 1,
            "finetune.layer_decay",
            f"expected 0 < d <= 1, got {f.layer_decay}",
        )
        check(
            f.mixup >= 0, "finetune.mixup", f"expected 0 (off) or a positive alpha, got {f.mixup}"
        )
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
        if f.aa is not None:
            try:
                cls.build_views(cfg)
            except Exception as err:  # timm raises assertion/key errors on a bad policy string
                raise ConfigError(
                    f"config field 'finetune.aa': {f.aa!r} is not a timm augmentation policy "
                    f"({type(err).__name__}: {err}); e.g. rand-m9-mstd0.5-inc1, or null for none"
                ) from None

    @classmethod
    def build_views(cls, cfg: Config):  # noqa: ANN206 - a view maker
        from siamae.data.labelled import LabelledViews

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
    def build_source(cls, cfg: Config, cache_dir: str | None = None):  # noqa: ANN206
        from siamae.data.labelled import LabelledImageSource

        return LabelledImageSource(cfg.data.path)

    @classmethod
    def from_config(cls, cfg: Config) -> FineTune:
        from siamae.data.labelled import folder_classes

        classes = folder_classes(cfg.data.path)
        if len(classes) < 2:
            raise ConfigError(
                f"config field 'data.path': {str(cfg.data.path)!r} has one class folder "
                f"({classes[0]!r}); a classifier needs at least 2 classes: pass a folder with "
                "one sub-folder per class (DIR/<class>/<image>)"
            )
        num_classes = cfg.finetune.num_classes or len(classes)
        if num_classes < len(classes):
            raise ConfigError(
                f"config field 'finetune.num_classes': {num_classes} classes, but {cfg.data.path!r} "
                f"has {len(classes)} class folders; raise it or leave it null"
            )
        encoder = build_encoder(cfg)
        make_classifier(encoder, num_classes, cfg.finetune.global_pool, cfg.finetune.head_init)
        return cls(encoder, classes, cfg)

    # -- training -------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> MethodOutput:
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

    def _eraser(self, device: torch.device):  # noqa: ANN202 - timm RandomErasing
        from timm.data.random_erasing import RandomErasing

        if self.eraser is None or self._eraser_device != device:
            # MAE/DeiT recipe: pixel mode (N(0, 1) noise in normalised units), one box.
            self.eraser = RandomErasing(self.reprob, mode="pixel", max_count=1, device=device)
            self._eraser_device = device
        return self.eraser

    def param_groups(self, weight_decay: float, no_decay_tokens: bool = False) -> list[dict]:
        """:func:`layer_decay_groups` of the classifier (fc_norm and head at lr scale 1)."""
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
    def _val_set(self):  # noqa: ANN202 - an ImageFolder
        from siamae.eval.features import EvalTransform, validation_folder

        if self._val is None:
            transform = EvalTransform(self.encoder.img_size, self.eval_crop_pct)
            self._val = validation_folder(self.val_path, transform, self.classes)
        return self._val

    @torch.no_grad()
    def evaluate(self, device: torch.device) -> dict[str, float] | None:
        """Top-1/top-5 (percent) and the loss on the validation folder, centre crops (resize to
        img_size / eval_crop_pct, bicubic); of the EMA weights too when kept. Each process takes
        every world-size-th image; the counts are summed over processes."""
        if self.val_path is None:
            return None
        models = {"": self.encoder}
        if self.ema is not None:
            models["_ema"] = self.ema.module
        counts = evaluate_classifier(
            models, self._val_set(), device, self.eval_batch_size, self.eval_workers
        )
        n = max(1.0, counts.pop("n"))
        return {k: (100.0 if "top" in k else 1.0) * v / n for k, v in counts.items()}

    # -- pictures: a classifier reconstructs nothing --------------------------------------------
    def picture(self, batch: dict[str, torch.Tensor]) -> Picture | None:
        return None

    def reconstruct(self, batch: dict[str, torch.Tensor]) -> Reconstruction:
        raise TypeError("a fine-tuned classifier has no reconstruction to show")


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

    from siamae.eval.features import loader, normalize

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
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


# -- loading a fine-tuned model ---------------------------------------------------------------


def load_classifier(path: str | Path, ema: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The fine-tuned classifier of a ``siamae finetune`` checkpoint (file or run folder):
    (timm-named state dict with ``fc_norm``/``head``, info: num_classes, global_pool, classes,
    arch, patch_size, img_size, step). ``ema``: the EMA weights instead (the run must keep them)."""
    from siamae.checkpoint import TRAIN_FORMAT, load_checkpoint

    p = Path(path)
    if p.is_dir():
        p = p / "checkpoints" / "last.pt"
    obj = load_checkpoint(p)
    if obj.get("format") != TRAIN_FORMAT or obj.get("method") != METHOD_NAME:
        raise CheckpointError(
            f"{str(path)!r} is not a 'siamae finetune' checkpoint; pass a fine-tuning run's "
            "checkpoint or run folder"
        )
    prefix = "ema.module.vit." if ema else "encoder.vit."
    state = {k[len(prefix) :]: v for k, v in obj["model"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(
            f"{str(path)!r} holds no EMA weights (the run had finetune.ema=false); drop --ema"
        )
    cfg = obj["config"]
    info = {
        "num_classes": int(state["head.weight"].shape[0]),
        "global_pool": "avg" if "fc_norm.weight" in state else "token",
        "arch": cfg["model"]["arch"],
        "patch_size": int(cfg["model"]["patch_size"]),
        "img_size": int(cfg["model"]["img_size"]),
        "step": obj.get("step"),
        "epoch": obj.get("epoch"),
        "config": cfg,
        "ema": ema,
    }
    return state, info


def is_finetune_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` (a file or run folder) is a ``siamae finetune`` training checkpoint."""
    from siamae.checkpoint import TRAIN_FORMAT, load_checkpoint

    p = Path(path)
    if p.is_dir():
        p = p / "checkpoints" / "last.pt"
    if p.suffix != ".pt" or not p.is_file():
        return False
    try:
        obj = load_checkpoint(p)
    except CheckpointError:
        return False
    return obj.get("format") == TRAIN_FORMAT and obj.get("method") == METHOD_NAME


def export_classifier(
    checkpoint: str | Path, out: str | Path, timm_name: str | None = None, ema: bool = False
) -> tuple[Path, Path]:
    """Write a fine-tuned classifier (encoder + fc_norm + head) as timm-named ``.safetensors``
    and a JSON sidecar. It loads strictly, head included, with::

        timm.create_model(NAME, num_classes=C, global_pool="avg", **kwargs).load_state_dict(
            safetensors.torch.load_file(FILE))

    or ``timm.create_model(NAME, pretrained=True, num_classes=C, global_pool="avg",
    pretrained_cfg_overlay=dict(file=FILE, num_classes=C))`` (timm keeps a pretrained head
    only when the overlay's class count is the model's).
    """
    import json

    import timm
    from safetensors.torch import save_file

    from siamae.errors import SiamaeError
    from siamae.eval.features import IMAGENET_MEAN, IMAGENET_STD
    from siamae.export import check_vit_name, default_timm_name, timm_kwargs

    out = Path(out)
    if out.suffix != ".safetensors":
        raise SiamaeError(f"--out {str(out)!r}: the export is a .safetensors file; name it so")
    state, info = load_classifier(checkpoint, ema=ema)
    dims = {
        "depth": 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")),
        "embed_dim": int(state["cls_token"].shape[-1]),
    }
    size = VIT_SIZES[info["arch"]]
    overrides = {k: v for k, v in dims.items() if v != getattr(size, k)}
    with torch.device("meta"):
        shape = Encoder(info["arch"], info["patch_size"], info["img_size"], **overrides)
    name = timm_name or default_timm_name(shape)
    check_vit_name(name)
    kwargs: dict[str, Any] = {
        **timm_kwargs(shape, name),
        "num_classes": info["num_classes"],
        "global_pool": info["global_pool"],
    }
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and expected[k].shape != state[k].shape]
    if missing or extra or wrong:
        raise SiamaeError(
            f"the classifier does not fit timm's {name!r} (missing {missing[:3]}, extra "
            f"{extra[:3]}, shapes differ {wrong[:3]}); pass --timm-name with the same width, "
            "depth and patch size"
        )
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    train_dir = info["config"].get("data", {}).get("path")
    classes = None
    if train_dir and Path(train_dir).is_dir():
        from siamae.data.labelled import folder_classes

        classes = folder_classes(train_dir)  # index -> class name, as the head was trained
    usage_kwargs = "".join(f"{k}={v!r}, " for k, v in kwargs.items())
    sidecar = {
        "format": "siamae-export-classifier-v1",
        "weights": out.name,
        "source": str(checkpoint),
        "method": METHOD_NAME,
        "ema": ema,
        "step": info["step"],
        "epoch": info["epoch"],
        "recipe": info["config"],
        "classes": classes,
        "arch": info["arch"],
        "patch_size": info["patch_size"],
        "img_size": info["img_size"],
        "num_classes": info["num_classes"],
        "global_pool": info["global_pool"],
        "timm_name": name,
        "timm_kwargs": kwargs,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "timm_usage": (
            f"timm.create_model({name!r}, pretrained=True, {usage_kwargs}"
            f"pretrained_cfg_overlay=dict(file={out.name!r}, num_classes={info['num_classes']}, "
            f"mean={tuple(IMAGENET_MEAN)}, std={tuple(IMAGENET_STD)}))"
        ),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": sidecar["format"], "timm_name": name})
    tmp.replace(out)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(sidecar, indent=2, default=str) + "\n")
    return out, json_path


# -- the command line -----------------------------------------------------------------------------


# The split names datasets use (ImageNet and torchvision: train/val; ADE20K: training/validation;
# CIFAR folders: train/test).
TRAIN_SPLITS = ("train", "training")
VAL_SPLITS = ("val", "validation", "valid", "test")


def split_folders(data: str | Path) -> tuple[Path, Path | None]:
    """``--data DIR``: (training folder, validation folder or None). DIR holding a training split
    (``train/`` or ``training/``) is split into it and its validation split (``val/``,
    ``validation/``, ``valid/`` or ``test/``); otherwise DIR is the training folder itself. A DIR
    with a validation split and no training split is refused (its splits are not classes)."""
    root = Path(data)
    if not root.is_dir():
        raise ConfigError(
            f"--data {str(data)!r} is not a folder; pass an ImageFolder (DIR/<class>/<image>) or "
            "a folder holding train/ and val/"
        )
    train = next((root / n for n in TRAIN_SPLITS if (root / n).is_dir()), None)
    val = next((root / n for n in VAL_SPLITS if (root / n).is_dir()), None)
    if train is not None:
        return train, val
    if val is not None:
        raise ConfigError(
            f"--data {str(data)!r} holds a validation split ({val.name}/) but no training split; "
            f"name the training folder {' or '.join(s + '/' for s in TRAIN_SPLITS)}, or pass "
            "--data TRAIN_DIR --val VAL_DIR"
        )
    return root, None


def command_overrides(
    data: str | None, val: str | None, checkpoint: str | None, out: str | None
) -> list[str]:
    """The ``--set`` overrides that ``siamae finetune``'s own flags stand for."""
    overrides = ["method=finetune"]
    if data is not None:
        train_dir, found_val = split_folders(data)
        overrides += ["data.source=images", f"data.path={train_dir}"]
        if val is None and found_val is not None:
            val = str(found_val)
    if val is not None:
        overrides.append(f"finetune.val={val}")
    if checkpoint is not None:
        overrides.append(
            "finetune.checkpoint=null"
            if checkpoint == "none"
            else f"finetune.checkpoint={checkpoint}"
        )
    if out is not None:
        overrides.append(f"run.out_dir={out}")
    return overrides
