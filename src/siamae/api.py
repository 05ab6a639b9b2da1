"""siamae from Python: methods, views and the engine as building blocks for a user's own loop.

A thin facade over the library: :func:`create_method` builds a method from a timm name (or an
:class:`~siamae.models.vit.Encoder`, or a user's own timm ``VisionTransformer``) with the
method's published defaults, through the same ``Method.from_config`` the engine uses;
:func:`create_views` gives the method's view maker as a transform on a PIL image (a list of
frames for SiamMAE) whose output, stacked by :func:`collate`, is exactly the batch the method's
``forward`` takes; :func:`train` runs siamae's own loop, for any registered method
(:func:`register_method` or the ``siamae.methods`` entry-point group).

>>> import torch, siamae
>>> from PIL import Image
>>> _ = torch.manual_seed(0)
>>> model = siamae.create_method("cropmae", "vit_tiny_patch16_224", img_size=32, patch_size=8)
>>> views = siamae.create_views("cropmae", img_size=32, patch_size=8)
>>> batch = siamae.collate([views(Image.new("RGB", (48, 40), "gray")) for _ in range(2)])
>>> out = model(batch)
>>> out.loss.shape, sorted(out.logs)
(torch.Size([]), [])
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from siamae.config import COMMON_SECTIONS, Config
from siamae.data.dataset import normalize_images
from siamae.data.sources import open_lazy, sample_frame_pair
from siamae.data.views import ViewSample
from siamae.engine.trainer import train as engine_train
from siamae.methods.base import Batch, Method
from siamae.models.vit import VIT_SIZES, Encoder
from siamae.recipes import build_config, load_config, resolve
from siamae.registry import METHODS, register_method

__all__ = [
    "TensorSpec",
    "ViewDataset",
    "Views",
    "batch_spec",
    "collate",
    "create_config",
    "create_method",
    "create_views",
    "open_image",
    "register_method",
    "shuffle_generator",
    "train",
]

#: An encoder as :func:`create_method` takes it: a timm name (``vit_small_patch16_224``), an
#: :class:`~siamae.models.vit.Encoder`, or a timm ``VisionTransformer`` of a ViT-T/S/B/L shape.
EncoderSpec = str | Encoder | VisionTransformer

_TIMM_NAME = re.compile(r"^(vit_(?:tiny|small|base|large))_patch(\d+)_(\d+)")


def _encoder_shape(encoder: EncoderSpec) -> tuple[str, int, int]:
    """(arch, patch size, image size) of an encoder given in any of its three forms."""
    if isinstance(encoder, str):
        match = _TIMM_NAME.match(encoder)
        if match is None:
            raise ValueError(
                f"encoder {encoder!r} is not a timm ViT name like 'vit_small_patch16_224' "
                f"(architectures: {', '.join(VIT_SIZES)})"
            )
        return match.group(1), int(match.group(2)), int(match.group(3))
    if isinstance(encoder, Encoder):
        encoder = encoder.vit
    attention: Any = encoder.blocks[0].attn
    shape = (encoder.embed_dim, len(encoder.blocks), int(attention.num_heads))
    archs = [a for a, s in VIT_SIZES.items() if (s.embed_dim, s.depth, s.num_heads) == shape]
    if not archs:
        raise ValueError(
            f"a ViT of width {shape[0]}, depth {shape[1]} and {shape[2]} heads is none of "
            f"{', '.join(VIT_SIZES)}; the methods' published decoders are sized for those"
        )
    patch = encoder.patch_embed.patch_size
    size = encoder.patch_embed.img_size
    assert patch is not None and size is not None  # a ViT with a fixed patch grid
    return archs[0], int(patch[0]), int(size[0])


def _nested(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` as a raw recipe: a mapping value is a section (``decoder={"depth": 2}``); a
    plain value is a field of the method's own sections, else of a common section."""
    kind = METHODS[name]
    sections: dict[str, type] = {
        **kind.config_sections,
        **{s: type(getattr(Config(), s)) for s in COMMON_SECTIONS},
    }
    data: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            data.setdefault(key, {}).update(value)
            continue
        owners = [s for s, cls in sections.items() if is_dataclass(cls) and _has(cls, key)]
        if not owners:
            raise ValueError(
                f"{name} has no option {key!r}; pass a section as a mapping "
                f"(e.g. decoder={{'depth': 2}}) or a field of {', '.join(sections)}"
            )
        data.setdefault(owners[0], {})[key] = value
    return data


