"""Fixed 2-D sine-cosine position embeddings (MAE's channel order, or SiameseIM's)."""

from __future__ import annotations

import numpy as np
import torch


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim): half sines, half cosines at frequencies 1/10000^(2i/dim)."""
    if dim % 2 != 0:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# Which coordinate the first half of the channels encodes:
#   "wh": the column (w), then the row (h): MAE's code (its ``emb_h`` is computed from the
#         column grid), kept by CropMAE and SiamMAE;
#   "hw": the row, then the column: SiameseIM's code (``util/pos_embed.py``), whose relative
#         embedding of view 2 also puts the row first.
POS_ORDERS: tuple[str, ...] = ("wh", "hw")


def sincos_2d(
    dim: int, grid_h: int, grid_w: int, cls_token: bool = True, order: str = "wh"
) -> torch.Tensor:
    """Position embedding for a (grid_h, grid_w) patch grid, row-major.

    Returns (1 + grid_h * grid_w, dim) when ``cls_token`` (a zero vector first), else
    (grid_h * grid_w, dim). ``order`` "wh" (MAE's layout, the default): the first half of the
    channels encodes the column (w) and the second half the row (h), so MAE/CropMAE checkpoints
    stay compatible; "hw" (SiameseIM's): the row first.

    >>> from siamae import sincos_2d
    >>> sincos_2d(192, 4, 4).shape  # CLS row first (zeros)
    torch.Size([17, 192])
    """
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    if order not in POS_ORDERS:
        raise ValueError(f"unknown channel order {order!r}; choose one of {', '.join(POS_ORDERS)}")
    gh, gw = np.meshgrid(
        np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij"
    )
    emb_w = sincos_1d(dim // 2, gw)
    emb_h = sincos_1d(dim // 2, gh)
    halves = [emb_w, emb_h] if order == "wh" else [emb_h, emb_w]
    emb = np.concatenate(halves, axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float()


# How a position table is resampled to another grid at evaluation:
#   "dino": what the published propagation code runs (DINO's ``interpolate_pos_encoding``):
#           bicubic, scale factor (h + 0.1) / h0 by (w + 0.1) / w0, no antialiasing;
#   "timm": timm's ``resample_abs_pos_embed`` (bicubic to the exact size, antialiased).
POS_RESAMPLE_MODES: tuple[str, ...] = ("dino", "timm")
POS_RESAMPLE_HELP = {
    "dino": "DINO's formula (bicubic, scale factor (h + 0.1) / h0, no antialias)",
    "timm": "timm's resample_abs_pos_embed (bicubic, antialiased)",
}


def resample_grid_dino(
    patch_pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """(1, h0*w0, D) patch positions -> (1, h*w, D) by DINO's formula.

    ``F.interpolate`` is given the scale factor, not the size: the sampling positions follow
    (h + 0.1) / h0 (the 0.1 avoids floating-point rounding to h - 1 rows), which is what the
    published DINO/CropMAE evaluations computed; the output has exactly h x w cells.
    """
    import torch.nn.functional as F

    (h0, w0), (h, w) = old_grid, new_grid
    dim = patch_pos.shape[-1]
    grid = patch_pos.reshape(1, h0, w0, dim).permute(0, 3, 1, 2)
    out = F.interpolate(
        grid.float(),
        scale_factor=((h + 0.1) / h0, (w + 0.1) / w0),
        mode="bicubic",
        align_corners=False,
    )
    if out.shape[-2:] != (h, w):  # pragma: no cover - the +0.1 makes the floor land on h, w
        raise RuntimeError(f"DINO resampling gave a {tuple(out.shape[-2:])} grid, not {(h, w)}")
    return out.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, dim)


def resample_position_table(
    pos: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    mode: str = "dino",
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """(1, prefix + h0*w0, D) -> (1, prefix + h*w, D); prefix (CLS) rows are kept as they are.

    >>> from siamae import resample_position_table, sincos_2d
    >>> table = sincos_2d(192, 4, 4).unsqueeze(0)
    >>> resample_position_table(table, (4, 4), (6, 8)).shape
    torch.Size([1, 49, 192])
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    if mode == "dino":
        prefix, patches = pos[:, :num_prefix_tokens], pos[:, num_prefix_tokens:]
        return torch.cat([prefix, resample_grid_dino(patches, old_grid, new_grid)], dim=1)
    if mode == "timm":
        from timm.layers.pos_embed import resample_abs_pos_embed

        resampled: torch.Tensor = resample_abs_pos_embed(
            pos,
            new_size=list(new_grid),
            old_size=list(old_grid),
            num_prefix_tokens=num_prefix_tokens,
        )
        return resampled
    raise ValueError(
        f"unknown position resampling {mode!r}; choose one of {', '.join(POS_RESAMPLE_MODES)}"
    )
