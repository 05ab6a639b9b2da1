"""Pictures of a training run, drawn at its end: the method's own picture (reconstructions) and
the loss curve (``siamae visualize`` draws the first again from a checkpoint: :mod:`siamae.commands.viz`).

Every picture says what it shows without the console: a title with the method and the step,
titled columns, axis labels and a legend. Matplotlib draws them through its object API
(``matplotlib.figure.Figure``), so no global backend or figure state is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from siamae.data.dataset import batch_to_device, collate
from siamae.engine.logging import read_metrics
from siamae.methods.base import DrawsPictures, MasksPatches, Method, ScalesPictures


def to_image(image: torch.Tensor) -> np.ndarray:
    """RGB (3, H, W) in [0, 1] -> displayable (H, W, 3) float array, clipped to [0, 1]."""
    return image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()


def save_picture_grid(
    columns: list[tuple[str, torch.Tensor]],
    path: str | Path,
    title: str,
    cell: float = 2.2,
    scales: dict[str, Any] | None = None,
) -> Path:
    """One sample a row, one titled column per entry of ``columns`` ((B, 3, H, W) in [0, 1]).
    A column named in ``scales`` (title -> :class:`siamae.methods.base.ColourScale`) gets a
    colour bar below it, with its label and units."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if not columns:
        raise ValueError("a picture needs at least one column")
    rows = min(images.shape[0] for _, images in columns)
    fig = Figure(figsize=(cell * len(columns), cell * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, len(columns), squeeze=False)
    for c, (name, images) in enumerate(columns):
        for r in range(rows):
            ax = axes[r][c]
            ax.imshow(to_image(images[r]))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=10)
            if c == 0:
                ax.set_ylabel(f"sample {r + 1}", fontsize=9)
        scale = (scales or {}).get(name)
        if scale is not None:
            bar = fig.colorbar(
                ScalarMappable(Normalize(scale.vmin, scale.vmax), colormaps[scale.cmap]),
                ax=[axes[r][c] for r in range(rows)],
                location="bottom",
                shrink=0.9,
            )
            bar.set_label(scale.label, fontsize=7)
            bar.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _last_logged_step(run_dir: Path) -> int | None:
    try:
        steps = [r["step"] for r in read_metrics(run_dir) if "step" in r]
    except (OSError, ValueError):
        return None
    return int(steps[-1]) if steps else None


@torch.no_grad()
def save_reconstruction(
    method: Method,
    dataset: Any,
    path: str | Path,
    device: torch.device | str = "cpu",
    count: int = 4,
    step: int | None = None,
) -> Path | None:
    """Draw ``method.picture`` of the first ``count`` samples of epoch 0, one sample a row.

    The columns are whatever the method's ``picture(batch)`` returns (by default the
    reconstruction: reference view, masked view, prediction, target view unmasked); a method
    that draws none (no :class:`~siamae.methods.base.DrawsPictures`, or None for this batch)
    gets no picture (and None is returned). The title names the method and the step
    (``step``; when not given, the last step logged in the picture's folder, if any). The
    samples carry their own mask noise, so the picture is the same however often it is made,
    and making it does not touch the global RNG.
    """

    if not isinstance(method, DrawsPictures):
        return None
    samples = [dataset[(0, i)] for i in range(min(count, len(dataset)))]
    inputs = batch_to_device(collate(samples), device)
    was_training = method.training
    method.eval()
    try:
        columns = method.picture(inputs)
    finally:
        method.train(was_training)
    if not columns:
        return None
    path = Path(path)
    if step is None:
        step = _last_logged_step(path.parent)
    name = method.name
    details = [f"step {step}" if step is not None else "step unknown"]
    if isinstance(method, MasksPatches):
        details.append(f"mask ratio {method.mask_ratio:g}")
    scales = method.picture_scales if isinstance(method, ScalesPictures) else None
    return save_picture_grid(columns, path, f"{name}: {', '.join(details)}", scales=scales)


def save_loss_curve(run_dir: str | Path, path: str | Path) -> Path:
    """Loss and learning rate against step, from the run's metrics.jsonl, with a legend."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    records = [r for r in read_metrics(run_dir) if "loss" in r and r["loss"] is not None]
    method = _run_method(run_dir)
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    if records:
        steps = [r["step"] for r in records]
        marker = "o" if len(records) < 20 else None  # a few points stay visible
        lines = ax.plot(
            steps, [r["loss"] for r in records], color="tab:blue", marker=marker, label="loss"
        )
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if steps[0] == steps[-1]:
            ax.set_xlim(steps[0] - 1, steps[0] + 1)
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        if all("lr" in r for r in records):
            lr_axis = ax.twinx()
            lines += lr_axis.plot(
                steps,
                [r["lr"] for r in records],
                color="tab:orange",
                linestyle="--",
                marker="x" if marker else None,
                label="learning rate (right axis)",
            )
            lr_axis.set_ylabel("learning rate")
        ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
        span = f"step {steps[0]}" if steps[0] == steps[-1] else f"steps {steps[0]}-{steps[-1]}"
        title = f"{method + ': ' if method else ''}training loss, {span}"
    else:
        ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=ax.transAxes)
        title = f"{method + ': ' if method else ''}training loss"
    ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _run_method(run_dir: Path) -> str | None:
    """The method named in the run's config.yaml, if it can be read."""
    import yaml

    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    method = data.get("method") if isinstance(data, dict) else None
    return method if isinstance(method, str) else None
