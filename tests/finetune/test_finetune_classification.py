"""Fine-tuning: layer-decay groups, mixup/cutmix, erasing, the labelled views, a tiny run on the
engine (overfits, resumes bit-identically, DDP == one process) and the export with its head."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from ddp_helpers import train_in_processes
from siamae.commands.cli import main
from siamae.engine.trainer import train
from siamae.errors import ConfigError
from siamae.finetune.checkpoints import export_classifier
from siamae.finetune.classification import erase_per_sample, mix_batch, pair_order
from siamae.finetune.heads import classify
from siamae.recipes import load_config
from siamae.registry import build_method

COLOURS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def write_folder(root: Path, per_class: int, seed: int) -> Path:
    """root/<colour>/<i>.png: noisy 40x48 images of one colour per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise = rng.integers(-25, 26, size=(40, 48, 3))
            pixels = np.clip(np.array(rgb)[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("labelled")
    return write_folder(base / "train", 8, seed=0), write_folder(base / "val", 2, seed=1)


def tiny(folders: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    train_dir, val_dir = folders
    return [
        "method=finetune",
        "model.arch=vit_tiny",
        "model.img_size=32",
        "model.patch_size=8",
        "data.source=images",
        f"data.path={train_dir}",
        f"finetune.val={val_dir}",
        "data.batch_size=8",
        "data.num_workers=0",
        "optim.base_lr=1e-3",
        "optim.warmup_steps=1",
        "optim.betas=[0.9,0.999]",
        "finetune.eval_batch_size=32",
        "run.log_every=1",
        "run.progress=false",
        "run.visualize=false",
        "run.tensorboard=false",
        f"run.out_dir={out}",
        *extra,
    ]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


# -- pure pieces --------------------------------------------------------------------------------


def test_layer_decay_groups_scale_each_block_as_the_recipe(folders: tuple[Path, Path]) -> None:
    cfg = load_config(
        None,
        tiny(folders, Path("unused"), "model.arch=vit_base", "model.patch_size=16")
        + ["finetune.layer_decay=0.65"],
    )
    with torch.device("meta"):  # ViT-B shapes only; no memory, no initialisation
        method = build_method(cfg)
    groups = method.param_groups(0.05)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(method.encoder.vit.named_parameters())
    assert scale_of[id(named["patch_embed.proj.weight"])] == pytest.approx(0.65**13)
    assert scale_of[id(named["pos_embed"])] == pytest.approx(0.65**13)
    assert scale_of[id(named["cls_token"])] == pytest.approx(0.65**13)
    for i in range(12):
        assert scale_of[id(named[f"blocks.{i}.attn.qkv.weight"])] == pytest.approx(0.65 ** (12 - i))
    for name in ("head.weight", "head.bias", "fc_norm.weight"):
        assert scale_of[id(named[name])] == 1.0
    assert decay_of[id(named["blocks.3.mlp.fc1.weight"])] == 0.05
    for name in ("pos_embed", "cls_token", "blocks.3.mlp.fc1.bias", "fc_norm.weight"):
        assert decay_of[id(named[name])] == 0.0
    # every trainable tensor is in exactly one group; the pre-trained final norm is gone
    assert sorted(scale_of) == sorted(id(p) for p in named.values() if p.requires_grad)
    assert "norm.weight" not in named


def test_mixup_cutmix_targets_sum_to_one_and_pair_adjacent_samples() -> None:
    from timm.data import Mixup

    assert pair_order(8).tolist() == [0, 2, 4, 6, 7, 5, 3, 1]
    images = torch.randn(8, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=5)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    mixed, targets = mix_batch(mixup, images.clone(), labels, seed=3)
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])
    assert torch.allclose(targets.sum(1), torch.ones(8))
    # sample 2k is mixed with 2k + 1 (and the other way round) with one lambda
    lam = float((mixed[0] - images[1]).flatten()[0] / (images[0] - images[1]).flatten()[0])
    for k in range(0, 8, 2):
        assert torch.allclose(mixed[k], lam * images[k] + (1 - lam) * images[k + 1], atol=1e-5)
        assert torch.allclose(mixed[k + 1], lam * images[k + 1] + (1 - lam) * images[k], atol=1e-5)
    # the same seed gives the same mixing; another seed another lambda
    again, _ = mix_batch(mixup, images.clone(), labels, seed=3)
    other, _ = mix_batch(mixup, images.clone(), labels, seed=4)
    assert torch.equal(mixed, again) and not torch.equal(mixed, other)

    cutmix = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=5)
    cut, cut_targets = mix_batch(cutmix, images.clone(), labels, seed=5)
    assert torch.allclose(cut_targets.sum(1), torch.ones(8))
    pasted = (cut[0] != images[0]).any(0)  # the box, taken from the partner
    assert pasted.any() and torch.equal(cut[0][:, pasted], images[1][:, pasted])
    share = float(pasted.float().mean())  # the target weight is the pasted area's share
    assert cut_targets[0, labels[1]] == pytest.approx(share, abs=1e-6)


