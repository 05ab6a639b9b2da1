"""Images in every PIL mode are read with their values scaled by what the mode means, or
skipped as unreadable: real files written in each mode, read back through the file source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siamae.data.image_folder import EvalTransform
from siamae.data.sources import ImageFileSource, UnreadableSample, to_rgb


def _read(tmp_path: Path, image: Image.Image, name: str, **save) -> np.ndarray:
    """Save ``image`` as the file ``name``, read it back through the source, as uint8 RGB."""
    folder = tmp_path / name.replace(".", "_")
    folder.mkdir()
    image.save(folder / name, **save)
    source = ImageFileSource(folder)
    opened = source.open_image(0, np.random.default_rng(0))
    rgb = np.asarray(to_rgb(opened))
    assert rgb.dtype == np.uint8 and rgb.shape == (image.height, image.width, 3)
    return rgb


def _gray(rgb: np.ndarray) -> np.ndarray:
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
    return rgb[..., 0]


def test_16_bit_png_is_scaled_not_clipped_to_white(tmp_path: Path) -> None:
    values = np.array([[0, 1000, 128 * 257], [40000, 65000, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    gray = _gray(_read(tmp_path, image, "deep.png"))
    assert gray.tolist() == [[0, 4, 128], [156, 253, 255]]  # value / 257, rounded


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([[0, 17], [200, 255]], [[0, 17], [200, 255]]),  # 8-bit data in a 32-bit mode
        ([[0, 257], [32896, 65535]], [[0, 1], [128, 255]]),  # 16-bit data: / 257
    ],
)
def test_32_bit_integer_tiff(tmp_path: Path, values, expected) -> None:
    image = Image.fromarray(np.array(values, dtype=np.int32))
    assert image.mode == "I"
    assert _gray(_read(tmp_path, image, "wide.tif")).tolist() == expected


def test_32_bit_values_without_a_range_are_unreadable(tmp_path: Path) -> None:
    image = Image.fromarray(np.array([[0, 70000]], dtype=np.int32))
    image.save(tmp_path / "huge.tif")
    opened = ImageFileSource(tmp_path).open_image(0, np.random.default_rng(0))
    with pytest.raises(UnreadableSample, match="outside 0..65535") as err:
        to_rgb(opened)
    assert err.value.name.endswith("huge.tif")  # the dataset names the file it skipped


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([[0.0, 0.5], [0.25, 1.0]], [[0, 128], [64, 255]]),  # 0..1 floats
        ([[0.0, 12.4], [180.6, 300.0]], [[0, 12], [181, 255]]),  # 0..255 floats, clipped
    ],
)
def test_float_tiff(tmp_path: Path, values, expected) -> None:
    image = Image.fromarray(np.array(values, dtype=np.float32))
    assert image.mode == "F"
    assert _gray(_read(tmp_path, image, "float.tif")).tolist() == expected


def test_alpha_is_dropped_colour_kept(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (3, 2), (10, 20, 30, 0))  # fully transparent: colour still read
    assert (_read(tmp_path, rgba, "rgba.png") == (10, 20, 30)).all()
    la = Image.new("LA", (3, 2), (100, 0))
    assert (_read(tmp_path, la, "la.png") == 100).all()


def test_palette_with_transparency(tmp_path: Path) -> None:
    palette = Image.new("P", (4, 2), 1)
    palette.putpalette([0, 0, 0, 200, 30, 60] + [0] * (3 * 254))
    palette.putpixel((0, 0), 0)
    rgb = _read(tmp_path, palette, "palette.png", transparency=0)
    assert rgb[0, 0].tolist() == [0, 0, 0] and (rgb[1] == (200, 30, 60)).all()


def test_cmyk_and_one_bit(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    rgb = _read(tmp_path, cmyk, "cmyk.tif")
    assert (rgb == (255, 0, 0)).all()
    bits = Image.new("1", (8, 8), 1)
    assert (_read(tmp_path, bits, "bits.png") == 255).all()


def test_probe_transform_reads_16_bit_images(tmp_path: Path) -> None:
    values = np.full((40, 40), 128 * 257, dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        pixels = EvalTransform(32, crop_pct=1.0)(image)
    assert pixels.shape == (3, 32, 32) and (pixels == 128).all()
