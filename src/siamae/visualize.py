"""``siamae visualize``: reconstructions from a training checkpoint, on request."""

from __future__ import annotations

from pathlib import Path

import torch

from siamae.checkpoint import TRAIN_FORMAT, load_checkpoint
from siamae.config import apply_overrides, config_from_dict
from siamae.errors import CheckpointError


def visualize_checkpoint(
    checkpoint: str | Path,
    out: str | Path | None = None,
    data: str | None = None,
    count: int = 4,
    seed: int = 0,
) -> Path:
    """Rebuild the method from the checkpoint's own config and draw ``count`` reconstructions."""
    from siamae.data.dataset import build_dataset
    from siamae.methods import build_method
    from siamae.viz import save_reconstruction

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
    dataset = build_dataset(cfg, method.view_kind, method.encoder.num_patches)
    if out is None:
        ckpt_path = Path(checkpoint)
        run_dir = ckpt_path if ckpt_path.is_dir() else ckpt_path.parent.parent
        out = run_dir / f"reconstruction_step{ckpt.get('step', 0)}.png"
    return save_reconstruction(method.eval(), dataset, out, torch.device("cpu"), count)