def _has(cls: type, key: str) -> bool:
    return any(f.name == key for f in fields(cls))


def create_config(
    name: str,
    encoder: EncoderSpec = "vit_small_patch16_224",
    *,
    img_size: int | None = None,
    patch_size: int | None = None,
    **options: Any,
) -> Config:
    """The resolved config of method ``name`` with ``encoder``'s shape and the published
    defaults for every other field, after ``options`` (see :func:`create_method`).

    What :func:`train` takes, and what :func:`create_method` and :func:`create_views` build
    from; every field is checked as the command line checks it.

    >>> import siamae
    >>> cfg = siamae.create_config("siammae", "vit_small_patch16_224", data={"batch_size": 8})
    >>> cfg.siammae.mask_ratio, cfg.data.batch_size, cfg.data.source
    (0.95, 8, 'synthetic')
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    arch, patch, size = _encoder_shape(encoder)
    data = _nested(name, options)
    model = {"arch": arch, "patch_size": patch_size or patch, "img_size": img_size or size}
    data["model"] = {**model, **data.get("model", {})}
    given = data.get("data", {})
    if "source" not in given:  # no data named: built-in synthetic scenes; a path: files
        video = METHODS[name].view_kind == "frames"
        given["source"] = "synthetic" if "path" not in given else "frames" if video else "images"
    data["data"] = given
    return resolve(build_config({"method": name, **data}))


def create_method(
    name: str,
    encoder: EncoderSpec = "vit_small_patch16_224",
    *,
    img_size: int | None = None,
    patch_size: int | None = None,
    seed: int | None = None,
    **options: Any,
) -> Method:
    """Method ``name`` (``cropmae``, ``siammae``, ``mae``, ``siameseim``, ``mixedae`` or a
    registered one) around ``encoder``, with the published defaults for everything else.

    ``encoder``: a timm name (``vit_small_patch16_224``: its shape, MAE's initialisation), an
    :class:`~siamae.models.vit.Encoder` or a timm ``VisionTransformer`` (its weights are copied
    into the method's encoder; a classifier head is left out, and so is the final norm where
    the method's encoder has none, SiameseIM's; the position table stays fixed).
    ``img_size``/``patch_size`` override the name's. ``options``: a field of the method's own
    config sections (``mask_ratio=0.9``), or a section as a mapping
    (``decoder={"depth": 2}``, ``data={"global_scale": (0.2, 1.0)}``). ``seed``: the
    initial weights are those ``siamae pretrain`` with ``run.seed=seed`` starts from, drawn
    without touching torch's global generator (None: drawn from it).

    The method is an ``nn.Module``: ``method(batch)`` takes the batch :func:`collate` makes
    (:func:`batch_spec` lists its keys, shapes and dtypes) and returns a
    :class:`~siamae.methods.base.MethodOutput` (``loss``, and named scalars in ``logs``).
    After each optimizer step, a loop calls ``method.after_step(step, total_steps)`` where the
    method has one (SiameseIM's EMA target); ``method.param_groups(weight_decay)`` are the
    recipe's AdamW groups.

    >>> import siamae
    >>> model = siamae.create_method("mae", "vit_tiny_patch16_224", img_size=32, mask_ratio=0.5)
    >>> type(model).__name__, model.mask_ratio, model.encoder.embed_dim
    ('MAE', 0.5, 192)
    """
    cfg = create_config(name, encoder, img_size=img_size, patch_size=patch_size, **options)
    if seed is None:
        method = METHODS[name].from_config(cfg)
    else:
        with torch.random.fork_rng(devices=[]):  # as the engine builds it: the global
            torch.manual_seed(seed)  # generator is left as it was
            method = METHODS[name].from_config(cfg)
    if not isinstance(encoder, str):
        _copy_weights(encoder, method)
    return method


def _copy_weights(encoder: Encoder | VisionTransformer, method: Method) -> None:
    vit = encoder.vit if isinstance(encoder, Encoder) else encoder
    state = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    result = method.encoder.vit.load_state_dict(state, strict=False)
    # An encoder without a final norm (SiameseIM's) leaves the given one out; its own pooled
    # norm (fc_norm) keeps its initialisation.
    optional = ("norm.", "fc_norm.") if not method.encoder.final_norm else ()
    missing = [k for k in result.missing_keys if not k.startswith(optional)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(optional)]
    if missing or unexpected:
        raise ValueError(
            f"the encoder's weights do not fit {method.name}'s encoder: missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}"
        )
    sync = getattr(method, "update_target", None)
    if callable(sync):  # an EMA target starts equal to the online encoder
        sync(0.0)


def open_image(path: str | Path) -> Image.Image:
    """An image file opened as the engine opens it: header parsed, pixels decoded by the view
    maker (a JPEG at the smallest DCT scale its crop allows). ``ImageFolder``'s ``loader``.

    >>> import siamae, tempfile, os
    >>> from PIL import Image
    >>> path = os.path.join(tempfile.mkdtemp(), "a.png")
    >>> Image.new("RGB", (20, 10)).save(path)
    >>> siamae.open_image(path).size
    (20, 10)
    """
    return open_lazy(Path(path))


class _OneImage:
    """One image as a siamae source (what the view makers read)."""

    def __init__(self, image: Image.Image) -> None:
        self.image = image

    def __len__(self) -> int:
        return 1

    def name(self, index: int) -> str:
        return str(getattr(self.image, "filename", "") or "image")

    def open_image(self, index: int, rng: np.random.Generator) -> Image.Image:
        return self.image


class _OneVideo(_OneImage):
    """A decoded video (its frames) as a siamae frame source; ``frame_ids`` fix the pair."""

    def __init__(self, frames: Sequence[Image.Image], frame_ids: tuple[int, int] | None) -> None:
        super().__init__(frames[0])
        self.frames, self.frame_ids = frames, frame_ids

    def load_frame_pair(
        self, index: int, rng: np.random.Generator, gap: tuple[int, int]
    ) -> tuple[Image.Image, Image.Image]:
        first, second = self.frame_ids or sample_frame_pair(rng, len(self.frames), gap)
        return self.frames[first], self.frames[second]


class Views:
    """A method's view maker as a transform: a PIL image (for SiamMAE a video, as a sequence of
    PIL frames, and optionally the two frame ids) -> the dict of tensors one sample of the
    method's batch holds: ``images`` (V, 3, H, W) float32 normalised with ImageNet's mean and
    std, ``mask_noise`` (N,) float32 in [0, 1), and the method's extras (SiameseIM's boxes,
    flips and mask). :func:`collate` stacks samples into the batch ``forward`` takes.

    Randomness: ``rng`` (a ``numpy.random.Generator``, what the engine seeds per item by
    (seed, epoch, index)), else a seed drawn from ``generator`` (the one given to
    :func:`create_views`, else torch's global generator: a ``DataLoader`` seeds each worker's
    differently). Views made from an explicit generator inside ``DataLoader`` workers repeat
    across workers (each worker holds a copy): use :class:`ViewDataset` there.

    >>> import torch, siamae
    >>> from PIL import Image
    >>> views = siamae.create_views("cropmae", img_size=32, patch_size=8,
    ...                             generator=torch.Generator().manual_seed(0))
    >>> sample = views(Image.new("RGB", (64, 48), "white"))
    >>> sample["images"].shape, sample["images"].dtype, sample["mask_noise"].shape
    (torch.Size([2, 3, 32, 32]), torch.float32, torch.Size([16]))
    """

    def __init__(
        self,
        maker: Any,
        num_patches: int,
        video: bool,
        generator: torch.Generator | None = None,
    ) -> None:
        self.maker, self.num_patches, self.video = maker, num_patches, video
        self.generator = generator

    def __call__(
        self,
        item: Image.Image | Sequence[Image.Image],
        frame_ids: tuple[int, int] | None = None,
        rng: np.random.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        if rng is None:
            seed = torch.randint(2**62, (1,), generator=self.generator).item()
            rng = np.random.default_rng(int(seed))
        if self.video:
            if isinstance(item, Image.Image):
                raise TypeError("a video method's views take a sequence of frames")
            source: Any = _OneVideo(item, frame_ids)
        elif isinstance(item, Image.Image):
            source = _OneImage(item)
        else:
            raise TypeError(f"expected a PIL image, got {type(item).__name__}")
        made = self.maker(source, 0, rng)
        views, extras = (made.views, made.extras) if isinstance(made, ViewSample) else (made, {})
        # The engine's order: the views first, then the mask noise, from one generator.
        noise = rng.random((self.num_patches,), dtype=np.float32)
        return {
            **{k: torch.as_tensor(np.asarray(v)) for k, v in extras.items()},
            "images": normalize_images(
                torch.from_numpy(np.stack(views)).movedim(-1, -3).contiguous()
            ),
            "mask_noise": torch.from_numpy(noise),
        }


def create_views(
    name: str,
    img_size: int = 224,
    patch_size: int = 16,
    *,
    generator: torch.Generator | None = None,
    **options: Any,
) -> Views:
    """Method ``name``'s view maker, with its published defaults, as a :class:`Views`
    transform. ``options`` as for :func:`create_method` (``data={"views": "same"}``); the
    encoder's architecture does not matter to the views, only ``img_size`` and ``patch_size``.

    >>> import siamae
    >>> from PIL import Image
    >>> views = siamae.create_views("siameseim", img_size=32, patch_size=8)
    >>> sorted(views(Image.new("RGB", (40, 40))))
    ['box', 'flip', 'image_width', 'images', 'mask', 'mask_noise']
    """
    cfg = create_config(
        name, "vit_tiny_patch16_224", img_size=img_size, patch_size=patch_size, **options
    )
    kind = METHODS[name]
    grid = cfg.model.img_size // cfg.model.patch_size
    return Views(kind.build_views(cfg), grid * grid, kind.view_kind == "frames", generator)


def collate(samples: Sequence[Mapping[str, torch.Tensor]]) -> Batch:
    """Stack samples (:class:`Views` outputs) into a batch: every key, a leading batch axis.
    The ``collate_fn`` of a ``DataLoader``; the labels ``ImageFolder`` adds are dropped.

    >>> import torch, siamae
    >>> batch = siamae.collate([{"images": torch.zeros(2, 3, 8, 8)}] * 4)
    >>> batch["images"].shape
    torch.Size([4, 2, 3, 8, 8])
    """
    items = [s[0] if isinstance(s, tuple) else s for s in samples]
    return {k: torch.stack([s[k] for s in items]) for k in items[0]}


@dataclass(frozen=True)
class TensorSpec:
    """One entry of a batch: its shape (``"B"`` the batch axis) and dtype.

    >>> import torch, siamae
    >>> siamae.TensorSpec(("B", 16), torch.float32).shape
    ('B', 16)
    """

    shape: tuple[int | str, ...]
    dtype: torch.dtype


def batch_spec(name: str, img_size: int = 224, patch_size: int = 16) -> dict[str, TensorSpec]:
    """The batch method ``name``'s ``forward`` takes: every key with its shape and dtype, read
    from one sample of its views (so it is always what :func:`create_views` makes).

    >>> import siamae
    >>> for key, spec in siamae.batch_spec("cropmae", img_size=32, patch_size=8).items():
    ...     print(key, spec.shape, spec.dtype)
    images ('B', 2, 3, 32, 32) torch.float32
    mask_noise ('B', 16) torch.float32
    """
    views = create_views(name, img_size, patch_size, generator=torch.Generator().manual_seed(0))
    image = Image.new("RGB", (img_size * 2, img_size * 2), "gray")
    sample = views([image] * 2 if views.video else image)
    order = ["images", "mask_noise"] + sorted(
        k for k in sample if k not in ("images", "mask_noise")
    )
    return {k: TensorSpec(("B", *sample[k].shape), sample[k].dtype) for k in order}


class ViewDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Items of ``dataset`` (PIL images, or ``(image, label)`` as ``ImageFolder`` gives) through
    ``views``, item i seeded as the engine seeds it, by (``seed``, epoch, i): the same views and
    mask noise as ``siamae pretrain`` makes of the same files, in any worker.

    >>> import siamae
    >>> from PIL import Image
    >>> views = siamae.create_views("mae", img_size=32, patch_size=8)
    >>> data = siamae.ViewDataset([Image.new("RGB", (40, 40))] * 3, views, seed=0)
    >>> len(data), data[1]["images"].shape
    (3, torch.Size([1, 3, 32, 32]))
    """

    def __init__(self, dataset: Any, views: Views, seed: int = 0) -> None:
        self.dataset, self.views, self.seed, self.epoch = dataset, views, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next items are seeded with."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.dataset[index]
        image = item[0] if isinstance(item, tuple) else item
        return self.views(image, rng=np.random.default_rng([self.seed, self.epoch, index]))


