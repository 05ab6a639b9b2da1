"""Linear probe of a frozen encoder: BatchNorm1d(affine=False) + Linear, SGD or LARS, cosine.

The recipe follows MAE's linear probing: 90 epochs, 10 warm-up epochs then a half-cosine decay
set every iteration before the step, lr = base_lr x batch / 256, no weight decay, a BatchNorm
without affine parameters in front of the classifier. Top-1 on the validation folder.

Two ways to feed the head:
- ``cache_features=True`` (default): features of centre crops are computed once (and saved in
  ``out_dir/features`` so a resumed or repeated run reuses them); epochs are then cheap.
- ``cache_features=False``: every epoch runs the frozen encoder on random-resized crops with
  horizontal flips (the MAE training augmentation); the validation features are still computed
  once.

Checkpoints (``out_dir/checkpoints/last.pt``) are plain dicts written atomically after every
epoch; ``resume=True`` continues from one and gives the same head as an uninterrupted run
(the shuffling and the augmentation are seeded by (seed, epoch), not by a running generator).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import Lars

from siamae.checkpoint import load_checkpoint, save_atomic
from siamae.data.image_folder import ImageFolder, loader, normalize
from siamae.data.sources import to_rgb
from siamae.errors import CheckpointError
from siamae.eval.probes.features import (
    FEATURES,
    POOLS,
    encode_features,
    open_probe,
)
from siamae.eval.probes.protocols import DEFAULT_LINEAR_PROTOCOL, LINEAR_PROTOCOLS, linear_protocol
from siamae.models.vit import Encoder
from siamae.optim import lr_at
from siamae.options import check

LINEAR_FORMAT = "siamae-linear-v1"
ENCODE_CHUNK = 256  # images encoded at once when the probe runs the encoder every epoch


OPTION = "linear probe option"  # how its errors name a field


@dataclass
class LinearConfig:
    """The linear-probe recipe (defaults: the ``mae-sgd256`` protocol, MAE's with SGD at batch
    256; :meth:`for_protocol` gives each named protocol's settings)."""

    protocol: str = DEFAULT_LINEAR_PROTOCOL
    epochs: int = 90
    batch_size: int = 256
    optimizer: str = "sgd"  # "sgd" or "lars"
    base_lr: float = 0.1  # lr = base_lr * batch_size / 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: float = 10.0
    min_lr: float = 0.0
    pool: str = "cls"
    img_size: int | None = None  # None: the encoder's training size
    crop_pct: float = 0.875
    cache_features: bool = True
    seed: int = 0
    num_workers: int = 0
    eval_every: int = 1

    def check(self) -> None:
        """Raise a ConfigError naming the bad option (``linear probe option 'epochs': ...``)."""
        check(
            self.protocol in LINEAR_PROTOCOLS,
            "protocol",
            f"expected one of {', '.join(LINEAR_PROTOCOLS)}",
            OPTION,
        )
        check(self.epochs >= 1, "epochs", f"expected 1 or more, got {self.epochs}", OPTION)
        check(
            self.batch_size >= 1, "batch_size", f"expected 1 or more, got {self.batch_size}", OPTION
        )
        check(
            self.optimizer in ("sgd", "lars"),
            "optimizer",
            f"expected 'sgd' or 'lars', got {self.optimizer!r}",
            OPTION,
        )
        check(self.base_lr > 0, "lr", f"expected a positive number, got {self.base_lr}", OPTION)
        check(
            0 <= self.momentum < 1,
            "momentum",
            f"expected 0 <= momentum < 1, got {self.momentum}",
            OPTION,
        )
        check(
            self.weight_decay >= 0,
            "weight_decay",
            f"expected 0 or more, got {self.weight_decay}",
            OPTION,
        )
        check(
            0 <= self.warmup_epochs <= self.epochs,
            "warmup_epochs",
            f"expected 0 <= warmup <= epochs ({self.epochs})",
            OPTION,
        )
        check(
            self.pool in POOLS,
            "pool",
            f"expected one of {', '.join(POOLS)}, got {self.pool!r}",
            OPTION,
        )
        check(
            0 < self.crop_pct <= 1,
            "crop_pct",
            f"expected a number in (0, 1], got {self.crop_pct}",
            OPTION,
        )
        check(
            self.eval_every >= 1, "eval_every", f"expected 1 or more, got {self.eval_every}", OPTION
        )

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 256

    @classmethod
    def for_protocol(cls, name: str, **overrides: Any) -> LinearConfig:
        """The named protocol's settings (see :mod:`siamae.eval.probes.protocols`); keyword arguments
        that are not None override them."""
        preset = linear_protocol(name)
        values = {
            "protocol": preset.name,
            "pool": preset.pool,
            "optimizer": preset.optimizer,
            "base_lr": preset.base_lr,
            "batch_size": preset.batch_size,
            "epochs": preset.epochs,
            "warmup_epochs": preset.warmup_epochs,
            "weight_decay": preset.weight_decay,
            "momentum": preset.momentum,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["warmup_epochs"] = min(values["warmup_epochs"], values["epochs"])
        return cls(**values)

    def deviations(self) -> dict[str, Any]:
        """The settings that differ from the named protocol's (given explicitly)."""
        preset = LINEAR_PROTOCOLS.get(self.protocol)
        if preset is None:
            return {}
        fields = ("pool", "optimizer", "base_lr", "batch_size", "epochs", "warmup_epochs")
        fields += ("weight_decay", "momentum")
        return {f: getattr(self, f) for f in fields if getattr(self, f) != getattr(preset, f)}


# Fields that may change between a run and its resumption (they do not change the head).
RESUMABLE_CHANGES = {"num_workers", "eval_every"}


class LinearProbe(nn.Module):
    """(B, D) frozen features -> (B, C) logits through BatchNorm1d(affine=False) and Linear."""

    def __init__(self, dim: int, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.fc.weight.normal_(0.0, 0.01, generator=gen)
            self.fc.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(features))


def make_lars(
    params: list[torch.nn.Parameter], lr: float, momentum: float, weight_decay: float
) -> Lars:
    """MAE's LARS from timm: matrices take the step scaled by the trust ratio
    ``0.001 * ||p|| / ||g||`` (timm adds ``wd * ||p||`` and 1e-8 to the denominator), vectors
    (BatchNorm is affine-free, so the bias) the plain momentum-SGD step without weight decay."""
    matrices = [p for p in params if p.ndim > 1]
    vectors = [p for p in params if p.ndim <= 1]
    return Lars(
        [
            {"params": matrices, "weight_decay": weight_decay, "always_adapt": True},
            {"params": vectors, "weight_decay": 0.0, "always_adapt": False},
        ],
        lr=lr,
        momentum=momentum,
        trust_coeff=0.001,
    )


@dataclass
class LinearResult:
    """Validation top-1 (percent) at the end and at its best, the history, and the head."""

    top1: float
    best_top1: float
    epochs: int
    history: list[dict[str, float]] = field(default_factory=list)
    out_dir: str | None = None
    head: LinearProbe | None = field(default=None, repr=False)
    cfg: LinearConfig | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        cfg = self.cfg or LinearConfig()
        return {
            "protocol": cfg.protocol,
            "protocol_summary": LINEAR_PROTOCOLS[cfg.protocol].summary,
            "deviations_from_protocol": cfg.deviations(),
            "head": "BatchNorm1d(affine=False, eps 1e-6) + Linear, frozen encoder",
            "features": FEATURES[cfg.pool],
            "lr": cfg.lr,
            "top1": self.top1,
            "best_top1": self.best_top1,
            "epochs": self.epochs,
            "history": self.history,
            "out_dir": self.out_dir,
        }


class AugmentedFolder(ImageFolder):
    """An ImageFolder whose images are random-resized crops (scale 0.08-1) with flips.

    The randomness of item i in epoch e comes from a generator seeded by (seed, e, i) alone,
    so it is the same in every worker layout and after a resume.
    """

    def __init__(self, base: ImageFolder, seed: int) -> None:  # noqa: D107 - shares base's scan
        self.__dict__.update(base.__dict__)
        self.seed = seed
        self.epoch = 0

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        _, label = self.samples[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        size = self.transform.img_size
        with self.open(i) as image:  # a file, or a tar shard's member
            image = to_rgb(image)
            w, h = image.size
            box = (0, 0, w, h)
            for _ in range(10):
                area = w * h * rng.uniform(0.08, 1.0)
                log_r = rng.uniform(math.log(3 / 4), math.log(4 / 3))
                cw = int(round(math.sqrt(area * math.exp(log_r))))
                ch = int(round(math.sqrt(area / math.exp(log_r))))
                if 0 < cw <= w and 0 < ch <= h:
                    x0 = int(rng.integers(0, w - cw + 1))
                    y0 = int(rng.integers(0, h - ch + 1))
                    box = (x0, y0, x0 + cw, y0 + ch)
                    break
            crop = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pixels = torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1)
        return pixels.contiguous(), label


# -- training ---------------------------------------------------------------------------------


def _feature_batches(
    feats: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, epoch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = _epoch_order(feats.shape[0], seed, epoch)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < 2 and start > 0:
            break  # BatchNorm cannot train on a batch of one
        yield feats[idx], labels[idx]


@torch.no_grad()
def evaluate(head: LinearProbe, feats: torch.Tensor, labels: torch.Tensor, device: Any) -> float:
    """Top-1 (percent) of the head on (N, D) features."""
    was = head.training
    head.eval()
    correct = 0
    for start in range(0, feats.shape[0], 1024):
        logits = head(feats[start : start + 1024].to(device))
        correct += int((logits.argmax(1).cpu() == labels[start : start + 1024]).sum())
    head.train(was)
    return 100.0 * correct / max(1, feats.shape[0])


def train_linear(
    encoder: Encoder,
    train_dir: str | Path,
    val_dir: str | Path,
    out_dir: str | Path | None = None,
    cfg: LinearConfig | None = None,
    device: torch.device | str = "cpu",
    resume: bool = False,
    progress: bool = True,
    source: str = "<encoder>",
) -> LinearResult:
    """Train and evaluate a linear probe of a frozen ``encoder`` on two ImageFolders.

    Args:
        out_dir: where checkpoints, cached features and ``results.json`` go (None: nowhere,
            no resume).
        resume: continue from ``out_dir/checkpoints/last.pt`` if it exists.
        source: the encoder's checkpoint path (recorded, and part of the feature-cache key).
    Returns:
        the final and best validation top-1 and the per-epoch history.
    """
    cfg = cfg or LinearConfig()
    cfg.check()
    device = torch.device(device)
    out = Path(out_dir) if out_dir is not None else None
    train_set, val_set, cache = open_probe(
        encoder,
        train_dir,
        val_dir,
        cfg.img_size,
        cfg.crop_pct,
        cfg.pool,
        cache_dir=out / "features" if out is not None else None,
        source=source,
        device=device,
        batch_size=max(64, min(cfg.batch_size, 512)),
        num_workers=cfg.num_workers,
        progress=progress,
    )
    encoder = encoder.eval()
    run_info = {
        "encoder": source,
        "train": str(Path(train_dir).resolve()),
        "val": str(Path(val_dir).resolve()),
        "classes": train_set.classes,
    }
    if val_set.skipped:  # the accuracy is over the readable images only: say which were not
        run_info["val_skipped"] = [line.split("\t")[0] for line in val_set.skipped]
    val_feats = cache.of_folder("val", val_set, desc="val features")
    train: torch.Tensor | _AugmentedFeatures
    if cfg.cache_features:
        train = cache.of_folder("train", train_set, desc="train features")
    else:
        train = _AugmentedFeatures(encoder, AugmentedFolder(train_set, cfg.seed), cfg, device)
    return fit_probe(
        train,
        train_set.labels,
        val_feats,
        val_set.labels,
        num_classes=len(train_set.classes),
        cfg=cfg,
        out_dir=out,
        device=device,
        resume=resume,
        progress=progress,
        run_info=run_info,
    )


class _AugmentedFeatures:
    """Features of freshly augmented training images, computed batch by batch every epoch."""

    def __init__(
        self, encoder: Encoder, images: AugmentedFolder, cfg: LinearConfig, device: torch.device
    ) -> None:
        self.encoder, self.images, self.cfg, self.device = encoder, images, cfg, device
        self.dim = encoder.embed_dim

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches of ``batch_size`` features. The images are decoded and encoded
        in chunks of at most ENCODE_CHUNK, so a protocol's batch of 16384 is exact (the head
        sees all of it at once) without holding 16384 images in memory."""
        self.images.epoch = epoch
        order = _epoch_order(len(self.images), self.cfg.seed, epoch).tolist()
        subset = torch.utils.data.Subset(self.images, order)
        batch = self.cfg.batch_size
        feats: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        held = 0
        for images, chunk_labels in loader(subset, min(batch, ENCODE_CHUNK), self.cfg.num_workers):
            with torch.no_grad():
                feats.append(
                    encode_features(self.encoder, normalize(images, self.device), self.cfg.pool)
                )
            labels.append(chunk_labels)
            held += chunk_labels.shape[0]
            while held >= batch:
                all_feats, all_labels = torch.cat(feats), torch.cat(labels)
                yield all_feats[:batch], all_labels[:batch]
                feats, labels = [all_feats[batch:]], [all_labels[batch:]]
                held -= batch
        if held >= 2:  # BatchNorm cannot train on a batch of one
            yield torch.cat(feats), torch.cat(labels)


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def fit_probe(
    train: torch.Tensor | _AugmentedFeatures,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    cfg: LinearConfig | None = None,
    out_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    resume: bool = False,
    progress: bool = False,
    run_info: dict[str, Any] | None = None,
    stop_after_epochs: int | None = None,
) -> LinearResult:
    """Train the BatchNorm + Linear head on (N, D) training features; top-1 on validation.

    ``train`` is a feature matrix (cached features) or a source of augmented features.
    Checkpoints go to ``out_dir/checkpoints/last.pt`` after every epoch; ``resume`` continues
    from there (the options and ``run_info`` must match the saved ones).
    ``stop_after_epochs`` ends this call early, as an interruption would (for resume tests).
    """
    from tqdm.auto import tqdm

    cfg = cfg or LinearConfig()
    cfg.check()
    device = torch.device(device)
    out = Path(out_dir) if out_dir is not None else None
    run_info = {"recipe": dataclasses.asdict(cfg), **(run_info or {})}
    dim = train.shape[1] if isinstance(train, torch.Tensor) else train.dim
    head = LinearProbe(dim, num_classes, seed=cfg.seed).to(device)
    opt = _optimizer(head, cfg)
    start_epoch, history = 0, []
    ckpt_path = out / "checkpoints" / "last.pt" if out is not None else None
    if resume and ckpt_path is not None and ckpt_path.is_file():
        start_epoch, history = _restore(ckpt_path, run_info, head, opt)
    schedule = _Schedule.of(len(train), cfg)
    end_epoch = cfg.epochs
    if stop_after_epochs is not None:
        end_epoch = min(cfg.epochs, start_epoch + stop_after_epochs)
    head.train()
    lr = schedule.lr(start_epoch * schedule.steps_per_epoch)
    # The head is tiny: on a CPU it trains on one thread. Multi-threaded BatchNorm and matmuls
    # on (B, D) tensors are slower there, by orders of magnitude on a busy machine.
    with _threads(1 if device.type == "cpu" and isinstance(train, torch.Tensor) else None):
        bar = tqdm(
            range(start_epoch, end_epoch), desc="linear probe", unit="epoch", disable=not progress
        )
        for epoch in bar:
            record = _train_epoch(head, opt, train, train_labels, schedule, epoch, device, lr)
            lr = record["lr"]
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                record["top1"] = evaluate(head, val_feats, val_labels, device)
                bar.set_postfix(loss=f"{record['loss']:.3f}", top1=f"{record['top1']:.2f}")
            history.append(record)
            if ckpt_path is not None:
                _save(ckpt_path, run_info, head, opt, epoch + 1, history)
        bar.close()
        top1 = evaluate(head, val_feats, val_labels, device)
    return _result(head, cfg, top1, history, out, run_info)


def _result(
    head: LinearProbe,
    cfg: LinearConfig,
    top1: float,
    history: list[dict[str, float]],
    out: Path | None,
    run_info: dict[str, Any],
) -> LinearResult:
    """The trained probe's result, also written to ``out/results.json`` with ``run_info``."""
    evaluated = [h["top1"] for h in history if "top1" in h]
    result = LinearResult(
        top1=top1,
        best_top1=max([*evaluated, top1]),
        epochs=cfg.epochs,
        history=history,
        out_dir=str(out) if out is not None else None,
        head=head,
        cfg=cfg,
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(
            json.dumps(result.to_dict() | run_info, indent=2, default=str) + "\n"
        )
    return result


def _optimizer(head: LinearProbe, cfg: LinearConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return make_lars(list(head.parameters()), cfg.lr, cfg.momentum, cfg.weight_decay)


@dataclass
class _Schedule:
    """Warm-up then half-cosine, set every iteration (``siamae.optim.lr_at``)."""

    cfg: LinearConfig
    steps_per_epoch: int
    total: int
    warmup: int

    @classmethod
    def of(cls, n: int, cfg: LinearConfig) -> _Schedule:
        """For ``n`` training samples; a last batch of one is dropped (BatchNorm)."""
        steps = max(1, n // cfg.batch_size + (1 if n % cfg.batch_size >= 2 else 0))
        return cls(cfg, steps, cfg.epochs * steps, int(round(cfg.warmup_epochs * steps)))

    def lr(self, step: int) -> float:
        return lr_at(step, self.cfg.lr, self.cfg.min_lr, self.warmup, self.total)


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """torch's thread count set to ``count`` (None: left) inside, restored after."""
    threads = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train_epoch(
    head: LinearProbe,
    opt: torch.optim.Optimizer,
    train: torch.Tensor | _AugmentedFeatures,
    train_labels: torch.Tensor,
    schedule: _Schedule,
    epoch: int,
    device: torch.device,
    lr: float,
) -> dict[str, float]:
    """One epoch's steps: the history record (epoch, mean loss, last lr, seconds). ``lr``:
    the rate before the epoch, recorded if it takes no step."""
    cfg = schedule.cfg
    t0 = time.perf_counter()
    step = epoch * schedule.steps_per_epoch
    loss_sum, seen = 0.0, 0
    if isinstance(train, torch.Tensor):
        batches = _feature_batches(train, train_labels, cfg.batch_size, cfg.seed, epoch)
    else:
        batches = train.batches(epoch)
    for feats, labels in batches:
        lr = schedule.lr(step)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(head(feats.to(device)), labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += float(loss.detach()) * labels.shape[0]
        seen += labels.shape[0]
        step += 1
    return {
        "epoch": epoch + 1,
        "loss": loss_sum / max(1, seen),
        "lr": lr,
        "seconds": time.perf_counter() - t0,
    }


def _save(
    path: Path,
    run_info: dict[str, Any],
    head: LinearProbe,
    opt: torch.optim.Optimizer,
    epoch: int,
    history: list[dict[str, float]],
) -> None:
    """The checkpoint after ``epoch`` epochs, written atomically."""
    save_atomic(
        {
            "format": LINEAR_FORMAT,
            "config": run_info,
            "head": head.state_dict(),
            "optimizer": opt.state_dict(),
            "epoch": epoch,
            "history": history,
        },
        path,
    )


def _restore(
    path: Path, run_info: dict[str, Any], head: LinearProbe, opt: torch.optim.Optimizer
) -> tuple[int, list[dict[str, float]]]:
    state = load_checkpoint(path)
    if state.get("format") != LINEAR_FORMAT:
        raise CheckpointError(
            f"{path} is not a linear-probe checkpoint; use another --out-dir or drop --resume"
        )
    saved = state["config"]
    for name in sorted(set(run_info) - {"recipe"}):
        if saved.get(name) != run_info[name]:
            raise CheckpointError(
                f"cannot resume {path}: it was trained with {name}={saved.get(name)!r}, this run "
                f"has {run_info[name]!r}; use another --out-dir"
            )
    for name, value in run_info["recipe"].items():
        if name in RESUMABLE_CHANGES:
            continue
        if saved["recipe"].get(name) != value:
            raise CheckpointError(
                f"cannot resume {path}: option {name} was {saved['recipe'].get(name)!r}, now "
                f"{value!r}; resume with the same options or use another --out-dir"
            )
    head.load_state_dict(state["head"])
    opt.load_state_dict(state["optimizer"])
    return int(state["epoch"]), list(state.get("history", []))
