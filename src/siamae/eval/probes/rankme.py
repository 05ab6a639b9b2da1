"""RankMe (Garrido et al., 2023): the effective rank of an embedding matrix, a label-free
measure of how many directions a representation uses, and the online monitor that takes it on a
fixed set of unlabelled images.

``RankMe(Z) = exp(-sum_k p_k log p_k)`` with ``p_k = sigma_k / ||sigma||_1 + eps`` over the
singular values ``sigma`` of the (N, D) embeddings (not centred, eps 1e-7, as in the paper): N
orthogonal directions of equal length give N, one direction gives 1.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from siamae.data.image_folder import IMAGE_SUFFIXES, EvalTransform, ImageFolder, normalize
from siamae.data.shards import is_shard_spec
from siamae.data.sources import DECODE_ERRORS
from siamae.errors import DataError
from siamae.eval.probes.features import decode_all, pool_tokens
from siamae.models.vit import Encoder

EPS = 1e-7
POOLS = ("cls", "mean")  # the CLS token, the mean of the patch tokens (final norm)


def rankme(embeddings: torch.Tensor, eps: float = EPS) -> float:
    """The effective rank of ``embeddings`` (N, D), in float64."""
    sigma = torch.linalg.svdvals(embeddings.double())
    p = sigma / sigma.sum().clamp_min(1e-300) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def _image_files(root: Path) -> list[Path]:
    files = [
        Path(d) / f
        for d, _, names in os.walk(root)
        for f in names
        if Path(f).suffix.lower() in IMAGE_SUFFIXES
    ]
    return sorted(files)


def read_images(source: str, img_size: int, crop_pct: float, limit: int) -> torch.Tensor:
    """The first ``limit`` images (sorted paths, or shard order) of a folder, read recursively
    with or without class folders, or of tar shards: uint8 (N, 3, S, S). Unreadable files are
    left out."""
    transform = EvalTransform(img_size, crop_pct)
    if is_shard_spec(source):
        return decode_all(ImageFolder(source, transform))[:limit]
    root = Path(source)
    if not root.is_dir():
        raise DataError(
            f"monitor.images {source!r} does not exist; pass an image folder or tar shards"
        )
    images = []
    for path in _image_files(root):
        if len(images) == limit:
            break
        try:
            with Image.open(path) as im:
                images.append(transform(im))
        except DECODE_ERRORS:
            continue
    if len(images) < 2:
        raise DataError(
            f"monitor.images {source!r} has {len(images)} readable image(s); RankMe needs 2 or more"
        )
    return torch.stack(images)


class RankMeMonitor:
    """RankMe of the CLS token and of the mean-pooled patch tokens on ``images`` (uint8)."""

    def __init__(self, images: torch.Tensor, device: torch.device, batch_size: int = 64) -> None:
        self.images = images
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def run(self, encoder: Encoder) -> dict[str, float]:
        """One pass over the images: both poolings from the same tokens."""
        was_training = encoder.training
        encoder.eval()
        pooled: dict[str, list[torch.Tensor]] = {pool: [] for pool in POOLS}
        try:
            for start in range(0, self.images.shape[0], self.batch_size):
                batch = normalize(self.images[start : start + self.batch_size], self.device)
                tokens = encoder(batch, final_norm=True)
                for pool in POOLS:
                    pooled[pool].append(pool_tokens(tokens, pool).float().cpu())
        finally:
            encoder.train(was_training)
        return {f"monitor/rankme_{pool}": rankme(torch.cat(pooled[pool])) for pool in POOLS}