def shuffle_generator(seed: int = 0, epoch: int = 0) -> torch.Generator:
    """The generator whose ``torch.randperm`` is the engine's order of epoch ``epoch`` (one
    process): ``DataLoader(data, sampler=RandomSampler(data, generator=shuffle_generator(seed,
    epoch)))`` reads the items in the order ``siamae pretrain`` with ``run.seed=seed`` does.
    (Not ``DataLoader(shuffle=True, generator=...)``: the loader draws its workers' seed from
    that generator first.)

    >>> import torch, siamae
    >>> torch.randperm(5, generator=siamae.shuffle_generator(0)).tolist()
    [4, 0, 1, 3, 2]
    """
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def train(
    config: Config | str | Path,
    overrides: Sequence[str] = (),
    resume: str | Path | bool | None = "auto",
) -> dict[str, Any]:
    """siamae's training loop (``siamae pretrain``) on ``config``: a :class:`Config` (from
    :func:`create_config`), or a recipe file with ``--set``-style ``overrides``. Any registered
    method trains, a user's own :class:`~siamae.methods.base.Method` subclass included. Returns
    the run's summary (``summary.json``).

    >>> import siamae, tempfile
    >>> cfg = siamae.create_config("mae", "vit_tiny_patch16_224", img_size=32, patch_size=8,
    ...     data={"source": "synthetic", "synthetic_count": 4, "synthetic_size": 40,
    ...           "batch_size": 2, "num_workers": 0},
    ...     optim={"max_steps": 1}, run={"out_dir": tempfile.mkdtemp(), "progress": False,
    ...           "threads": 1, "visualize": False})
    >>> summary = siamae.train(cfg)  # doctest: +ELLIPSIS
    siamae: ...
    >>> summary["step"]
    1
    """
    cfg = config if isinstance(config, Config) else load_config(config, list(overrides))
    return engine_train(cfg, resume=resume)
