"""Frozen features of a labelled ImageFolder (``root/<class>/<image>``), for the image probes.

Images are decoded in loader workers and come out as uint8 (3, S, S) tensors after a
deterministic resize (short side to ``floor(S / crop_pct)``, bicubic) and a centre crop of S:
the DINO/MAE evaluation transform (256 -> 224 at the default ``crop_pct`` 0.875). Conversion to
float and ImageNet normalisation happen on the device. Nothing here draws random numbers from
the global generators, so calling it in the middle of a training run changes nothing there.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from siamae.data.image_folder import ImageFolder, loader, normalize
from siamae.errors import SiamaeError
from siamae.models.vit import Encoder

Pool = Literal["cls", "mean", "mean-ln", "cls-raw"]
# What a probe reads from the frozen encoder. The last two skip the final norm, as SiameseIM's
# evaluation code does (its ViT has none; it deletes any it is given).
FEATURES: dict[str, str] = {
    "cls": "the CLS token after the final norm",
    "mean": "the mean of the patch tokens after the final norm",
    "mean-ln": "the mean of the last block's patch tokens (final norm skipped), then a fresh "
    "LayerNorm without affine, eps 1e-6 (SiameseIM's linear probe: global_pool + fc_norm)",
    "cls-raw": "the last block's CLS token, final norm skipped (SiameseIM's few-shot code: "
    "forward_features(x)[:, 0])",
}
POOLS: tuple[str, ...] = tuple(FEATURES)
RAW_POOLS = {"mean-ln", "cls-raw"}
FC_NORM_EPS = 1e-6


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, 1 + N, D) tokens -> (B, D) by ``pool`` (see FEATURES): the tokens are the final
    norm's output for "cls"/"mean", the last block's for "mean-ln"/"cls-raw"."""
    if pool in ("cls", "cls-raw"):
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, 1:].mean(dim=1)
    if pool == "mean-ln":
        pooled = tokens[:, 1:].mean(dim=1)
        return F.layer_norm(pooled, (pooled.shape[-1],), eps=FC_NORM_EPS)
    raise ValueError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLS)}")


def encode_features(encoder: Encoder, images: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, 3, H, W) normalised images -> (B, D) features by ``pool`` (see FEATURES)."""
    return pool_tokens(encoder(images, final_norm=pool not in RAW_POOLS), pool)


def _batches(
    source: Dataset | torch.Tensor, batch_size: int, num_workers: int
) -> Iterator[torch.Tensor]:
    if isinstance(source, torch.Tensor):
        for start in range(0, source.shape[0], batch_size):
            yield source[start : start + batch_size]
    else:
        for images, _ in loader(source, batch_size, num_workers):
            yield images


@torch.no_grad()
def extract_features(
    encoder: Encoder,
    source: Dataset | torch.Tensor,
    device: torch.device | str = "cpu",
    pool: str = "cls",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "features",
) -> torch.Tensor:
    """Features of every image, in order: (N, D) float32 on the CPU (not normalised).

    ``source`` is an :class:`ImageFolder` (decoded in ``num_workers`` workers) or a uint8
    tensor (N, 3, S, S) already decoded. The encoder is run in eval mode and its mode is
    restored afterwards.
    """
    from tqdm.auto import tqdm

    if pool not in POOLS:
        raise ValueError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLS)}")
    total = source.shape[0] if isinstance(source, torch.Tensor) else len(source)  # type: ignore[arg-type]
    was_training = encoder.training
    encoder.eval()
    out: list[torch.Tensor] = []
    try:
        with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
            for images in _batches(source, batch_size, num_workers):
                feats = encode_features(encoder, normalize(images, device), pool)
                out.append(feats.float().cpu())
                bar.update(images.shape[0])
    finally:
        encoder.train(was_training)
    return torch.cat(out) if out else torch.empty(0, encoder.embed_dim)


def decode_all(
    dataset: ImageFolder, batch_size: int = 256, num_workers: int = 0, progress: bool = False
) -> torch.Tensor:
    """Every image of ``dataset`` decoded once: uint8 (N, 3, S, S) on the CPU."""
    from tqdm.auto import tqdm

    chunks = []
    with tqdm(total=len(dataset), desc=f"decode {dataset.root.name}", disable=not progress) as bar:
        for images in _batches(dataset, batch_size, num_workers):
            chunks.append(images)
            bar.update(images.shape[0])
    return torch.cat(chunks)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SiamaeError(
            f"device {name!r} was asked for but CUDA is not available; use --device cpu"
        )
    return torch.device(name)
