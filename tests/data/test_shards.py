"""Tar shards: the same samples, views, losses, resume and DDP as the image folder they came
from; corrupt members skipped and counted; ``siamae data shard``; the ways of naming shards."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from ddp_helpers import train_in_processes
from siamae.commands.cli import main
from siamae.data import shards as S
from siamae.data.dataset import PretrainDataset, build_source
from siamae.data.image_folder import EvalTransform, ImageFolder, validation_folder
from siamae.data.labelled import LabelledImageSource, folder_classes, labelled_source
from siamae.data.mixing import heldout_images
from siamae.data.shard_writer import parse_size, write_shards
from siamae.data.sources import ImageFileSource
from siamae.data.synthetic import synthetic_image
from siamae.data.views import ViewMaker
from siamae.engine.trainer import train
from siamae.errors import DataError
from siamae.eval.probes.linear import AugmentedFolder
from siamae.finetune.classification import FineTune
from siamae.recipes import load_config

TINY = [
    "model.arch=vit_tiny",
    "model.img_size=32",
    "model.patch_size=8",
    "data.source=images",
    "data.batch_size=4",
    "data.num_workers=0",
    "optim.base_lr=1e-3",
    "optim.warmup_steps=2",
    "decoder.dropout=0",
    "decoder.dim=64",
    "decoder.depth=1",
    "decoder.num_heads=2",
    "run.log_every=1",
    "run.progress=false",
    "run.visualize=false",
    "run.tensorboard=false",
]


def write_folder(root: Path) -> Path:
    """root/<class>/: 12 images in three classes, in several formats and PIL modes (JPEGs
    large enough for the DCT-scaled decode, grey, RGBA and 16-bit PNGs, a CMYK JPEG)."""
    for c, name in enumerate(("cat", "dog", "owl")):
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = synthetic_image(4 * c + i, 96)
            image = Image.fromarray(pixels).resize((160, 120))
            if i == 0:
                image.save(root / name / f"{i}.jpg", quality=90)
            elif i == 1:
                image.convert("L").save(root / name / f"{i}.png")
            elif i == 2:
                image.convert("RGBA").save(root / name / f"{i}.png")
            elif c == 0:
                deep = (np.asarray(image.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
                Image.fromarray(deep).save(root / name / f"{i}.deep.png")  # a dot in the stem
            else:
                image.convert("CMYK").save(root / name / f"{i}.jpeg", quality=90)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("images") / "train")


@pytest.fixture(scope="module")
def shards(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder's shards: several of them (a shard closes before 60 kB)."""
    out = tmp_path_factory.mktemp("shards") / "train"
    written = write_shards(folder, out, shard_size=60_000, progress=False)
    assert len(written.shards) >= 3
    return out


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def _losses(run_dir: Path) -> list[str]:
    return [line.split(",")[2] for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]


# -- the same data as the folder ----------------------------------------------------------------


def test_shards_hold_the_folders_images_in_its_order_with_its_labels(
    folder: Path, shards: Path
) -> None:
    files = ImageFileSource(folder)
    source = S.open_shards(shards, labelled=True)
    assert len(source) == len(files) == 12
    for i in range(len(files)):
        assert source.read(i) == files.files[i].read_bytes()  # bytes copied, not re-encoded
    labelled = LabelledImageSource(folder)
    assert source.classes == labelled.classes == folder_classes(folder) == folder_classes(shards)
    assert [source.label(i) for i in range(12)] == labelled.labels.tolist()
    names = [source.member(i) for i in range(12)]
    assert "cat/3_deep.png" in names and "dog/3.jpg" in names  # WebDataset keys, JPEG as .jpg


def test_shards_give_the_same_views_with_the_same_seeds(folder: Path, shards: Path) -> None:
    maker = ViewMaker("pair", out=32, global_scale=(0.5, 1.0))
    from_files = PretrainDataset(ImageFileSource(folder), maker, num_patches=16, seed=3)
    from_shards = PretrainDataset(S.open_shards(shards), maker, num_patches=16, seed=3)
    for epoch in (0, 1):
        for i in range(12):
            a, b = from_files[(epoch, i)], from_shards[(epoch, i)]
            assert a["skipped"] == b["skipped"] == 0
            assert torch.equal(a["images"], b["images"])
            assert torch.equal(a["mask_noise"], b["mask_noise"])
    # a JPEG is drafted (DCT-scaled) from the shard as from its file: 160x120 -> 80x60 here
    image = S.open_shards(shards).open_image(0, np.random.default_rng(0))
    image.draft("RGB", (80, 60))
    assert image.size == (80, 60)


