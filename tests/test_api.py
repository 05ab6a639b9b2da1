"""The public Python API (``siamae.__all__``): every name's docstring example runs, methods
built from plain arguments equal the engine's from the recipes, views are the engine's, and a
user's own method trains through ``siamae.train`` once registered (by call or entry point)."""

from __future__ import annotations

import doctest
import importlib
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import siamae
from siamae import registry
from siamae.data.dataset import PretrainDataset, batch_to_device, collate
from siamae.methods.siameseim import min_block
from siamae.recipes import load_config
from siamae.registry import build_method

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.arch=vit_tiny", "model.img_size=32", "model.patch_size=8", "data.source=synthetic"]
RECIPES = {
    "cropmae": "cropmae_vits16_in1k.yaml",
    "siammae": "siammae_vits16_k400.yaml",
    "mae": "mae_vitb16_in1k.yaml",
    "siameseim": "siameseim_vitb16_in1k.yaml",
    "mixedae": "mixedae_vitb16_in1k.yaml",
}
PUBLIC = [name for name in siamae.__all__ if name != "__version__"]


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_has_a_docstring_example_that_runs(name: str) -> None:
    obj = getattr(siamae, name)
    # The example runs with its own module's names, as ``python -m doctest`` would run it.
    home = importlib.import_module(obj.__module__)
    tests = doctest.DocTestFinder(recurse=False).find(obj, name, module=home)
    examples = [t for t in tests if t.examples]
    assert examples, f"siamae.{name} has no docstring example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in examples:
        runner.run(test)
    assert runner.failures == 0, f"siamae.{name}'s example failed (see the output above)"


def test_the_facade_module_examples_run() -> None:
    from siamae import api, models

    for module in (api, models.losses):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_the_package_imports_no_torch_until_a_name_is_used() -> None:
    """The ``siamae`` command sets the OpenMP environment before torch loads."""
    import subprocess
    import sys

    code = "import sys, siamae; siamae.__all__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _same(a: object, b: object) -> bool:
    """Equal, floats to 1e-9 (a recipe file writes 118/196 as 0.6020408163)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-9 * max(abs(a), abs(b))
    return a == b


@pytest.mark.parametrize("name", list(RECIPES))
def test_a_method_from_plain_arguments_is_the_engine_s_from_the_recipe(name: str) -> None:
    """The recipe's own encoder (ViT-S/16 or ViT-B/16) at 64 pixels: 16 patches."""
    cfg = load_config(
        REPO / "configs" / RECIPES[name], ["model.img_size=64", "data.source=synthetic"]
    )
    torch.manual_seed(0)
    engine_method = build_method(cfg)
    timm_name = f"{cfg.model.arch}_patch16_224"
    plain = siamae.create_method(name, timm_name, img_size=64)
    assert type(plain) is type(engine_method)
    # the published defaults are the recipe's: every section but the run's and the data's
    # (the recipe's data path, batch and workers are the run's, not the method's)
    plain_cfg = siamae.create_config(name, timm_name, img_size=64).to_dict()
    recipe = cfg.to_dict()
    if name == "siameseim":  # null: 16 at 196 patches, scaled down for smaller grids
        assert recipe[name]["mask_min_block"] == min_block(196, None) == 16
        recipe[name]["mask_min_block"] = None
    for section in ["model", *type(plain).config_sections]:
        assert _same(plain_cfg[section], recipe[section]), section
    plain.load_state_dict(engine_method.state_dict())
    views = siamae.create_views(name, img_size=64, generator=torch.Generator().manual_seed(1))
    rng = np.random.default_rng(0)
    pictures = [
        Image.fromarray(rng.integers(0, 255, (70, 80, 3), dtype=np.uint8)) for _ in range(8)
    ]
    batch = siamae.collate(
        [views(pictures if name == "siammae" else pictures[i]) for i in range(4)]
    )
    losses = []
    for method in (engine_method, plain):
        torch.manual_seed(2)  # the same dropout and drop-path draws
        losses.append(method(batch).loss)
    assert torch.equal(losses[0], losses[1]), losses


@pytest.mark.parametrize("name", ["cropmae", "siameseim"])
def test_the_views_are_the_engine_s_for_the_same_seed_and_index(name: str) -> None:
    # the recipe pins SiameseIM's block size at 16 (its value at 196 patches); null scales it
    pinned = ["siameseim.mask_min_block=null"] if name == "siameseim" else []
    cfg = load_config(REPO / "configs" / RECIPES[name], TINY + ["data.synthetic_count=3", *pinned])
    method = registry.METHODS[name]
    source = method.build_source(cfg)
    engine = PretrainDataset(source, method.build_views(cfg), 16, seed=5)
    ours = siamae.ViewDataset(
        [source.open_image(i, np.random.default_rng()) for i in range(3)],
        siamae.create_views(name, img_size=32, patch_size=8),
        seed=5,
    )
    ours.set_epoch(2)
    expected = batch_to_device(collate([engine[(2, 1)]]), "cpu")
    got = siamae.collate([ours[1]])
    assert sorted(got) == sorted(expected)
    for key in got:
        assert torch.equal(got[key], expected[key]), key