def test_random_erasing_depends_on_each_sample_seed_only() -> None:
    from timm.data.random_erasing import RandomErasing

    eraser = RandomErasing(1.0, mode="pixel", max_count=1, device="cpu")
    images = torch.randn(4, 3, 16, 16)
    seeds = torch.tensor([11, 12, 13, 14])
    state = torch.get_rng_state()
    batch = erase_per_sample(images, seeds, eraser)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(batch, images) and torch.equal(images, images.clone())
    alone = erase_per_sample(images[2:3], seeds[2:3], eraser)
    assert torch.equal(batch[2], alone[0])


def test_labelled_views_are_seeded_by_the_sample_and_leave_global_rngs(folders) -> None:  # noqa: ANN001
    from siamae.data.labelled import LabelledImageSource, LabelledViews

    source = LabelledImageSource(folders[0])
    assert source.classes == ["blue", "green", "red"] and len(source) == 24
    assert source.label(0) == 0 and source.label(23) == 2
    views = LabelledViews(32)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    a = views(source, 9, np.random.default_rng([0, 1, 9]))
    b = views(source, 9, np.random.default_rng([0, 1, 9]))
    c = views(source, 9, np.random.default_rng([0, 2, 9]))
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])
    assert a.views[0].shape == (32, 32, 3) and a.views[0].dtype == np.uint8
    assert np.array_equal(a.views[0], b.views[0]) and not np.array_equal(a.views[0], c.views[0])
    assert int(a.extras["label"]) == 1 and a.extras["erase_seed"] == b.extras["erase_seed"]


def test_config_errors_name_the_field(folders, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="finetune.aa"):
        load_config(None, tiny(folders, tmp_path, "finetune.aa=rand-m9-foo3"))
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(None, tiny(folders, tmp_path, "data.batch_size=7"))
    with pytest.raises(ConfigError, match="finetune.checkpoint"):
        load_config(None, tiny(folders, tmp_path, f"finetune.checkpoint={tmp_path / 'no.pt'}"))


# -- on the engine ------------------------------------------------------------------------------

PLAIN = [
    "finetune.aa=null",
    "finetune.mixup=0",
    "finetune.cutmix=0",
    "finetune.reprob=0",
    "finetune.smoothing=0",
]
# The whole recipe, with every random piece on (erasing on every image, EMA, drop-path).
RECIPE = [
    "finetune.reprob=1.0",
    "finetune.ema=true",
    "finetune.ema_decay=0.9",
    "model.drop_path=0.1",
]


