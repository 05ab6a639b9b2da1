"""Class labels through the data layer, for the online linear probe: read from an
ImageFolder-layout folder or labelled shards, carried by the loader batch as bookkeeping, and
never among the method's inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siamae.data.dataset import CLASS_LABEL, batch_to_device, build_dataset, collate
from siamae.data.shard_writer import write_shards
from siamae.data.shards import open_shards
from siamae.data.sources import ImageFileSource, class_labels_of
from siamae.errors import ConfigError
from siamae.recipes import load_config


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/<class>/[sub/]<i>.png, three classes of 3 images (one in a deeper folder)."""
    root = tmp_path_factory.mktemp("labels") / "train"
    for c, name in enumerate(["bird", "cat", "dog"]):
        for i in range(3):
            folder = root / name / ("deep" if i == 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.full((32, 32, 3), 60 * c + 10 * i, np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_an_image_folder_gives_its_sub_folders_as_classes(layout: Path, tmp_path: Path) -> None:
    source = ImageFileSource(layout)
    labels, classes = class_labels_of(source)  # type: ignore[misc]
    assert classes == ["bird", "cat", "dog"]
    assert [classes[v] for v in labels] == [f.relative_to(layout).parts[0] for f in source.files]
    # A flat folder and a list file have no layout to read.
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(source.files[0].read_bytes())
    (layout.parent / "list.txt").write_text(f"{source.files[0]}\n")
    assert class_labels_of(ImageFileSource(flat)) is None
    assert class_labels_of(ImageFileSource(layout.parent / "list.txt")) is None


def test_labelled_shards_give_the_folders_classes(layout: Path, tmp_path: Path) -> None:
    write_shards(layout, tmp_path / "shards", progress=False)
    labels, classes = class_labels_of(open_shards(tmp_path / "shards"))  # type: ignore[misc]
    folder_labels, folder_classes = class_labels_of(ImageFileSource(layout))  # type: ignore[misc]
    assert labels.tolist() == folder_labels.tolist()
    assert len(classes) == len(folder_classes) == 3


def _cfg(data: Path, *extra: str):
    return load_config(
        None,
        ["method=mae", "model.arch=vit_tiny", "model.img_size=32", "model.patch_size=8",
         "data.source=images", f"data.path={data}", "data.num_workers=0", *extra],
    )  # fmt: skip


def test_the_batch_carries_the_class_but_the_method_never_sees_it(layout: Path) -> None:
    plain = build_dataset(_cfg(layout), "single", 16)
    labelled = build_dataset(_cfg(layout, "monitor.online_linear=true"), "single", 16)
    assert labelled.classes == ["bird", "cat", "dog"]
    items = [labelled[(0, i)] for i in (0, 4, 8)]
    batch = collate(items)
    assert batch[CLASS_LABEL].tolist() == [0, 1, 2]
    plain_batch = collate([plain[(0, i)] for i in (0, 4, 8)])
    assert CLASS_LABEL not in plain_batch
    # The method's inputs are those of a run without the probe, key for key and bit for bit.
    inputs, plain_inputs = batch_to_device(batch, "cpu"), batch_to_device(plain_batch, "cpu")
    assert inputs.keys() == plain_inputs.keys() and CLASS_LABEL not in inputs
    assert all((inputs[k] == plain_inputs[k]).all() for k in inputs)


def test_repeated_samples_each_carry_their_items_class(layout: Path) -> None:
    cfg = _cfg(layout, "monitor.online_linear=true", "data.repeated_sampling=2")
    dataset = build_dataset(cfg, "single", 16)
    batch = collate([dataset[(0, i)] for i in (0, 8)])
    assert batch[CLASS_LABEL].tolist() == [0, 0, 2, 2]
    assert batch["images"].shape[0] == 4


def test_the_probe_on_data_without_classes_is_refused(layout: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(ImageFileSource(layout).files):
        (flat / f"{i}.png").write_bytes(f.read_bytes())
    with pytest.raises(ConfigError, match="monitor.online_linear.*no class labels"):
        build_dataset(_cfg(flat, "monitor.online_linear=true"), "single", 16)
    with pytest.raises(ConfigError, match="monitor.online_linear"):
        _cfg(flat, "monitor.online_linear=true", "data.source=synthetic")
