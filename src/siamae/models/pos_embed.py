"""Fixed 2-D sine-cosine position embeddings (MAE layout)."""

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


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """Position embedding for a (grid_h, grid_w) patch grid, row-major.

    Returns (1 + grid_h * grid_w, dim) when ``cls_token`` (a zero vector first), else
    (grid_h * grid_w, dim). As in MAE's layout, the first half of the channels encodes the
    column (w) and the second half the row (h), so MAE/CropMAE checkpoints stay compatible.
    """
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    gh, gw = np.meshgrid(
        np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij"
    )
    emb_w = sincos_1d(dim // 2, gw)
    emb_h = sincos_1d(dim // 2, gh)
    emb = np.concatenate([emb_w, emb_h], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float()