@pytest.mark.parametrize("method", ["cropmae", "mae"])
def test_pretraining_on_shards_gives_the_folders_loss_curve(
    folder: Path, shards: Path, tmp_path: Path, method: str
) -> None:
    runs = {}
    for name, data in (("files", folder), ("shards", shards)):
        # The shards are read in two loader workers (forked: they share the open shards).
        workers = 2 if name == "shards" else 0
        cfg = load_config(
            None,
            [*TINY, f"method={method}", f"data.path={data}", "optim.max_steps=4"]
            + [f"data.num_workers={workers}", f"run.out_dir={tmp_path / name}"],
        )
        train(cfg, resume=False)
        runs[name] = tmp_path / name
    assert _losses(runs["files"]) == _losses(runs["shards"])
    a, b = _weights(runs["files"]), _weights(runs["shards"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    index = json.loads((runs["shards"] / S.SHARD_INDEX_FILE).read_text())
    assert sum(len(r["names"]) for r in index["shards"]) == 12  # cached in the run folder


def test_resume_from_shards_is_bit_identical_and_reuses_the_index(
    shards: Path, tmp_path: Path
) -> None:
    common = [*TINY, "method=cropmae", f"data.path={shards}", "optim.max_steps=6"]
    train(load_config(None, [*common, f"run.out_dir={tmp_path / 'whole'}"]), resume=False)
    split = load_config(None, [*common, f"run.out_dir={tmp_path / 'split'}"])
    train(split, resume=False, stop_after_steps=4)  # 3 steps an epoch: resumes mid-epoch 2
    with mock.patch.object(S, "index_shard", wraps=S.index_shard) as indexing:
        second = train(split, resume="auto")
    assert indexing.call_count == 0  # the run folder's index was read, no shard was
    assert second["step"] == 6
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_gloo_processes_over_shards_match_one(shards: Path, tmp_path: Path) -> None:
    common = [*TINY, "method=cropmae", f"data.path={shards}", "optim.max_steps=2"]
    train(
        load_config(None, [*common, "data.batch_size=4", f"run.out_dir={tmp_path / 'one'}"]),
        resume=False,
    )
    train_in_processes([*common, "data.batch_size=2", f"run.out_dir={tmp_path / 'two'}"])
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    for x, y in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two"), strict=True):
        assert float(x) == pytest.approx(float(y), rel=1e-4)


# -- corrupt members and shards -----------------------------------------------------------------


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _jpeg(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(synthetic_image(index, 48)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_a_corrupt_member_is_skipped_counted_and_named_as_a_corrupt_file(
    tmp_path: Path,
) -> None:
    good = [(f"img{i}.jpg", _jpeg(i)) for i in range(6)]
    bad = [("notes.jpg", b"this is not an image"), ("cut.jpg", _jpeg(9)[:300])]
    members = good[:3] + bad[:1] + good[3:] + bad[1:]
    # The same files in a folder and in a shard: both skip the same two.
    files = tmp_path / "files"
    files.mkdir()
    for name, data in members:
        (files / name).write_bytes(data)
    shard = _tar(tmp_path / "data-000000.tar", members)

    def skipped(source) -> list[str]:  # noqa: ANN001
        ds = PretrainDataset(source, ViewMaker("pair", out=32), num_patches=16)
        names = []
        for i in range(len(source)):
            sample = ds[(0, i)]
            assert sample["images"].shape == (2, 3, 32, 32)
            names += [line.split("\t")[0] for line in sample["skipped_files"].split("\n") if line]
        return sorted({Path(n).name for n in names})

    assert (
        skipped(S.open_shards(shard)) == skipped(ImageFileSource(files)) == ["cut.jpg", "notes.jpg"]
    )

    # A training run counts them and lists them in skipped_files.txt as it does files.
    cfg = load_config(
        None,
        [*TINY, f"data.path={shard}", "data.batch_size=2", "optim.max_steps=4"]
        + [f"run.out_dir={tmp_path / 'run'}"],
    )
    summary = train(cfg, resume=False)
    listed = (tmp_path / "run" / "skipped_files.txt").read_text().splitlines()
    assert summary["skipped"] == len(listed) == 2
    where = shard.resolve()
    assert {line.split("\t")[0] for line in listed} == {f"{where}/notes.jpg", f"{where}/cut.jpg"}


def test_a_broken_shard_keeps_what_precedes_the_break_and_reports_it(tmp_path: Path) -> None:
    whole = _tar(tmp_path / "whole.tar", [(f"img{i}.jpg", _jpeg(i)) for i in range(4)])
    data = bytearray(whole.read_bytes())
    third = S.index_shard(whole)["offsets"][2] - tarfile.BLOCKSIZE  # the third member's header
    data[third : third + 100] = b"\xff" * 100  # garbled name and checksum
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.tar").write_bytes(bytes(data))
    (tmp_path / "broken" / "b.tar").write_bytes(b"not a tar file at all" * 40)
    source = S.open_shards(tmp_path / "broken")
    assert [source.member(i) for i in range(len(source))] == ["img0.jpg", "img1.jpg"]
    reasons = " ".join(why for _, why in source.unreadable)
    assert len(source.unreadable) == 2
    assert "unreadable tar header" in reasons and "not a readable tar file" in reasons
    # a shard cut short: its last member is skipped when read, the cut is reported
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "a.tar").write_bytes(whole.read_bytes()[: third + 700])
    source = S.open_shards(tmp_path / "short")
    assert len(source) == 3
    with pytest.raises(S.UnreadableSample, match="truncated"):
        source.read(2)


# -- the index ---------------------------------------------------------------------------------


def test_the_index_is_cached_and_a_changed_shard_is_indexed_again(
    shards: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in sorted(shards.glob("*.tar")):
        (copy / p.name).write_bytes(p.read_bytes())
    cache = tmp_path / "cache"
    first = S.open_shards(copy, cache_dir=cache)
    assert (cache / S.SHARD_INDEX_FILE).is_file()
    in_processes = S.build_shard_index(S.shard_paths(copy), workers=2)
    assert in_processes == json.loads((cache / S.SHARD_INDEX_FILE).read_text())["shards"]
    with mock.patch.object(S, "index_shard", wraps=S.index_shard) as indexing:
        again = S.open_shards(copy, cache_dir=cache)
        assert indexing.call_count == 0 and len(again) == len(first)
        target = sorted(copy.glob("*.tar"))[1]
        st = target.stat()
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        S.open_shards(copy, cache_dir=cache)
        assert [Path(c.args[0]).name for c in indexing.call_args_list] == [target.name]


def test_a_shard_rewritten_with_the_same_size_and_mtime_is_indexed_again(
    shards: Path, tmp_path: Path
) -> None:
    """Size and mtime alone keep a stale index for a shard rewritten in place (``cp -p``,
    ``rsync -t``): its offsets would point into other members and every image be skipped."""
    shard = tmp_path / "data-000000.tar"
    members = [(f"img{i}.jpg", _jpeg(i)) for i in range(4)]
    _tar(shard, members)
    cache = tmp_path / "cache"
    before = S.open_shards(shard, cache_dir=cache)
    assert before.member(0) == "img0.jpg"
    st = shard.stat()
    _tar(shard, members[::-1])  # the same members in another order: the same size
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (shard.stat().st_size, shard.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    after = S.open_shards(shard, cache_dir=cache)
    assert [after.member(i) for i in range(4)] == ["img3.jpg", "img2.jpg", "img1.jpg", "img0.jpg"]
    for i in range(4):  # every image decodes: read at its new offset
        assert after.open_image(i, np.random.default_rng(0)).size == (48, 48)


def test_build_source_reads_shards_for_image_methods_and_refuses_them_for_videos(
    shards: Path, tmp_path: Path
) -> None:
    cfg = load_config(None, [*TINY, f"data.path={shards}", f"run.out_dir={tmp_path}"])
    assert isinstance(build_source(cfg, "pair", str(tmp_path)), S.ShardSource)
    videos = load_config(
        None, [*TINY, "data.source=videos", f"data.path={shards}", f"run.out_dir={tmp_path}"]
    )
    with pytest.raises(DataError, match="hold images"):
        build_source(videos, "frames")


# -- naming shards -------------------------------------------------------------------------------


def test_brace_range_folder_and_list_name_the_same_shards(shards: Path, tmp_path: Path) -> None:
    paths = sorted(shards.glob("*.tar"))
    last = len(paths) - 1
    pattern = f"{shards}/shard-{{000000..{last:06d}}}.tar"
    listing = shards.parent / "train.txt"
    listing.write_text("# the training shards\n" + "".join(f"train/{p.name}\n" for p in paths[:-1]))
    listing.write_text(listing.read_text() + f"train/shard-{{{last:06d}..{last:06d}}}.tar\n")
    for spec in (pattern, shards, listing):
        assert S.is_shard_spec(spec)
        assert [p.resolve() for p in S.shard_paths(spec)] == [p.resolve() for p in paths]
    assert S.expand_braces("a{1..3}{x,y}.tar") == [f"a{n}{c}.tar" for n in (1, 2, 3) for c in "xy"]
    assert S.expand_braces("{08..10}.tar") == ["08.tar", "09.tar", "10.tar"]
    assert not S.is_shard_spec(tmp_path) and not S.is_shard_spec(tmp_path / "list.txt")


def test_a_missing_shard_or_bad_pattern_is_a_clear_error(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"shard-000003\.tar' \(shard 4 of the 100 .* does not exist"
    ):
        S.shard_paths(f"{shards}/shard-{{000000..000099}}.tar")
    with pytest.raises(DataError, match="not a range"):
        S.shard_paths(f"{shards}/shard-{{9..1}}.tar")
    single = _tar(tmp_path / "x.tar", [("a.jpg", _jpeg(0))])
    with pytest.raises(DataError, match="classes.json"):
        S.shard_classes(single)
    (tmp_path / "classes.json").write_text('["a", "b"]')
    with pytest.raises(DataError, match="no <key>.cls"):
        S.open_shards(single, labelled=True)


def test_a_huge_brace_range_is_refused_at_its_first_missing_shard_quickly(
    shards: Path, tmp_path: Path
) -> None:
    """A range of a hundred million names, two of which exist: refused at the third, without
    listing the range (which took 27 s and 4.9 GB, then MemoryError). A subprocess under a
    memory cap and a time bound, so that the test fails, not swaps or hangs, if it comes back."""
    for i, p in enumerate(sorted(shards.glob("*.tar"))[:2]):
        (tmp_path / f"s-{i:08d}.tar").write_bytes(p.read_bytes())
    pattern = f"{tmp_path}/s-{{00000000..99999999}}.tar"
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from siamae.data.shards import shard_paths\n"
        "from siamae.errors import DataError\n"
        "try:\n"
        "    shard_paths(sys.argv[1])\n"
        "except DataError as err:\n"
        "    print(err)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, pattern], capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0, done.stderr[-500:]
    assert "s-00000002.tar' (shard 3 of the 100,000,000" in done.stdout
    assert "does not exist" in done.stdout
    # a list file's brace entries are checked the same way
    listing = tmp_path / "train.txt"
    listing.write_text("s-{00000000..00000005}.tar\n")
    with pytest.raises(DataError, match=r"s-00000002\.tar' \(shard 3 of the 6"):
        S.shard_paths(listing)


def test_a_cls_member_too_large_for_int64_is_a_bad_label_not_a_crash(tmp_path: Path) -> None:
    """``100000000000000000000000`` broke the error path itself (``no attribute '_open'``):
    it is a bad class index, as ``abc`` is."""
    (tmp_path / "classes.json").write_text('["a", "b"]')

    def shard(name: str, cls: bytes) -> Path:
        members = [("k0.jpg", _jpeg(0)), ("k0.cls", b"0"), ("k1.jpg", _jpeg(1)), ("k1.cls", cls)]
        return _tar(tmp_path / name, members)

    huge, word = shard("huge.tar", b"100000000000000000000000"), shard("word.tar", b"abc")
    source = S.open_shards(huge)  # pre-training reads it: the labels are not used
    assert len(source) == 2 and source.labels.tolist() == [0, S.BAD_LABEL]
    with pytest.raises(S.UnreadableSample, match="holds no class index"):
        source.label(1)
    messages = []
    for path in (huge, word):  # the probes (eval knn) refuse both alike, in one line
        with pytest.raises(DataError, match="has no class index") as refused:
            ImageFolder(path, EvalTransform(32))
        messages.append(str(refused.value).replace(path.name, "X"))
    assert messages[0] == messages[1]


def test_cli_reports_a_missing_shard_on_one_line(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(
        [
            "pretrain",
            "--config",
            str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"),
            "--data",
            f"{shards}/shard-{{000000..000099}}.tar",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "does not exist" in err


# -- siamae data shard -------------------------------------------------------------------------


def test_data_shard_round_trips_labels_and_is_deterministic(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert main(["data", "shard", "--images", str(folder), "--out", str(out)]) == 0
    assert "12 images, 3 classes in 1 shard(s)" in capsys.readouterr().out
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog", "owl"]
    source = labelled_source(out)
    assert [source.label(i) for i in range(len(source))] == LabelledImageSource(
        folder
    ).labels.tolist()
    again = tmp_path / "again"
    write_shards(folder, again, progress=False)
    assert (out / "shard-000000.tar").read_bytes() == (again / "shard-000000.tar").read_bytes()
    # a flat folder: no labels, no classes.json
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        (flat / f"{i}.jpg").write_bytes(_jpeg(i))
    written = write_shards(flat, tmp_path / "flat_shards", progress=False)
    assert written.classes is None and not (tmp_path / "flat_shards" / "classes.json").exists()
    assert (S.open_shards(tmp_path / "flat_shards").labels == S.NO_LABEL).all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--images", "{missing}"], "is not a folder"),
        (["--images", "{empty}"], "no images"),
        (["--images", "{folder}", "--out", "{shards}"], "already holds .tar shards"),
        (["--images", "{folder}", "--shard-size", "lots"], "is not a size"),
        (["--images", "{folder}", "--out", "{folder}/cat/0.jpg"], "is a file"),
        (["--prefix", "a/b"], "--prefix 'a/b' is not a plain file-name stem"),
        (["--prefix", "../escaped"], "--prefix '../escaped' is not a plain file-name stem"),
        (["--prefix", ".."], "is not a plain file-name stem"),
        (["--prefix", ""], "is not a plain file-name stem"),
        (["--images", "{folder}", "--out", "{labelled}"], "already holds classes.json"),
    ],
)
def test_data_shard_bad_input_is_one_line_and_exit_2(
    folder: Path,
    shards: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    args: list[str],
    message: str,
) -> None:
    (tmp_path / "empty").mkdir()
    labelled = tmp_path / "labelled"  # another data set's class names, no shards (yet)
    labelled.mkdir()
    (labelled / "classes.json").write_text('["x", "y"]')
    names = dict(
        folder=folder,
        shards=shards,
        missing=tmp_path / "nope",
        empty=tmp_path / "empty",
        labelled=labelled,
    )
    argv = [a.format(**names) for a in args]
    if "--images" not in argv:
        argv += ["--images", str(folder)]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out" / "inner")]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["data", "shard", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    assert (labelled / "classes.json").read_text() == '["x", "y"]'


def test_shard_size_bounds_the_files_on_disk(tmp_path: Path) -> None:
    """``--shard-size 100KB`` gave 102,400-byte shards: tar's end blocks and its 10 kB record
    padding were not counted. Every shard is now at most the size (KB = 1000 bytes), headers
    and padding included, and holds as much as fits; an image larger than it gets its own."""
    images = tmp_path / "images" / "cls"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):  # noise JPEGs of about 12 kB, each size different
        noise = rng.integers(0, 256, (60 + i, 80, 3), dtype=np.uint8)
        Image.fromarray(noise).save(images / f"{i}.jpg", quality=95)
    big = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    Image.fromarray(big).save(images / "big.png")  # about 270 kB: past the limit on its own
    limit = parse_size("100KB")
    assert limit == 100_000 and parse_size("100KiB") == 102_400
    written = write_shards(tmp_path / "images", tmp_path / "out", limit, progress=False)
    sizes = [p.stat().st_size for p in written.shards]

    def members(shard: Path) -> list[str]:
        with tarfile.open(shard) as tar:
            return tar.getnames()

    alone = [p for p in written.shards if "cls/big.png" in members(p)]
    assert len(alone) == 1 and members(alone[0]) == ["cls/big.png", "cls/big.cls"]
    assert all(size <= limit for p, size in zip(written.shards, sizes) if p != alone[0])
    assert len(written.shards) >= 3
    source = S.open_shards(tmp_path / "out")  # tar readers take them: every image is there
    assert len(source) == 13 and not source.unreadable
    # a shard closes only when the next image would not fit: the first is nearly full
    first = S.index_shard(written.shards[0])
    following = sorted(p.name for p in images.iterdir())[len(first["names"])]
    image_member = 512 + -(-(images / following).stat().st_size // 512) * 512
    assert sizes[0] + image_member + 1024 > limit  # (its .cls member: a header and a block)


def test_parse_size() -> None:
    assert parse_size("1GB") == 10**9 and parse_size("512MiB") == 2**29
    assert parse_size("1e6") == 10**6 and parse_size("300kb") == 300_000


# -- fine-tuning and the probes -----------------------------------------------------------------


def test_fine_tuning_from_shards_reads_the_folders_labels(
    folder: Path, shards: Path, tmp_path: Path
) -> None:
    def built(data: Path):  # noqa: ANN202
        cfg = load_config(
            None,
            [*TINY, "method=finetune", f"data.path={data}", f"run.out_dir={tmp_path / data.name}"],
        )
        return FineTune.from_config(cfg).classes, FineTune.build_source(cfg, str(tmp_path))

    classes_f, files = built(folder)
    classes_s, from_shards = built(shards)
    assert classes_f == classes_s == ["cat", "dog", "owl"]
    assert [from_shards.label(i) for i in range(12)] == [files.label(i) for i in range(12)]


def test_probe_folders_read_shards_as_the_folder(
    folder: Path, shards: Path, tmp_path: Path
) -> None:
    transform = EvalTransform(32, crop_pct=1.0)
    files, from_shards = ImageFolder(folder, transform), ImageFolder(shards, transform)
    assert from_shards.classes == files.classes and len(from_shards) == len(files)
    assert torch.equal(from_shards.labels, files.labels)
    for i in range(len(files)):
        assert torch.equal(from_shards[i][0], files[i][0])
    # a validation set with fewer classes: labels follow the names, not the positions
    val = tmp_path / "val"
    for name in ("dog", "owl"):
        (val / name).mkdir(parents=True)
        (val / name / "0.jpg").write_bytes((folder / name / "0.jpg").read_bytes())
    write_shards(val, tmp_path / "val_shards", progress=False)
    checked = validation_folder(tmp_path / "val_shards", transform, files.classes)
    assert checked.labels.tolist() == [1, 2] and checked.skipped == []
    # a validation shard's corrupt member is dropped and named, as a corrupt file is
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "classes.json").write_text(json.dumps(files.classes))
    members = [("a.jpg", _jpeg(0)), ("a.cls", b"1"), ("b.jpg", b"garbage"), ("b.cls", b"2")]
    _tar(corrupt / "val-0.tar", members + [("c.jpg", _jpeg(1)), ("c.cls", b"0")])
    checked = validation_folder(corrupt, transform, files.classes)
    assert checked.labels.tolist() == [1, 0]
    assert [line.split("\t")[0] for line in checked.skipped] == [
        f"{corrupt.resolve()}/val-0.tar/b.jpg"
    ]
    # the linear probe's augmented crops, and MixedAE's held-out images
    augmented = AugmentedFolder(files, seed=5), AugmentedFolder(from_shards, seed=5)
    for i in range(len(files)):
        assert torch.equal(augmented[0][i][0], augmented[1][i][0])
    assert torch.equal(heldout_images(folder, 32, 8, 4), heldout_images(shards, 32, 8, 4))
