"""What ``siamae finetune`` adds to a recipe: the train/validation split of ``--data``."""

from __future__ import annotations

from pathlib import Path

from siamae.data.shards import is_shard_spec
from siamae.errors import ConfigError

# The split names datasets use (ImageNet and torchvision: train/val; ADE20K: training/validation;
# CIFAR folders: train/test).
TRAIN_SPLITS = ("train", "training")


VAL_SPLITS = ("val", "validation", "valid", "test")


def split_folders(data: str | Path) -> tuple[Path, Path | None]:
    """``--data DIR``: (training folder, validation folder or None). DIR holding a training split
    (``train/`` or ``training/``) is split into it and its validation split (``val/``,
    ``validation/``, ``valid/`` or ``test/``); otherwise DIR is the training folder itself. A DIR
    with a validation split and no training split is refused (its splits are not classes).
    Tar shards (a pattern, a folder of ``.tar`` files, a list) are the training set itself."""
    root = Path(data)
    if is_shard_spec(data):
        return root, None  # tar shards: the training set itself; --val names the validation set
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
    """What ``siamae finetune``'s own flags set, for classification: a layer of overrides below
    ``--set`` (:func:`siamae.recipes.load_config`)."""
    overrides = ["method=finetune"]
    if data is not None:
        train_dir, found_val = split_folders(data)
        overrides += ["data.source=images", f"data.path={train_dir}"]
        if val is None and found_val is not None:
            val = str(found_val)
    if val is not None:
        overrides.append(f"finetune.val={val}")
    return overrides + encoder_and_out_overrides(checkpoint, out, "finetune")


def encoder_and_out_overrides(checkpoint: str | None, out: str | None, section: str) -> list[str]:
    """The overrides of ``--checkpoint`` (``none``: random init) and ``--out``, the same for every
    downstream task; ``section`` is the task's own, which holds its ``checkpoint`` field."""
    overrides = []
    if checkpoint is not None:
        overrides.append(
            f"{section}.checkpoint=null"
            if checkpoint == "none"
            else f"{section}.checkpoint={checkpoint}"
        )
    if out is not None:
        overrides.append(f"run.out_dir={out}")
    return overrides
