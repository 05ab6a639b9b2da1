"""Few-shot evaluation with 1 % of the labels (the MSN / SiameseIM protocol).

A frozen encoder gives features (the mean of the patch tokens by default; ``--protocol
siameseim``: SiameseIM's, see :mod:`siamae.eval.probes.protocols`) of a small labelled subset of the training folder, and a multinomial logistic regression with an L2
penalty is fit on them; top-1 is measured on the whole validation folder.

- The subset is a list file (one image a line, as ImageNet's ``1percent.txt``: a path relative to
  the training folder, or a bare file name) or a seeded draw of N images a class (13 a class is
  ImageNet's 1 %). The draw of class c uses a generator seeded by (seed, c) alone, so it is the
  same whatever the other classes hold.
- Features are pre-processed as the reference code does with cyanure's ``preprocess(centering=
  True, normalize=True, columns=False)``: each feature vector has its own mean subtracted and is
  scaled to unit length. The classifier has no intercept and minimises
  ``mean cross-entropy + lambd / 2 * ||W||^2`` (cyanure's objective), solved to convergence with
  L-BFGS in float64 (deterministic; no learning rate to tune).
- Features are cached in ``out_dir/features`` with the keys the linear probe uses, so the
  validation features (and the training ones, which the subset is then sliced from) computed by
  ``siamae eval linear --out-dir`` the same folder are reused, and the other way round.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from siamae.data.image_folder import ImageFolder
from siamae.errors import DataError, SiamaeError
from siamae.eval.probes.features import FEATURES, FeatureCache, open_probe
from siamae.models.vit import Encoder


@dataclass
class FewShotResult:
    """Top-1 (percent) on the validation folder and what produced it."""

    top1: float
    num_labelled: int
    num_val: int
    num_classes: int
    lambd: float
    subset: str
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"protocol": "few-shot logistic regression (frozen encoder)", **asdict(self)}


# -- the labelled subset ------------------------------------------------------------------------


def draw_subset(labels: np.ndarray | torch.Tensor, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices (sorted) of ``per_class`` images of every class, drawn without replacement; the
    draw of class c depends only on (seed, c) and that class's images."""
    labels = np.asarray(labels)
    if per_class < 1:
        raise SiamaeError(f"--per-class must be 1 or more, got {per_class}")
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise DataError(
                f"class {int(c)} has {len(members)} training images, fewer than --per-class "
                f"{per_class}; lower it"
            )
        rng = np.random.default_rng([seed, int(c)])
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def read_subset(list_file: str | Path, dataset: ImageFolder) -> np.ndarray:
    """Indices (sorted) of the images a list file names: one a line, a path relative to the
    training folder or a bare file name ('#' comments and blank lines skipped)."""
    path = Path(list_file)
    if not path.is_file():
        raise DataError(f"--subset {str(path)!r} does not exist; pass a text file of image names")
    by_relative = {
        p.relative_to(dataset.root).as_posix(): i for i, (p, _) in enumerate(dataset.samples)
    }
    by_name: dict[str, list[int]] = {}
    for i, (p, _) in enumerate(dataset.samples):
        by_name.setdefault(p.name, []).append(i)
    chosen: set[int] = set()
    unknown, ambiguous = [], []
    for line in path.read_text().splitlines():
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        entry = entry.split()[0]
        if entry in by_relative:
            chosen.add(by_relative[entry])
        elif len(by_name.get(Path(entry).name, [])) == 1:
            chosen.add(by_name[Path(entry).name][0])
        elif Path(entry).name in by_name:
            ambiguous.append(entry)
        else:
            unknown.append(entry)
    if unknown or ambiguous:
        problem = (
            f"{len(unknown)} entries name no image of the folder, e.g. {unknown[:3]}"
            if unknown
            else f"{len(ambiguous)} bare names match several images, e.g. {ambiguous[:3]}"
        )
        raise DataError(
            f"--subset {str(path)!r}: {problem}; list paths relative to {str(dataset.root)!r}"
        )
    if not chosen:
        raise DataError(f"--subset {str(path)!r} lists no images")
    return np.array(sorted(chosen), dtype=np.int64)


# -- the classifier -----------------------------------------------------------------------------


def preprocess(features: torch.Tensor) -> torch.Tensor:
    """Each row minus its own mean, scaled to unit length (cyanure's row preprocessing)."""
    x = features.double()
    x = x - x.mean(dim=1, keepdim=True)
    return F.normalize(x, dim=1)


