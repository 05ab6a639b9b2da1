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

from siamae.checkpoint import load_checkpoint
from siamae.data.image_folder import EvalTransform, ImageFolder, validation_folder
from siamae.errors import CheckpointError, DataError, SiamaeError
from siamae.eval.probes.features import FEATURES
from siamae.eval.probes.linear import FEATURES_FORMAT, _fingerprint, cached_features
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
    img_size = img_size or encoder.img_size
    if img_size % encoder.patch_size:
        raise SiamaeError(
            f"image size {img_size} is not a multiple of the patch size {encoder.patch_size}"
        )
    transform = EvalTransform(img_size, crop_pct)
    train_set = ImageFolder(train_dir, transform)
    val_set = validation_folder(val_dir, transform, train_set.classes)
    if subset_file is not None:
        chosen = read_subset(subset_file, train_set)
        subset = f"list {Path(subset_file).name} ({len(chosen)} images)"
    elif per_class is not None:
        chosen = draw_subset(train_set.labels.numpy(), per_class, seed)
        subset = f"{per_class} images a class, seed {seed}"
    else:
        raise SiamaeError("pass --subset LIST_FILE or --per-class N")
    encoder = encoder.to(device).eval()
    key_base = {
        **_fingerprint(source),
        "pool": pool,
        "img_size": img_size,
        "crop_pct": crop_pct,
        "pos_resample": getattr(encoder, "pos_resample", "dino"),
    }
    train_resolved = str(Path(train_dir).resolve())
    val_resolved = str(Path(val_dir).resolve())
    cache = Path(out_dir) / "features" if out_dir is not None else None
    feat_kw: dict[str, Any] = dict(
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        pool=pool,
        progress=progress,
    )
    full_key = {**key_base, "folder": train_resolved, "n": len(train_set)}
    train_cache = cache / "train.pt" if cache else None
    if train_cache is not None and _cache_matches(train_cache, full_key):
        # The linear probe's features of the whole training folder: slice the subset.
        train_feats = cached_features(
            encoder, train_set, train_cache, full_key, desc="train features", **feat_kw
        )[torch.from_numpy(chosen)]
    else:
        subset_key = {**full_key, "subset": chosen.tolist()}
        train_feats = cached_features(
            encoder,
            torch.utils.data.Subset(train_set, chosen.tolist()),  # type: ignore[arg-type]
            cache / "fewshot_train.pt" if cache else None,
            subset_key,
            desc="subset features",
            **feat_kw,
        )
    val_feats = cached_features(
        encoder,
        val_set,
        cache / "val.pt" if cache else None,
        {**key_base, "folder": val_resolved, "n": len(val_set)},
        desc="val features",
        **feat_kw,
    )
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
            "train": train_resolved,
            "val": val_resolved,
            "pool": pool,
            "features": FEATURES[pool],
            "img_size": img_size,
            "crop_pct": crop_pct,
            **({"protocol": protocol} if protocol else {}),
        },
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "fewshot.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _cache_matches(path: Path, key: dict[str, Any]) -> bool:
    if not path.is_file():
        return False
    try:
        stored = load_checkpoint(path)
    except CheckpointError:
        return False
    return stored.get("format") == FEATURES_FORMAT and stored.get("key") == key
