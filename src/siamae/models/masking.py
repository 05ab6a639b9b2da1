"""Random masking, patchify/unpatchify and normalised-pixel targets."""

from __future__ import annotations

import torch


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """How many patches stay visible: MAE's rounding, ``int(N * (1 - ratio))``.

    At N=196: ratio 0.985 keeps 2, 0.95 keeps 9, 0.75 keeps 49 (the published results used this).
    Never fewer than one, so an encoder always has a patch to look at.
    """
    return max(1, int(num_patches * (1 - mask_ratio)))


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str = "cpu",
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise.

    Args:
        noise: optional (B, N) noise in [0, 1); drawn from the global generator when absent.
            The data loader supplies it per sample so that masks do not depend on how a global
            batch is split across processes.

    Returns:
        ids_keep: (B, K) indices of visible patches, K = ``num_visible(N, ratio)``.
        mask: (B, N) float, 1 where a patch is masked (hidden), 0 where visible.
        ids_restore: (B, N) inverse permutation: ``gather(shuffled, ids_restore)`` is in order.

    >>> from siamae import random_masking
    >>> ids_keep, mask, ids_restore = random_masking(2, 16, mask_ratio=0.75)
    >>> ids_keep.shape, mask.sum(dim=1).tolist()
    (torch.Size([2, 4]), [12.0, 12.0])
    """
    if noise is None:
        noise = torch.rand(batch_size, num_patches, device=device)
    if noise.shape != (batch_size, num_patches):
        raise ValueError(f"noise must be ({batch_size}, {num_patches}), got {tuple(noise.shape)}")
    keep = num_visible(num_patches, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(batch_size, num_patches, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, N, D), (B, K) -> (B, K, D)."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def unshuffle_with_mask_tokens(
    visible: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor
) -> torch.Tensor:
    """Put visible tokens back in place and fill the rest with the mask token.

    Args:
        visible: (B, K, D) visible tokens (no CLS), in ``ids_keep`` order.
        mask_token: (1, 1, D).
        ids_restore: (B, N).
    Returns:
        (B, N, D) in patch order.
    """
    b, k, d = visible.shape
    n = ids_restore.shape[1]
    filled = torch.cat([visible, mask_token.expand(b, n - k, d).to(visible.dtype)], dim=1)
    return gather_tokens(filled, ids_restore)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches row-major, each patch (p, p, C) flattened.

    >>> import torch
    >>> from siamae import patchify
    >>> patchify(torch.rand(2, 3, 32, 32), patch_size=8).shape
    torch.Size([2, 16, 192])
    """
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    gh, gw = h // p, w // p
    x = images.reshape(b, c, gh, p, gw, p)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(
    patches: torch.Tensor, patch_size: int, grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W); a square grid unless ``grid`` is given.

    >>> import torch
    >>> from siamae import patchify, unpatchify
    >>> images = torch.rand(2, 3, 32, 32)
    >>> torch.equal(unpatchify(patchify(images, 8), 8), images)
    True
    """
    b, n, f = patches.shape
    p = patch_size
    c = f // (p * p)
    if grid is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"{n} patches do not form a square grid; pass grid=(h, w)")
        grid = (side, side)
    gh, gw = grid
    x = patches.reshape(b, gh, gw, p, p, c)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(b, c, gh * p, gw * p)
