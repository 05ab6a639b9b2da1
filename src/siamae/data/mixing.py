"""MixedAE's image mixing: groups of R images, a random partition of the patch grid per group.

The partition comes from the noise the data loader already makes for every sample (seeded by
(seed, epoch, index)): a group of R consecutive samples takes the argsort of its FIRST sample's
noise and cuts it into R chunks of N/R positions; source slot j supplies the positions of chunk
j. So the partition is a function of the data alone: a resumed run, or a global batch split over
processes whose per-device batch is a multiple of R, mixes exactly the same images the same way.

Positions are kept: a patch taken from source j sits at the position it had in source j.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from siamae.data.image_folder import EvalTransform
from siamae.data.shards import image_source
from siamae.data.sources import DECODE_ERRORS, UnreadableSample
from siamae.errors import DataError
from siamae.models.masking import patchify, unpatchify


@dataclass
class GroupPartition:
    """How the images of a batch are mixed.

    ``order``: (G, N) the group's positions, chunk j (``order[:, j*n:(j+1)*n]``, n = N/R) the
    positions source slot j supplies. ``source_of``: (G, N) the slot (0..R-1) supplying each
    position. Image b of the batch is slot ``b % R`` of group ``b // R``.
    """

    order: torch.Tensor
    source_of: torch.Tensor
    ratio: int

    @property
    def per_source(self) -> int:
        return self.order.shape[1] // self.ratio


def group_partition(noise: torch.Tensor, ratio: int) -> GroupPartition:
    """Partition the patch grid of each group of ``ratio`` consecutive samples into equal sets.

    Args:
        noise: (B, N) the loader's per-sample uniform noise; B a multiple of ``ratio``,
            N a multiple of ``ratio``.
        ratio: R, the number of images mixed into one.
    """
    b, n = noise.shape
    if b % ratio or n % ratio:
        raise ValueError(
            f"a batch of {b} samples with {n} patches cannot be cut into groups of {ratio} "
            "with equal shares of the grid"
        )
    order = torch.argsort(noise[::ratio], dim=1)
    per = n // ratio
    slots = torch.arange(ratio, device=noise.device).repeat_interleave(per)
    source_of = torch.empty_like(order)
    source_of.scatter_(1, order, slots.expand_as(order).contiguous())
    return GroupPartition(order, source_of, ratio)


def mix_images(images: torch.Tensor, part: GroupPartition, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) source images -> (G, C, H, W) mixed images, one per group of R.

    Each patch position of a mixed image is the same patch of the source that supplies it.
    """
    b, c, h, w = images.shape
    r = part.ratio
    patches = patchify(images, patch_size)  # (B, N, F)
    n, f = patches.shape[1:]
    grouped = patches.reshape(b // r, r, n, f)
    index = part.source_of.view(b // r, 1, n, 1).expand(-1, 1, -1, f)
    mixed = torch.gather(grouped, 1, index).squeeze(1)
    return unpatchify(mixed, patch_size, (h // patch_size, w // patch_size))


@dataclass
class UnmixIndex:
    """Per source image: which positions it supplied, in the layout MAE's decoder takes.

    ``ids_keep``: (B, N/R) positions image b supplied (its chunk of the group's order);
    ``ids_restore``: (B, N) inverse of ``[ids_keep, the other positions]``, so
    ``unshuffle_with_mask_tokens`` puts b's tokens back in place and mask tokens elsewhere;
    ``mask``: (B, N) 1 on the positions b did NOT supply (the reconstruction targets);
    ``group``: (B,) the mixed sequence b belongs to; ``slot``: (B,) its slot in the group.
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor
    group: torch.Tensor
    slot: torch.Tensor


def unmix_index(part: GroupPartition) -> UnmixIndex:
    g, n = part.order.shape
    r, per = part.ratio, part.per_source
    device = part.order.device
    group = torch.arange(g, device=device).repeat_interleave(r)
    slot = torch.arange(r, device=device).repeat(g)
    order = part.order[group]  # (B, N)
    # Rolling the group's order by j chunks puts slot j's positions first, the rest after.
    shift = (slot * per).unsqueeze(1)
    cols = (torch.arange(n, device=device).unsqueeze(0) + shift) % n
    ids_shuffle = torch.gather(order, 1, cols)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = (part.source_of[group] != slot.unsqueeze(1)).float()
    return UnmixIndex(ids_shuffle[:, :per], ids_restore, mask, group, slot)


def unmix_latent(latent: torch.Tensor, index: UnmixIndex) -> torch.Tensor:
    """(G, 1 + N, D) encoded mixed sequences -> (B, 1 + N/R, D): per source image, the group's
    CLS then the tokens at the positions it supplied (in ``ids_keep`` order)."""
    per_group = latent[index.group]  # (B, 1 + N, D)
    d = latent.shape[-1]
    patches = torch.gather(per_group[:, 1:], 1, index.ids_keep.unsqueeze(-1).expand(-1, -1, d))
    return torch.cat([per_group[:, :1], patches], dim=1)


# -- a fixed held-out set for the homologous figures ------------------------------------------


def heldout_images(path: str | Path, img_size: int, count: int, ratio: int) -> torch.Tensor:
    """The first ``count`` images (sorted file order, cut to a multiple of ``ratio``) of a folder,
    list file or tar shards, resized (short side) and centre-cropped to ``img_size``: uint8
    (M, 3, S, S).

    A fixed set, so that a training run's logged figures and ``siamae eval homology`` on its
    checkpoint measure the same images.
    """
    source = image_source(path)
    take = min(count, len(source)) // ratio * ratio
    if take == 0:
        raise DataError(
            f"{str(path)!r} holds {len(source)} images: the homologous figures mix groups of "
            f"{ratio}; give a folder with at least {ratio} images"
        )
    transform = EvalTransform(img_size, crop_pct=1.0)
    rng = np.random.default_rng(0)  # unused by file sources; the Source interface takes one
    pixels = []
    for i in range(take):
        try:
            pixels.append(transform(source.open_image(i, rng)))
        except (UnreadableSample, *DECODE_ERRORS) as err:
            raise DataError(
                f"image {source.name(i)!r} could not be decoded ({err}); remove or replace it"
            ) from None
    return torch.stack(pixels)


def heldout_partitions(count: int, num_patches: int, ratio: int, seed: int) -> torch.Tensor:
    """(count, N) uniform noise from ``seed`` alone: the held-out set's partitions
    (:func:`group_partition` of it), the same on every machine and at every evaluation."""
    return torch.rand(count, num_patches, generator=torch.Generator().manual_seed(seed))
