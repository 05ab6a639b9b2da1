"""Pictures: reconstructions (reference, masked view, prediction, original) and the loss curve."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or assumed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from siamae.engine.logging import read_metrics  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def to_rgb(image: torch.Tensor) -> np.ndarray:
    """Normalised (3, H, W) -> displayable (H, W, 3) in [0, 1]."""
    arr = image.detach().float().cpu().permute(1, 2, 0).numpy()
    return np.clip(arr * STD + MEAN, 0, 1)


@torch.no_grad()
def save_reconstruction(
    method, dataset, path: str | Path, device: torch.device | str = "cpu", count: int = 4
) -> Path:  # noqa: ANN001
    """Reconstruct the first ``count`` samples of epoch 0 and save a grid, one sample a row.

    The masks come from the samples' own noise, so the picture is the same however often it is
    made, and making it does not touch the global RNG.
    """
    from siamae.data.dataset import batch_to_device, collate

    samples = [dataset[(0, i)] for i in range(min(count, len(dataset)))]
    inputs = batch_to_device(collate(samples), device)
    was_training = method.training
    method.eval()
    rec = method.reconstruct(inputs)
    method.train(was_training)
    columns = [
        ("reference view", rec.reference),
        ("masked view", rec.masked),
        ("prediction", rec.prediction),
        ("original", rec.original),
    ]
    columns = [(title, images) for title, images in columns if images is not None]
    rows = rec.masked.shape[0]
    fig, axes = plt.subplots(
        rows, len(columns), figsize=(2.4 * len(columns), 2.4 * rows), squeeze=False
    )
    for r in range(rows):
        for c, (title, images) in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(to_rgb(images[r]))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=10)
    fig.suptitle(
        f"{type(method).__name__}: mask ratio {getattr(method, 'mask_ratio', '?')}", fontsize=11
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_loss_curve(run_dir: str | Path, path: str | Path) -> Path:
    """Plot loss (and lr) against step from the run's metrics.jsonl."""
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if records:
        steps = [r["step"] for r in records]
        ax.plot(steps, [r["loss"] for r in records], color="tab:blue", label="loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (norm-pix MSE, masked patches)")
        ax2 = ax.twinx()
        ax2.plot(steps, [r["lr"] for r in records], color="tab:orange", alpha=0.6, label="lr")
        ax2.set_ylabel("learning rate")
    ax.set_title("pre-training loss")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
