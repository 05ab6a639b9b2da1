"""Weighted k-NN classification on frozen features (the DINO protocol).

Features are L2-normalised; each test sample's k most cosine-similar training samples vote for
their class with weight ``exp(sim / T)`` (T = 0.07); the class with the largest summed weight is
the prediction. Top-1 and top-5 accuracies in percent, for several k from one similarity pass.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from siamae.errors import DataError
from siamae.eval.probes.features import open_probe
from siamae.models.vit import Encoder

DEFAULT_KS: tuple[int, ...] = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07


@dataclass
class KNNResult:
    """Accuracies (percent) per k, and what produced them."""

    top1: dict[int, float]
    top5: dict[int, float]
    temperature: float
    num_train: int
    num_test: int
    num_classes: int
    info: dict[str, object] = field(default_factory=dict)

    def table(self) -> str:
        lines = [f"{'k':>5}  {'top-1':>7}  {'top-5':>7}"]
        for k in self.top1:
            lines.append(f"{k:>5}  {self.top1[k]:>7.2f}  {self.top5[k]:>7.2f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        return {
            "protocol": "weighted cosine k-NN (DINO)",
            "temperature": self.temperature,
            "num_train": self.num_train,
            "num_test": self.num_test,
            "num_classes": self.num_classes,
            "top1": {str(k): v for k, v in self.top1.items()},
            "top5": {str(k): v for k, v in self.top5.items()},
            **self.info,
        }


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int = 256,
) -> KNNResult:
    """Top-1/top-5 (percent) of weighted cosine k-NN for each k in ``ks``.

    Args:
        train_features: (N, D); train_labels: (N,) integers in [0, C).
        test_features: (M, D); test_labels: (M,).
        ks: neighbour counts; a k larger than N is clipped to N (with a note on stderr).
        temperature: vote weight exp(sim / T).
        chunk_size: test samples per similarity block (memory is chunk_size x N).
    """
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError("features must be (N, D) matrices")
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise DataError("k-NN needs at least one training and one test sample")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"k must be 1 or more, got {list(ks)}")
    n = train_features.shape[0]
    if ks[-1] > n:
        # A note, not a warning: Python would print it with torch's decorator's file and line.
        too_large = ", ".join(str(k) for k in ks if k > n)
        print(
            f"siamae: note: k={too_large} is larger than the {n} training images; "
            f"those rows use all {n} (k={n})",
            file=sys.stderr,
        )
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    train_labels = train_labels.to(device).long()
    k_max = min(ks[-1], n)
    top5_n = min(5, num_classes)
    correct1 = dict.fromkeys(ks, 0)
    correct5 = dict.fromkeys(ks, 0)
    for start in range(0, test_features.shape[0], chunk_size):
        test = F.normalize(test_features[start : start + chunk_size].to(device).float(), dim=1)
        target = test_labels[start : start + chunk_size].to(device).long()
        sim, idx = (test @ train.T).topk(k_max, dim=1)  # sorted, most similar first
        weights = (sim / temperature).exp()
        neighbour_labels = train_labels[idx]  # (B, k_max)
        for k in ks:
            kk = min(k, n)
            votes = torch.zeros(test.shape[0], num_classes, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            pred = votes.topk(top5_n, dim=1).indices
            hits = pred == target[:, None]
            correct1[k] += int(hits[:, 0].sum())
            correct5[k] += int(hits.any(dim=1).sum())
    m = test_features.shape[0]
    return KNNResult(
        top1={k: 100.0 * correct1[k] / m for k in ks},
        top5={k: 100.0 * correct5[k] / m for k in ks},
        temperature=temperature,
        num_train=n,
        num_test=m,
        num_classes=num_classes,
    )


def knn_eval(
    encoder: Encoder,
    train_dir: str | Path,
    val_dir: str | Path,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    pool: str = "cls",
    img_size: int | None = None,
    crop_pct: float = 0.875,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    cache_dir: str | Path | None = None,
    source: str = "<encoder>",
) -> KNNResult:
    """k-NN top-1/top-5 of a frozen encoder on two ImageFolders (features computed once).

    ``cache_dir``: where the features are kept (the linear and few-shot probes' cache, e.g.
    their ``OUT_DIR/features``; default: nowhere); ``source`` names the encoder's checkpoint
    (part of the cache key).
    """
    train_set, val_set, cache = open_probe(
        encoder,
        train_dir,
        val_dir,
        img_size,
        crop_pct,
        pool,
        cache_dir=cache_dir,
        source=source,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
    )
    train_f = cache.of_folder("train", train_set, desc="train features")
    val_f = cache.of_folder("val", val_set, desc="val features")
    result = knn_classify(
        train_f.to(device),
        train_set.labels,
        val_f.to(device),
        val_set.labels,
        ks=ks,
        temperature=temperature,
        num_classes=len(train_set.classes),
    )
    result.info = {
        "features": pool,
        "img_size": cache.img_size,
        "crop_pct": crop_pct,
        "pos_resample": getattr(encoder, "pos_resample", "dino"),
        "train": str(train_dir),
        "val": str(val_dir),
        "val_skipped": len(val_set.skipped),
    }
    return result
