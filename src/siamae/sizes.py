"""Image sizes against a ViT's patch size: one check for every config field and option that sets
the size an encoder sees (``model.img_size``, ``monitor.img_size``, ``--img-size``, ``--crop``,
a propagation ``resize``) and one patch-count limit, which ``visualize attention`` applies too.

Each function returns the problem as words (None: fine) so that the caller raises the error of
its own kind, naming its own field or option.
"""

from __future__ import annotations

import math

# Attention costs grow with the square of the patch count, and position tables with the count:
# 16384 patches (a 128 x 128 grid, e.g. 2048 x 2048 pixels at patch 16) take tens of seconds for
# a ViT-S forward pass on a CPU; a million (8192 pixels at patch 8) exhaust the memory while the
# model is still being built.
MAX_PATCHES = 16384


def largest_square_side(patch_size: int) -> int:
    """The side in pixels of the largest square image within :data:`MAX_PATCHES`."""
    return math.isqrt(MAX_PATCHES) * patch_size


def size_problem(height: int, width: int, patch_size: int) -> str | None:
    """Why an image of ``height`` x ``width`` pixels cannot go through a ViT of ``patch_size``
    as it is: not positive, not whole patches, or more patches than :data:`MAX_PATCHES`."""
    shown = f"{height}" if height == width else f"{height}x{width}"
    if height <= 0 or width <= 0:
        return f"expected a positive size, got {shown}"
    if height % patch_size or width % patch_size:
        return f"{shown} is not a multiple of the patch size {patch_size}"
    count = (height // patch_size) * (width // patch_size)
    if count > MAX_PATCHES:
        return (
            f"{shown} pixels make {count:,} patches of {patch_size} pixels, above the limit of "
            f"{MAX_PATCHES:,} (attention grows with the square of the count); use at most "
            f"{largest_square_side(patch_size)} pixels a side"
        )
    return None