def test_batch_spec_names_what_forward_reads() -> None:
    spec = siamae.batch_spec("siameseim", img_size=32, patch_size=8)
    assert spec["images"].shape == ("B", 2, 3, 32, 32)
    assert spec["images"].dtype == torch.float32
    assert {"box", "flip", "mask", "mask_noise"} <= set(spec)


def test_an_encoder_or_a_timm_vit_gives_its_weights() -> None:
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10)
    for encoder in (vit, siamae.random_encoder("vit_tiny_patch8_32", seed=3)):
        method = siamae.create_method("siameseim", encoder)
        source = encoder.vit if isinstance(encoder, siamae.Encoder) else encoder
        assert torch.equal(
            method.encoder.vit.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight
        )
        # the EMA target starts from the same weights
        assert torch.equal(
            method.target_encoder.vit.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight
        )
    with pytest.raises(ValueError, match="not a timm ViT name"):
        siamae.create_method("cropmae", "resnet50")
    with pytest.raises(ValueError, match="has no option 'mask_ration'"):
        siamae.create_method("cropmae", mask_ration=0.9)


class CountingMAE(siamae.MAE):
    """A user's method: MAE plus a counter its ``after_step`` hook raises."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    def after_step(self, step: int, total_steps: int) -> None:
        self.steps_seen += 1

    def forward(self, batch):  # noqa: ANN001, ANN201
        out = super().forward(batch)
        out.logs["twice_loss"] = 2 * out.loss.detach()
        return out


def _tiny_run(name: str, out: Path, steps: int) -> siamae.Config:
    return siamae.create_config(
        name, "vit_tiny_patch16_224", img_size=32, patch_size=8,
        data={"synthetic_count": 4, "synthetic_size": 40, "batch_size": 2, "num_workers": 0},
        optim={"max_steps": steps},
        run={"out_dir": str(out), "progress": False, "threads": 1, "visualize": False},
    )  # fmt: skip


def test_a_registered_user_method_trains_through_siamae_train(tmp_path: Path) -> None:
    siamae.register_method("counting_mae", CountingMAE)
    try:
        summary = siamae.train(_tiny_run("counting_mae", tmp_path / "run", 2))
        assert summary["step"] == 2 and summary["method"] == "counting_mae"
        state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
        assert state["model"]["steps_seen"].item() == 2
        assert "twice_loss" in (tmp_path / "run" / "metrics.csv").read_text()
    finally:
        registry.METHODS.pop("counting_mae")
    with pytest.raises(ValueError, match="built-in"):
        siamae.register_method("mae", CountingMAE)
    with pytest.raises(TypeError):
        siamae.register_method("x", dict)  # type: ignore[arg-type]


def test_an_entry_point_registers_a_method(monkeypatch, capsys) -> None:  # noqa: ANN001
    points = [
        EntryPoint("plugin_mae", f"{__name__}:CountingMAE", registry.ENTRY_POINT_GROUP),
        EntryPoint("broken", "no_such_module_here:Thing", registry.ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(registry, "entry_points", lambda group: points)
    try:
        registry._load_entry_points()
        assert registry.METHODS["plugin_mae"] is CountingMAE
        assert "'broken'" in capsys.readouterr().err and "broken" not in registry.METHODS
    finally:
        registry.METHODS.pop("plugin_mae", None)


def test_views_are_an_image_folder_transform(tmp_path: Path) -> None:
    """The README's snippet: ImageFolder(transform=views) + DataLoader + siamae.collate."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    for i in range(4):
        (tmp_path / "c").mkdir(exist_ok=True)
        Image.new("RGB", (40 + i, 48), (i * 50, 0, 0)).save(tmp_path / "c" / f"{i}.png")
    views = siamae.create_views("cropmae", img_size=32, patch_size=8)
    data = ImageFolder(str(tmp_path), transform=views, loader=siamae.open_image)
    batch = next(iter(DataLoader(data, batch_size=4, collate_fn=siamae.collate)))
    assert batch.keys() == {"images", "mask_noise"}
    assert batch["images"].shape == (4, 2, 3, 32, 32)
    model = siamae.create_method("cropmae", "vit_tiny_patch16_224", img_size=32, patch_size=8)
    assert torch.isfinite(model(batch).loss)


def test_all_lists_every_lazy_name() -> None:
    assert set(siamae.__all__) == {"__version__", *siamae._LAZY}
    assert siamae.__version__ == "0.2.0"
