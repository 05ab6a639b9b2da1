"""RankMe: the effective rank against hand computations, and its monitor on unlabelled images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siamae.errors import DataError
from siamae.eval.probes.rankme import RankMeMonitor, rankme, read_images
from siamae.models.vit import Encoder


def _orthonormal(n: int, d: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(max(n, d), max(n, d), generator=torch.Generator().manual_seed(seed))
    )
    return q[:n, :d].double()


def test_full_rank_embeddings_have_rank_min_n_d() -> None:
    # 8 orthonormal rows in 8 dimensions: 8 equal singular values, p_k = 1/8, exp(ln 8) = 8.
    assert rankme(_orthonormal(8, 8)) == pytest.approx(8.0, rel=1e-5)
    # Equal singular values times any scale: still 8.
    assert rankme(5.0 * _orthonormal(8, 8)) == pytest.approx(8.0, rel=1e-5)


def test_rank_one_embeddings_have_rank_one() -> None:
    z = torch.outer(torch.arange(1.0, 7.0), torch.tensor([1.0, -2.0, 0.5, 3.0]))
    assert rankme(z) == pytest.approx(1.0, abs=1e-5)


def test_rank_k_embeddings_by_hand() -> None:
    # Two orthogonal directions of lengths 3 and 1 (singular values 3, 1): p = (3/4, 1/4).
    u = _orthonormal(6, 2, seed=1)  # 6 x 2, orthonormal columns
    v = _orthonormal(2, 5, seed=2)  # 2 x 5, orthonormal rows
    z = u @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ v
    by_hand = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))  # 1.7548
    assert rankme(z) == pytest.approx(by_hand, rel=1e-5)
    # k = 3 equal directions in 10 dimensions: 3.
    z3 = _orthonormal(3, 10, seed=3).T @ torch.diag(torch.full((3,), 2.0, dtype=torch.float64))
    assert rankme(z3) == pytest.approx(3.0, rel=1e-5)


def _write_images(root: Path, count: int, nested: bool) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / (f"c{i % 2}" if nested else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("nested", [False, True])
def test_monitor_reads_folders_with_or_without_classes(tmp_path: Path, nested: bool) -> None:
    root = _write_images(tmp_path / "imgs", 6, nested)
    (root / "notes.txt").write_text("not an image")
    images = read_images(str(root), 32, 1.0, limit=5)
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8
    torch.manual_seed(0)
    encoder = Encoder("vit_tiny", 16, 32, depth=2).train()
    result = RankMeMonitor(images, torch.device("cpu"), batch_size=2).run(encoder)
    assert set(result) == {"monitor/rankme_cls", "monitor/rankme_mean"}
    assert all(1.0 <= v <= 5.0 + 1e-6 for v in result.values())
    assert encoder.training  # its mode is restored
    # The same figure as the features taken by hand, in one batch.
    with torch.no_grad():
        from siamae.data.image_folder import normalize

        tokens = encoder.eval()(normalize(images, "cpu"), final_norm=True)
    assert result["monitor/rankme_cls"] == pytest.approx(rankme(tokens[:, 0]), rel=1e-6)
    assert result["monitor/rankme_mean"] == pytest.approx(rankme(tokens[:, 1:].mean(1)), rel=1e-6)


def test_monitor_refuses_a_missing_or_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_images(str(tmp_path / "missing"), 32, 1.0, 10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="RankMe needs 2"):
        read_images(str(tmp_path / "empty"), 32, 1.0, 10)
