"""``siamae visualize``: a training checkpoint's picture drawn again (the method rebuilt from
the checkpoint's own config), with :mod:`siamae.engine.pictures`, which draws a run's pictures
at its end."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from siamae.checkpoint import TRAIN_FORMAT, load_checkpoint
from siamae.config import apply_overrides
from siamae.data.dataset import build_dataset
from siamae.engine.pictures import save_reconstruction
from siamae.errors import CheckpointError, SiamaeError
from siamae.recipes import config_from_dict
from siamae.registry import build_method


def visualize_checkpoint(
    checkpoint: str | Path,
    out: str | Path | None = None,
    data: str | None = None,
    count: int = 4,
    seed: int = 0,
) -> Path:
    """``siamae visualize``: rebuild the method from the checkpoint's own config and draw its
    picture of ``count`` samples (``<run folder>/reconstruction_step<N>.png`` by default)."""

    ckpt = load_checkpoint(checkpoint)
    if ckpt.get("format") != TRAIN_FORMAT:
        raise CheckpointError(
            f"{checkpoint}: visualize needs a siamae training checkpoint (with its decoder); "
            "exported encoders and plain state dicts hold no decoder"
        )
    raw = ckpt["config"]
    overrides = [f"run.seed={seed}"]
    if data is not None:
        overrides.append(f"data.path={data}")
        if raw["data"]["source"] == "synthetic":
            overrides.append("data.source=images")
    cfg = config_from_dict(apply_overrides(raw, overrides))
    method = build_method(cfg)
    try:
        method.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{checkpoint}: weights do not fit the {cfg.method} model of its config ({err})"
        ) from None
    step = int(ckpt.get("step", 0))
    if out is None:
        ckpt_path = Path(checkpoint)
        run_dir = ckpt_path if ckpt_path.is_dir() else ckpt_path.parent.parent
        out = run_dir / f"reconstruction_step{step}.png"
    with tempfile.TemporaryDirectory(prefix="siamae-visualize-") as cache:  # a video index
        dataset = build_dataset(
            cfg,
            method.view_kind,
            method.encoder.num_patches,
            views=method.build_views(cfg),
            source=method.build_source(cfg, cache),
        )
        path = save_reconstruction(
            method.eval(), dataset, out, torch.device("cpu"), count, step=step
        )
    if path is None:
        raise SiamaeError(
            f"{checkpoint}: the {cfg.method} method draws no picture; for its encoder's "
            "attention use 'siamae visualize attention --checkpoint ... --images ...'"
        )
    return path