@pytest.fixture(scope="module")
def overfit_run(folders, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:  # noqa: ANN001
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("overfit")
    cfg = load_config(None, tiny(folders, out, *PLAIN, "optim.max_steps=15", "optim.base_lr=0.1"))
    return out, train(cfg, resume=False)


def test_tiny_finetune_learns_the_classes_and_keeps_the_best(overfit_run) -> None:  # noqa: ANN001
    out, summary = overfit_run
    assert summary["eval"]["top1"] == 100.0 and summary["eval"]["top5"] == 100.0
    lines = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    losses = [float(line.split('"loss": ')[1].split(",")[0]) for line in lines]
    assert losses[-1] < 0.5 * losses[0]
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    assert best["best"] == 100.0 and best["method"] == "finetune"


def test_resume_is_bit_identical_with_the_whole_recipe(folders, tmp_path: Path) -> None:  # noqa: ANN001
    # 3 steps an epoch: the interruption at step 2 and the evaluation at 3 are both crossed.
    torch.set_num_threads(1)
    extra = [*RECIPE, "optim.max_steps=4"]
    train(load_config(None, tiny(folders, tmp_path / "whole", *extra)), resume=False)
    split = load_config(None, tiny(folders, tmp_path / "split", *extra))
    first = train(split, resume=False, stop_after_steps=2)
    assert first["interrupted"] == "stop_after_steps"
    train(split, resume="auto")
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_ddp_two_gloo_processes_match_one_process(folders, tmp_path: Path) -> None:  # noqa: ANN001
    # Mixup/cutmix, erasing, RandAugment and EMA on; drop-path off: its masks are drawn per
    # process, the one thing that cannot match.
    torch.set_num_threads(1)
    extra = ["finetune.reprob=1.0", "finetune.ema=true", "finetune.ema_decay=0.9"]
    extra += ["optim.max_steps=2", "optim.weight_decay=0.05"]
    train(load_config(None, tiny(folders, tmp_path / "one", *extra)), resume=False)
    options = tiny(folders, tmp_path / "ddp", *extra, "data.batch_size=4")
    train_in_processes(options)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "ddp")
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4), k
    assert not torch.equal(a["ema.module.vit.head.weight"], a["encoder.vit.head.weight"])


def test_export_loads_strictly_into_timm_with_its_head(overfit_run, tmp_path: Path) -> None:  # noqa: ANN001
    import json

    import timm
    from safetensors.torch import load_file

    from siamae.commands.cli import main

    out, _ = overfit_run
    assert (
        main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "ft.safetensors")]) == 0
    )
    info = json.loads((tmp_path / "ft.json").read_text())
    assert info["num_classes"] == 3 and info["global_pool"] == "avg"
    assert info["classes"] == ["blue", "green", "red"]
    model = timm.create_model(info["timm_name"], pretrained=False, **info["timm_kwargs"])
    model.load_state_dict(load_file(tmp_path / "ft.safetensors"), strict=True)
    model.eval()
    method = build_method(load_config(out / "config.yaml"))
    method.load_state_dict(weights(out))
    method.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = classify(method.encoder, images), model(images)
    assert theirs.shape == (2, 3)
    assert torch.allclose(ours, theirs, atol=1e-5)
    # timm's own pretrained path keeps the head when the overlay names the class count
    again = timm.create_model(
        info["timm_name"],
        pretrained=True,
        **info["timm_kwargs"],
        pretrained_cfg_overlay=dict(file=str(tmp_path / "ft.safetensors"), num_classes=3),
    ).eval()
    with torch.no_grad():
        assert torch.allclose(again(images), theirs)
    # the Hub layout keeps the trained head: timm's local-dir path gives the same logits
    assert main(["export", "--checkpoint", str(out), "--hub-dir", str(tmp_path / "hub")]) == 0
    hub = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(hub(images), theirs, rtol=0, atol=0)
    assert "**finetune**" in (tmp_path / "hub" / "README.md").read_text()
    # and the direct call gives the same file
    export_classifier(out, tmp_path / "again.safetensors")
    assert (
        load_file(tmp_path / "again.safetensors").keys()
        == load_file(tmp_path / "ft.safetensors").keys()
    )