def fit_logistic(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    lambd: float = 0.1,
    max_iter: int = 500,
) -> torch.Tensor:
    """Weights W (C, D) minimising mean CE(x W^T, y) + lambd / 2 ||W||^2 over preprocessed
    features (no intercept), by L-BFGS from zero. Deterministic."""
    if lambd < 0:
        raise SiamaeError(f"--lambd must be 0 or more, got {lambd}")
    x = preprocess(features)
    y = labels.long()
    weights = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    solver = torch.optim.LBFGS(
        [weights],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        solver.zero_grad()
        loss = F.cross_entropy(x @ weights.T, y) + 0.5 * lambd * weights.pow(2).sum()
        loss.backward()
        return loss

    solver.step(objective)
    return weights.detach()


def predict(weights: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    return (preprocess(features) @ weights.T).argmax(dim=1)


# -- the whole evaluation -----------------------------------------------------------------------


def fewshot_eval(
    encoder: Encoder,
    train_dir: str | Path,
    val_dir: str | Path,
    per_class: int | None = 13,
    subset_file: str | Path | None = None,
    seed: int = 0,
    lambd: float = 0.1,
    pool: str = "mean",
    img_size: int | None = None,
    crop_pct: float = 0.875,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    out_dir: str | Path | None = None,
    source: str = "<encoder>",
    progress: bool = True,
    protocol: str | None = None,
) -> FewShotResult:
    """Fit the few-shot classifier on the subset's features and measure top-1 on ``val_dir``.

    ``subset_file`` (a list file) takes precedence over ``per_class`` (a seeded draw).
    ``out_dir``: where features are cached (shared with the linear probe) and ``fewshot.json``
    is written; ``source`` names the encoder's checkpoint (part of the cache key). ``protocol``
    names the preset the settings came from (recorded; see :mod:`siamae.eval.probes.protocols`).
    """

    device = torch.device(device)
    train_set, val_set, cache = open_probe(
        encoder,
        train_dir,
        val_dir,
        img_size,
        crop_pct,
        pool,
        cache_dir=Path(out_dir) / "features" if out_dir is not None else None,
        source=source,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
    )
    chosen, subset = _labelled_subset(train_set, subset_file, per_class, seed)
    encoder.eval()
    train_feats = _subset_features(cache, train_set, chosen)
    val_feats = cache.of_folder("val", val_set, desc="val features")
    train_labels = train_set.labels[torch.from_numpy(chosen)]
    num_classes = len(train_set.classes)
    weights = fit_logistic(train_feats, train_labels, num_classes, lambd)
    correct = (predict(weights, val_feats) == val_set.labels).sum().item()
    result = FewShotResult(
        top1=100.0 * correct / len(val_set),
        num_labelled=len(chosen),
        num_val=len(val_set),
        num_classes=num_classes,
        lambd=lambd,
        subset=subset,
        info={
            "encoder": source,
            "train": str(Path(train_dir).resolve()),
            "val": str(Path(val_dir).resolve()),
            "pool": pool,
            "features": FEATURES[pool],
            "img_size": cache.img_size,
            "crop_pct": crop_pct,
            **({"protocol": protocol} if protocol else {}),
        },
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "fewshot.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _labelled_subset(
    train_set: ImageFolder, subset_file: str | Path | None, per_class: int | None, seed: int
) -> tuple[np.ndarray, str]:
    """The indices of the labelled images, and how they were chosen (for the result)."""
    if subset_file is not None:
        chosen = read_subset(subset_file, train_set)
        return chosen, f"list {Path(subset_file).name} ({len(chosen)} images)"
    if per_class is not None:
        chosen = draw_subset(train_set.labels.numpy(), per_class, seed)
        return chosen, f"{per_class} images a class, seed {seed}"
    raise SiamaeError("pass --subset LIST_FILE or --per-class N")


def _subset_features(
    cache: FeatureCache, train_set: ImageFolder, chosen: np.ndarray
) -> torch.Tensor:
    """The features of the ``chosen`` training images: sliced from the linear probe's features
    of the whole folder where the cache holds them, else computed (and cached) for the subset."""
    whole = cache.stored("train", cache.key(train_set))
    if whole is not None:
        return whole[torch.from_numpy(chosen)]
    return cache.features(
        "fewshot_train",
        torch.utils.data.Subset(train_set, chosen.tolist()),  # type: ignore[arg-type]
        cache.key(train_set, subset=chosen.tolist()),
        desc="subset features",
    )