def test_command_reads_train_and_val_from_one_folder(folders, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from siamae.commands.cli import main

    torch.set_num_threads(1)
    config = tmp_path / "ft.yaml"
    config.write_text("method: finetune\nmodel: {arch: vit_tiny, patch_size: 8, img_size: 32}\n")
    options = [*PLAIN, "data.batch_size=8", "data.num_workers=0", "optim.max_steps=2"]
    options += ["run.progress=false", "run.tensorboard=false"]
    argv = ["finetune", "--config", str(config), "--checkpoint", "none"]
    argv += ["--data", str(folders[0].parent), "--out", str(tmp_path / "run")]
    assert main(argv + [x for o in options for x in ("--set", o)]) == 0
    printed = capsys.readouterr().out
    assert "top1:" in printed and "best.pt" in printed
    # A classifier reconstructs nothing: the run has its loss curve and no reconstruction.
    assert (tmp_path / "run" / "loss_curve.png").is_file()
    assert not (tmp_path / "run" / "reconstruction.png").exists()
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert f"path: {folders[0]}" in saved and f"val: {folders[1]}" in saved
    assert main(argv[:5] + ["--data", str(tmp_path / "nowhere")]) == 2


@pytest.mark.parametrize(
    ("name", "base_lr"),
    [("finetune_vitb16_in1k_mae", 5e-4), ("finetune_vitb16_in1k_siameseim", 2.5e-4)],
)
def test_imagenet_recipes_resolve_to_the_published_protocol(folders, name, base_lr) -> None:  # noqa: ANN001
    config = Path(__file__).parents[2] / "configs" / f"{name}.yaml"
    cfg = load_config(config, [f"data.path={folders[0]}"])
    f = cfg.finetune
    assert (cfg.method, cfg.model.arch, cfg.model.patch_size) == ("finetune", "vit_base", 16)
    assert cfg.optim.base_lr == base_lr and cfg.optim.betas == (0.9, 0.999)
    assert (cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.model.drop_path) == (100, 5, 0.1)
    assert (f.layer_decay, f.mixup, f.cutmix, f.smoothing, f.reprob) == (0.65, 0.8, 1.0, 0.1, 0.25)
    assert f.aa == "rand-m9-mstd0.5-inc1" and f.global_pool and cfg.data.interpolation == "bicubic"


# -- the command's stops and refusals ------------------------------------------------------------


def command(config: Path, data: Path, out: Path, *options: str) -> list[str]:
    argv = ["finetune", "--config", str(config), "--checkpoint", "none", "--data", str(data)]
    argv += ["--out", str(out)]
    for option in [*PLAIN, "data.batch_size=4", "data.num_workers=0", "finetune.eval_batch_size=8"]:
        argv += ["--set", option]
    for option in ["run.progress=false", "run.tensorboard=false", "run.visualize=false", *options]:
        argv += ["--set", option]
    return argv


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tmp_path_factory.mktemp("config") / "ft.yaml"
    config.write_text("method: finetune\nmodel: {arch: vit_tiny, patch_size: 8, img_size: 32}\n")
    return config


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_finetuning_with_128_plus_signal_and_resumes_exactly(
    signum: int,
    folders,  # noqa: ANN001
    tiny_config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from siamae.engine.logging import MetricsLogger

    torch.set_num_threads(1)
    data = folders[0].parent
    run, whole = tmp_path / "run", tmp_path / "whole"
    # 6 steps an epoch (24 images, batch 4): the stop at step 3 and the evaluation at 6 both fall
    # inside the 8 steps.
    options = ("optim.max_steps=8", "run.log_every=1", f"finetune.val={folders[1]}")
    log = MetricsLogger.log

    def signal_at_step_3(self: MetricsLogger, record: dict) -> None:
        log(self, record)
        if record.get("step") == 3 and "loss" in record:
            os.kill(os.getpid(), signum)  # a real signal, to the real handler

    with monkeypatch.context() as patched:
        patched.setattr(MetricsLogger, "log", signal_at_step_3)
        assert main(command(tiny_config, data, run, *options)) == 128 + signum
    out = capsys.readouterr().out
    assert f"interrupted ({signal.Signals(signum).name}) at step 3/8" in out
    assert "top1:" not in out and "best checkpoint" not in out  # not reported as finished
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
    # the same command resumes and ends where an uninterrupted run ends, bit for bit
    assert main(command(tiny_config, data, run, *options)) == 0
    assert "top1:" in capsys.readouterr().out
    assert main(command(tiny_config, data, whole, *options)) == 0
    a, b = weights(whole), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_validation_folder_is_checked_before_any_training(
    folders,
    tiny_config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],  # noqa: ANN001
) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(folders[0], data / "train")
    shutil.copytree(folders[1], data / "val")
    (data / "val" / "purple").mkdir()  # a class the training folder lacks
    shutil.copy(folders[1] / "red" / "0.png", data / "val" / "purple" / "0.png")
    run = tmp_path / "run"
    assert main(command(tiny_config, data, run, "optim.max_steps=30")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("siamae: error: image folder") and "['purple']" in err
    assert not run.exists()  # refused before anything was written or trained

    shutil.rmtree(data / "val" / "purple")
    (data / "val" / "red" / "empty.png").write_bytes(b"")  # zero bytes: not an image
    assert main(command(tiny_config, data, run, "optim.max_steps=2")) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "unreadable" in line]
    assert len(notes) == 1 and "empty.png" in notes[0] and "evaluating the other 6" in notes[0]
    assert "1 unreadable images skipped" in captured.out and "top1:" in captured.out
    listed = (run / "skipped_files.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [str(data / "val" / "red" / "empty.png")]
    # a resumed run lists it once
    assert main(command(tiny_config, data, run, "optim.max_steps=3")) == 0
    assert (run / "skipped_files.txt").read_text().splitlines() == listed


def test_one_class_and_split_names(
    folders,
    tiny_config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],  # noqa: ANN001
) -> None:
    import shutil

    one = tmp_path / "one"
    shutil.copytree(folders[0] / "red", one / "red")
    assert main(command(tiny_config, one, tmp_path / "run1", "optim.max_steps=2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"siamae: error: config field 'data.path': {str(one)!r} has one class folder ('red'); "
        "a classifier needs at least 2 classes: pass a folder with one sub-folder per class "
        "(DIR/<class>/<image>)"
    )
    assert "no validation folder" in err[0]  # and it was told there is no evaluation
    assert not (tmp_path / "run1").exists()

    # ADE20K-style split names are splits, not two classes "training" and "validation"
    ade = tmp_path / "ade"
    shutil.copytree(folders[0], ade / "training")
    shutil.copytree(folders[1], ade / "validation")
    assert main(command(tiny_config, ade, tmp_path / "run2", "optim.max_steps=2")) == 0
    assert "top1:" in capsys.readouterr().out
    saved = (tmp_path / "run2" / "config.yaml").read_text()
    assert f"path: {ade / 'training'}" in saved and f"val: {ade / 'validation'}" in saved

    # a validation split alone is refused (the one-class run above had no split: it was told)
    shutil.rmtree(ade / "training")
    assert main(command(tiny_config, ade, tmp_path / "run3", "optim.max_steps=2")) == 2
    assert "no training split" in capsys.readouterr().err


def test_the_load_report_is_printed(
    folders,
    tiny_config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],  # noqa: ANN001
) -> None:
    from siamae.models.vit import Encoder

    pretrained = tmp_path / "timm_vit_tiny_p8.pth"  # a plain timm state dict
    torch.save(Encoder("vit_tiny", 8, 32).vit.state_dict(), pretrained)
    argv = command(tiny_config, folders[0].parent, tmp_path / "run", "optim.max_steps=1")
    argv[argv.index("none")] = str(pretrained)
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"loaded vit_tiny patch 8 (32px) from {pretrained} [")
    assert first.endswith("encoder tensors matched")
