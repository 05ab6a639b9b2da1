"""Typed configuration: dataclasses, YAML files, ``--set key=value`` overrides, validation.

Every field is checked before training starts; a bad one raises :class:`ConfigError` naming the
field (``optim.base_lr``), what it got and what it accepts. Fields left ``null`` take the chosen
method's published value when the config is resolved (:mod:`siamae.recipes`), so switching
``method=siammae`` on the command line also switches its mask ratio and crop scale. This module
knows no method: data and methods read it, never the other way round.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from siamae.errors import ConfigError

# Parsing and checking are the package's one way (siamae.options); the names stay importable
# from here, where the config's readers have always found them.
from siamae.options import apply_overrides as apply_overrides
from siamae.options import check as _check
from siamae.options import from_dict as from_dict
from siamae.options import yaml_problem
from siamae.sizes import size_problem

Arch = Literal["vit_tiny", "vit_small", "vit_base", "vit_large"]
ViewStrategy = Literal["global_to_local", "local_to_global", "random", "same"]
SourceKind = Literal["images", "synthetic", "videos", "frames"]
VideoBackend = Literal["pyav", "torchcodec"]
VideoDevice = Literal["cpu", "cuda"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
CropSampler = Literal["torchvision", "clamp"]
Interpolation = Literal["bilinear", "bicubic"]
WandbMode = Literal["online", "offline", "disabled"]
SectionT = TypeVar("SectionT")


@dataclass
class ModelConfig:
    """The encoder."""

    arch: Arch = "vit_small"
    patch_size: int = 16
    img_size: int = 224
    drop_path: float = 0.0


@dataclass
class MaskedObjectiveConfig:
    """A masked-reconstruction objective's own fields (the ``cropmae``, ``siammae`` and ``mae``
    sections): ``mask_ratio`` null takes the method's published value."""

    mask_ratio: float | None = None
    norm_pix_loss: bool = True


@dataclass
class DecoderConfig:
    """The decoder; ``null`` fields take the method's published value."""

    dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_dim: int | None = None
    dropout: float | None = None
    norm_style: Literal["post", "pre"] | None = None


@dataclass
class DataConfig:
    """Where images come from and how views are made (views are made in loader workers)."""

    source: SourceKind = "images"
    path: str | None = None
    batch_size: int = 32
    num_workers: int = 8
    views: ViewStrategy = "global_to_local"
    global_scale: tuple[float, float] | None = None
    local_scale: tuple[float, float] = (0.3, 0.6)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # torchvision's RandomResizedCrop sampling (what the published runs executed) or the
    # BYOL-style clamp the official CropMAE code defines but never calls.
    crop_sampler: CropSampler = "torchvision"
    # The resampling filter of the crops; null: the method's recipe (MAE bicubic, else bilinear).
    interpolation: Interpolation | None = None
    hflip: float = 0.5
    color_jitter: float = 0.0
    blur: float = 0.0
    # Frame pairs (SiamMAE): gap drawn uniformly from [min, max) frames, clamped to the video.
    frame_gap: tuple[int, int] = (4, 48)
    repeated_sampling: int = 1
    # Video files: the decoder (PyAV, or torchcodec with the system's FFmpeg), its threads per
    # loader worker (0: FFmpeg's default), and torchcodec's device ("cuda": NVDEC).
    video_backend: VideoBackend = "pyav"
    video_threads: int = 1
    video_device: VideoDevice = "cpu"
    # Built-in synthetic data (the demo): how many images/videos and at what resolution.
    synthetic_count: int = 512
    synthetic_size: int = 128
    synthetic_frames: int = 24


@dataclass
class OptimConfig:
    """AdamW with linear warmup and half-cosine decay, set per iteration before each step."""

    base_lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    epochs: float = 400
    warmup_epochs: float = 20
    max_steps: int | None = None
    warmup_steps: int | None = None
    accum_steps: int = 1
    clip_grad: float | None = None
    # The published runs decay CLS and mask tokens (timm's rule: every 2+ dim weight); true
    # exempts them, as many re-implementations do.
    no_decay_tokens: bool = False
    # After the warmup: half-cosine (pre-training, classification) or poly (segmentation).
    schedule: Literal["cosine", "poly"] = "cosine"
    poly_power: float = 1.0


@dataclass
class MonitorConfig:
    """Online monitors, every ``every_epochs`` (or ``every_steps``) on rank 0: the k-NN top-1
    on a labelled ImageFolder (``knn_train``/``knn_val``), RankMe on unlabelled images
    (``images``, at most ``max_images``) and label propagation J&F on a DAVIS-layout root
    (``davis``, ``sequences``, ``max_frames``, ``davis_protocol``, ``davis_set``: the options of
    ``siamae eval davis``). RankMe and J&F are also taken before the first step of a new run.

    ``every_steps``, when set, replaces ``every_epochs``. ``img_size`` null: the model's size.
    Images are resized to ``img_size / crop_pct`` and centre-cropped (1.0 for tiny images).

    ``online_linear``: the online linear probe (solo-learn's): a linear head on the ``pool``ed
    features of each training batch's first view, trained every step by its own AdamW
    (``online_linear_lr``, ``online_linear_weight_decay``; every ``online_linear_every``-th
    step, 1: every step) on the classes of
    labelled pre-training data (an ImageFolder-layout ``data.path`` or labelled shards); its
    top-1 on the training batches, the mean over each log window, is logged as
    ``monitor/online_linear_top1``. Off by default (it costs one more forward pass a step).
    """

    knn_train: str | None = None
    knn_val: str | None = None
    every_epochs: int = 1
    every_steps: int | None = None
    k: int = 20
    temperature: float = 0.07
    img_size: int | None = None
    crop_pct: float = 0.875
    pool: Literal["cls", "mean"] = "cls"
    batch_size: int = 64
    num_workers: int = 0
    images: str | None = None
    max_images: int = 2048
    davis: str | None = None
    sequences: str | None = None  # comma-separated names; null: the root's val split
    max_frames: int | None = None
    davis_protocol: Literal["cropmae", "dino"] = "cropmae"
    davis_set: str | None = None  # comma-separated KEY=VALUE, as `eval davis --set`
    online_linear: bool = False
    online_linear_lr: float = 1e-3
    online_linear_weight_decay: float = 0.0
    # Train the head on every N-th step's batch: 4 keeps it near the 5 % the monitors keep on the
    # demo config (every step, solo-learn's 1, costs about a fifth there: docs/monitors.md).
    online_linear_every: int = 4

    @property
    def asked(self) -> bool:
        """Whether any monitor is asked for."""
        return bool(self.knn_train or self.images or self.davis or self.online_linear)


@dataclass
class RunConfig:
    """Where the run lives and how it runs."""

    out_dir: str = "runs/run"
    seed: int = 0
    device: str = "auto"
    precision: Precision = "auto"
    compile: bool = False
    checkpoint_every: int = 1000
    log_every: int = 10
    progress: bool = True
    visualize: bool = True
    tensorboard: bool = True
    # torch threads of the main process; null: usable cores less loader workers, re-fitted to the
    # cores left free as the run goes (siamae.threads)
    threads: int | None = None
    # Weights & Biases (pip install -e ".[wandb]"): rank 0 logs the CSV's scalars, the resolved
    # config and the run's pictures. name null: the run folder's name; mode null: W&B's own
    # choice (WANDB_MODE, else online); offline writes <out_dir>/wandb/ with no network.
    wandb: bool = False
    wandb_project: str = "siamae"
    wandb_entity: str | None = None
    wandb_name: str | None = None
    wandb_mode: WandbMode | None = None


@dataclass
class SiameseIMConfig:
    """SiameseIM (method=siameseim). ``mask_ratio`` is view 1's share of masked patches; ``dim``,
    ``num_heads``, ``mlp_dim`` are the projector/predictor's width, heads and feed-forward width,
    ``predictor_depth`` its predictor blocks (null: the published values)."""

    mask_ratio: float | None = None
    dim: int | None = None
    num_heads: int | None = None
    mlp_dim: int | None = None
    predictor_depth: int | None = None
    projector_depth: int = 2
    # Normalisation inside projector/predictor blocks: BatchNorm over tokens (synced across
    # processes; the recipe) or LayerNorm.
    norm: Literal["batch", "layer"] = "batch"
    momentum: float = 0.995  # EMA momentum at step 0; a cosine takes it to 1 at the end
    neg_weight: float = 0.02  # UniGrad's lambda
    # Smallest block of the view-1 mask, in patches; null: 16 at 196 patches, scaled.
    mask_min_block: int | None = None
    photometric: bool = True  # colour jitter, grayscale, blur, solarize of the recipe


@dataclass
class FinetuneConfig:
    """Full fine-tuning (method=finetune), the MAE/BEiT recipe; drop-path is model.drop_path.

    ``data.path`` is the training ImageFolder, ``val`` the validation one (top-1/top-5 every
    epoch). ``checkpoint``: the pre-trained encoder (anything load_encoder reads; null: random
    init). Mixup/cutmix are alphas (0: off); ``smoothing`` is label smoothing; ``reprob`` the
    random-erasing probability; ``aa`` timm's augmentation policy (null: none).
    """

    checkpoint: str | None = None
    val: str | None = None
    num_classes: int | None = None  # null: the number of class folders
    layer_decay: float = 0.65
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    reprob: float = 0.25
    aa: str | None = "rand-m9-mstd0.5-inc1"
    global_pool: bool = True  # average-pooled patch tokens + fc_norm; false: the CLS token
    head_init: float = 2e-5
    ema: bool = False
    ema_decay: float = 0.9999
    eval_crop_pct: float = 0.875
    eval_batch_size: int = 128


@dataclass
class SegmentationConfig:
    """Semantic-segmentation fine-tuning (method=segmentation): UperNet on 4 ViT blocks, the
    BEiT/MAE protocol (docs/segmentation.md). ``checkpoint``: the pre-trained encoder (anything
    load_encoder reads; null: random init), ``layer_decay`` its layer-wise lr decay; the crop is
    ``model.img_size``.

    ``data.path`` is the data set (``layout`` auto: ADE20K, VOC or images/+masks/, detected);
    ``val`` another root for validation (null: the same set's val split). ``out_indices`` null:
    blocks 3, 5, 7, 11 at depth 12. ``scale`` is (long, short) side bounds of the keep-ratio
    resize, for training (times a ratio from ``ratio_range``) and testing.
    """

    checkpoint: str | None = None
    layer_decay: float = 0.65
    layout: Literal["auto", "ade20k", "voc", "plain"] = "auto"
    num_classes: int | None = None  # images/+masks/ without class_names.txt; VOC of other classes
    train_split: str = "train"
    val_split: str = "val"
    val: str | None = None
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    photometric: bool = True
    out_indices: tuple[int, int, int, int] | None = None
    channels: int = 768
    aux_channels: int = 256
    aux_weight: float = 0.4
    dropout: float = 0.1
    eval_mode: Literal["slide", "whole"] = "slide"
    eval_stride: int = 341
    eval_every_steps: int = 16000
    pictures: int = 4


@dataclass
class MixingConfig:
    """MixedAE (method=mixedae): image mixing and homologous recognition (docs/mixedae.md).

    ``ratio`` R images are mixed into one (``data.batch_size`` must be a multiple of it);
    ``topk`` null: ceil((N + 1) / R) keys per query (N / R with ``cls_key: false``);
    ``topk_blocks`` / ``attention_loss_blocks``: "all", "none" or block indices "0,1,2";
    ``attention_loss_weight``: the recognition loss on the attention logits (-log homologous
    softmax mass); ``segment_embed``: where the per-slot vectors go (encoder input: recognition
    becomes a lookup of the slot id), ``segment_init_std`` null: the position embedding's std;
    ``contrastive_features``: "head" (a projection head), "final" or a block index;
    ``cls_key: false`` removes the CLS from the patch queries' keys; ``homology_data``: held-out
    images whose homologous figures are logged each epoch (``homology_images`` of them, the
    partitions from ``homology_seed``); ``naive``: mixing alone (ordinary attention, no segment
    embeddings, no recognition or contrastive term), overriding the rest.
    """

    ratio: int = 4
    norm_pix_loss: bool = True
    naive: bool = False
    topk: int | None = None
    topk_blocks: str | int = "all"
    attention_loss_weight: float = 1.0
    attention_loss_blocks: str | int = "all"
    segment_embed: Literal["encoder", "decoder", "none"] = "none"
    segment_init_std: float | None = None
    contrastive_weight: float = 0.0
    temperature: float = 0.1
    contrastive_features: str | int = "head"
    cls_key: bool = True
    homology_data: str | None = None
    homology_images: int = 64
    homology_seed: int = 0


#: The sections every config has, whatever its method (``method`` aside).
COMMON_SECTIONS = ("model", "data", "optim", "monitor", "run")


@dataclass
class Config:
    """A run of any method or downstream task: the common sections, plus the sections its
    method declares (``Method.config_sections``: name -> dataclass) in ``sections``, read as
    ``cfg.section(MixingConfig)`` (typed) or ``cfg.mixing``. A saved config holds the common
    sections and the method's own, nothing else (:func:`siamae.recipes.build_config` reads it).

    >>> from siamae import Config
    >>> cfg = Config()
    >>> cfg.method, cfg.model.arch, cfg.data.batch_size
    ('cropmae', 'vit_small', 32)
    """

    method: str = "cropmae"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sections: dict[str, Any] = field(default_factory=dict)

    def section(self, kind: type[SectionT]) -> SectionT:
        """The method's section of dataclass ``kind`` (a method declares each kind once)."""
        for value in self.sections.values():
            if isinstance(value, kind):
                return value
        raise AttributeError(f"method {self.method!r} has no {kind.__name__} section")

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not fields: the method's sections, by name. Read
        # through __dict__, which copy and pickle fill before any field exists.
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"config of method {self.__dict__.get('method')!r} has no {name!r}")

    def to_dict(self) -> dict[str, Any]:
        plain: dict[str, Any] = {"method": self.method}
        for name in COMMON_SECTIONS:
            plain[name] = _plain(dataclasses.asdict(getattr(self, name)))
        for name, value in self.sections.items():
            plain[name] = _plain(dataclasses.asdict(value))
        return plain


def sectioned_config(
    data: dict[str, Any], own: dict[str, type], ignored: Collection[str] | None = None
) -> Config:
    """A config (not yet resolved) from a raw mapping of the current layout whose method owns
    the sections ``own`` (name -> dataclass). Other top-level names in ``ignored`` (another
    method's sections) are dropped, any other is refused; ``ignored`` None drops every other."""
    data = dict(data)
    sections = {
        name: from_dict(kind, data.pop(name, None) or {}, where=name) for name, kind in own.items()
    }
    known = {f.name for f in dataclasses.fields(Config)} - {"sections"}
    for name in list(data):
        if name not in known and (ignored is None or name in ignored):
            data.pop(name)
    cfg: Config = from_dict(Config, data)
    cfg.sections = sections
    return cfg


# -- the one-way upgrade of configs written before each method owned its section ------------

_MASKED = {"mask_ratio": "{method}.mask_ratio", "norm_pix_loss": "{method}.norm_pix_loss"}
_TASK = {"mask_ratio": None, "norm_pix_loss": None}
#: Old field -> new field (None: no longer a field of that method; dropped), per method.
MOVED_FIELDS: dict[str, dict[str, str | None]] = {
    "cropmae": _MASKED,
    "siammae": _MASKED,
    "mae": _MASKED,
    "mixedae": {"mask_ratio": None, "norm_pix_loss": "mixing.norm_pix_loss"},
    "siameseim": {
        "mask_ratio": "siameseim.mask_ratio",
        "norm_pix_loss": None,
        "decoder.dim": "siameseim.dim",
        "decoder.num_heads": "siameseim.num_heads",
        "decoder.mlp_dim": "siameseim.mlp_dim",
        "decoder.depth": "siameseim.predictor_depth",
        "decoder.dropout": None,
        "decoder.norm_style": None,
    },
    "finetune": _TASK,
    "segmentation": {
        **_TASK,
        "finetune.checkpoint": "segmentation.checkpoint",
        "finetune.layer_decay": "segmentation.layer_decay",
    },
}


def _moves(method: Any) -> dict[str, str | None]:
    table = MOVED_FIELDS.get(method, {}) if isinstance(method, str) else {}
    return {old: new and new.format(method=method) for old, new in table.items()}


def _pop(data: dict[str, Any], key: str) -> tuple[bool, Any]:
    *sections, name = key.split(".")
    node: Any = data
    for section in sections:
        node = node.get(section) if isinstance(node, dict) else None
    if not isinstance(node, dict) or name not in node:
        return False, None
    return True, node.pop(name)


def _put(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` unless the new layout already has it (a new field wins over an old one)."""
    *sections, name = key.split(".")
    node = data
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            return
    node.setdefault(name, value)


def upgrade_layout(data: dict[str, Any], method: Any) -> list[str]:
    """Move the fields of a config written before each method owned its section (siamae <=
    issue 26) to where they live now, in place; returns ``old -> new`` for each one moved."""
    moved = []
    for old, new in _moves(method).items():
        found, value = _pop(data, old)
        if found:
            if new is not None:
                _put(data, new, value)
            moved.append(f"{old} -> {new or '(dropped)'}")
    return moved


def upgrade_overrides(overrides: Sequence[str], method: Any) -> tuple[list[str], list[str]]:
    """``--set`` values that name an old field, renamed to the new one (refused where the
    method has no such field); returns the overrides and ``old -> new`` for each renamed."""
    moves = _moves(method)
    kept, moved = [], []
    for text in overrides:
        key, sep, value = text.partition("=")
        new = moves.get(key.strip(), key) if sep else key
        if new is None:
            # an old field this method no longer has: refused, as any unknown field, when asked
            # for by name (a saved config's copy of it is dropped quietly)
            raise ConfigError(
                f"config field {key.strip()!r}: method {method} has no such field any more "
                f"(each method's fields are in its own section; see configs/)"
            )
        if new != key:
            moved.append(f"{key.strip()} -> {new or '(dropped)'}")
        if new:
            kept.append(f"{new}={value}" if sep else text)
    return kept, moved


def note_upgrade(where: str, moved: list[str]) -> None:
    """The one line saying a config of the old layout was read and how it was upgraded."""
    if moved:
        print(
            f"siamae: note: {where} uses the layout before each method owned its section; "
            f"read as upgraded ({', '.join(moved)})",
            file=sys.stderr,
        )


def upgraded(data: dict[str, Any], where: str = "saved config") -> dict[str, Any]:
    """A copy of a plain config dict in the current layout (a checkpoint's of any age), with a
    note where it was upgraded."""
    data = copy.deepcopy(data)
    note_upgrade(where, upgrade_layout(data, data.get("method", Config.method)))
    return data


def _plain(value: Any) -> Any:
    """Tuples become lists so YAML and ``weights_only`` checkpoints hold only plain data."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist; pass --config with a YAML file (see configs/)"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML: {yaml_problem(err)}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not a text file (UTF-8)") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of fields at the top level"
        )
    return data


# -- checks -----------------------------------------------------------------------------------


def _check_size(size: int, patch_size: int, field_name: str) -> None:
    """A square image size a ViT of ``patch_size`` takes: whole patches, at most MAX_PATCHES
    (checked here, before a position table of a million rows is built)."""
    problem = size_problem(size, size, patch_size)
    _check(problem is None, field_name, f"{problem} (model.patch_size {patch_size})")


def _check_range(pair: tuple[float, float], name: str, low: float, high: float) -> None:
    _check(
        low <= pair[0] <= pair[1] <= high,
        name,
        f"expected {low} <= min <= max <= {high}, got {list(pair)}",
    )


def check_fields(cfg: Config) -> None:
    """Check every generic field of a config whose method defaults are filled in
    (:func:`siamae.recipes.resolve`); a bad value raises a ConfigError naming the field."""
    _check_model(cfg)
    for section in cfg.sections.values():
        if isinstance(section, DecoderConfig):
            check_decoder(section)
    _check_data(cfg)
    _check_optim(cfg)
    _check_run(cfg)
    _check_monitor(cfg)


def check_mask_ratio_range(ratio: float, field_name: str) -> None:
    """A mask ratio in [0, 1): a ratio of 1 or more leaves no patch visible."""
    _check(
        0.0 <= ratio < 1.0,
        field_name,
        f"expected 0 <= ratio < 1, got {ratio}"
        + ("; it leaves no patch visible" if ratio >= 1.0 else ""),
    )


def check_decoder(d: DecoderConfig) -> None:
    """The ``decoder`` section of the methods that have one (its ``null`` fields filled)."""
    for name in ("dim", "depth", "num_heads", "mlp_dim"):
        value = getattr(d, name)
        if value is not None:
            _check(value > 0, f"decoder.{name}", f"expected a positive integer, got {value}")
    if d.dim is not None and d.num_heads is not None:
        _check(
            d.dim % d.num_heads == 0,
            "decoder.dim",
            f"{d.dim} is not divisible by decoder.num_heads={d.num_heads}",
        )
        _check(
            d.dim % 4 == 0,
            "decoder.dim",
            f"expected a multiple of 4 (2-D sin-cos positions), got {d.dim}",
        )
    if d.dropout is not None:
        _check(0.0 <= d.dropout < 1.0, "decoder.dropout", f"expected 0 <= p < 1, got {d.dropout}")


def _check_model(cfg: Config) -> None:
    m = cfg.model
    _check(
        m.patch_size in (8, 14, 16, 32),
        "model.patch_size",
        f"expected 8, 14, 16 or 32, got {m.patch_size}",
    )
    _check_size(m.img_size, m.patch_size, "model.img_size")
    _check(0.0 <= m.drop_path < 1.0, "model.drop_path", f"expected 0 <= p < 1, got {m.drop_path}")


def _check_data(cfg: Config) -> None:
    a = cfg.data
    _check(a.batch_size > 0, "data.batch_size", f"expected a positive integer, got {a.batch_size}")
    _check(a.num_workers >= 0, "data.num_workers", f"expected 0 or more, got {a.num_workers}")
    _check_range(a.global_scale, "data.global_scale", 1e-4, 1.0)
    _check_range(a.local_scale, "data.local_scale", 1e-4, 1.0)
    _check(
        0 < a.ratio[0] <= a.ratio[1], "data.ratio", f"expected 0 < min <= max, got {list(a.ratio)}"
    )
    _check(0.0 <= a.hflip <= 1.0, "data.hflip", f"expected a probability in [0, 1], got {a.hflip}")
    _check(a.color_jitter >= 0.0, "data.color_jitter", f"expected 0 or more, got {a.color_jitter}")
    _check(0.0 <= a.blur <= 1.0, "data.blur", f"expected a probability in [0, 1], got {a.blur}")
    _check(
        1 <= a.frame_gap[0] <= a.frame_gap[1],
        "data.frame_gap",
        f"expected 1 <= min <= max, got {list(a.frame_gap)}",
    )
    _check(
        a.repeated_sampling >= 1,
        "data.repeated_sampling",
        f"expected 1 or more, got {a.repeated_sampling}",
    )
    _check(a.video_threads >= 0, "data.video_threads", f"expected 0 or more, got {a.video_threads}")
    _check(
        a.video_device == "cpu" or a.video_backend == "torchcodec",
        "data.video_device",
        f"{a.video_device!r} decoding needs data.video_backend=torchcodec (PyAV decodes on the CPU)",
    )
    _check(
        a.synthetic_count > 0,
        "data.synthetic_count",
        f"expected a positive integer, got {a.synthetic_count}",
    )
    _check(
        a.synthetic_size >= 32,
        "data.synthetic_size",
        f"expected at least 32 pixels, got {a.synthetic_size}",
    )
    _check(
        a.synthetic_frames >= 2,
        "data.synthetic_frames",
        f"expected at least 2 frames, got {a.synthetic_frames}",
    )
    if a.source != "synthetic":
        _check(
            a.path is not None,
            "data.path",
            f"source '{a.source}' needs a path; pass --data PATH or use data.source=synthetic",
        )


def _check_optim(cfg: Config) -> None:
    o = cfg.optim
    _check(o.base_lr > 0, "optim.base_lr", f"expected a positive number, got {o.base_lr}")
    _check(0 <= o.min_lr <= o.base_lr * 1e6, "optim.min_lr", f"expected 0 or more, got {o.min_lr}")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"expected 0 or more, got {o.weight_decay}")
    _check(
        all(0 <= b < 1 for b in o.betas),
        "optim.betas",
        f"expected two numbers in [0, 1), got {list(o.betas)}",
    )
    _check(o.epochs > 0, "optim.epochs", f"expected a positive number, got {o.epochs}")
    _check(
        0 <= o.warmup_epochs <= o.epochs,
        "optim.warmup_epochs",
        f"expected 0 <= warmup <= epochs ({o.epochs}), got {o.warmup_epochs}",
    )
    if o.max_steps is not None:
        _check(
            o.max_steps > 0, "optim.max_steps", f"expected a positive integer, got {o.max_steps}"
        )
    if o.warmup_steps is not None:
        _check(
            o.warmup_steps >= 0, "optim.warmup_steps", f"expected 0 or more, got {o.warmup_steps}"
        )
    _check(o.accum_steps >= 1, "optim.accum_steps", f"expected 1 or more, got {o.accum_steps}")
    _check(o.poly_power > 0, "optim.poly_power", f"expected a positive number, got {o.poly_power}")
    if o.clip_grad is not None:
        _check(
            o.clip_grad > 0,
            "optim.clip_grad",
            f"expected a positive number or null, got {o.clip_grad}",
        )


def _check_run(cfg: Config) -> None:
    r = cfg.run
    _check(
        r.checkpoint_every > 0,
        "run.checkpoint_every",
        f"expected a positive integer, got {r.checkpoint_every}",
    )
    _check(r.log_every > 0, "run.log_every", f"expected a positive integer, got {r.log_every}")
    _check(
        r.device == "auto" or r.device == "cpu" or r.device.startswith("cuda"),
        "run.device",
        f"expected 'auto', 'cpu' or 'cuda[:N]', got {r.device!r}",
    )
    if r.threads is not None:
        _check(r.threads >= 1, "run.threads", f"expected 1 or more, or null, got {r.threads}")
    _check(bool(r.wandb_project.strip()), "run.wandb_project", "expected a project name, got ''")


def _check_monitor(cfg: Config) -> None:
    mo, patch = cfg.monitor, cfg.model.patch_size
    _check(
        (mo.knn_train is None) == (mo.knn_val is None),
        "monitor.knn_val",
        "the k-NN monitor needs both monitor.knn_train and monitor.knn_val (or neither)",
    )
    _check(
        mo.every_epochs >= 1, "monitor.every_epochs", f"expected 1 or more, got {mo.every_epochs}"
    )
    _check(mo.k >= 1, "monitor.k", f"expected 1 or more, got {mo.k}")
    if mo.every_steps is not None:
        _check(
            mo.every_steps >= 1,
            "monitor.every_steps",
            f"expected a positive integer or null, got {mo.every_steps}",
        )
    if mo.img_size is not None:
        _check_size(mo.img_size, patch, "monitor.img_size")
    _check(
        0.0 < mo.crop_pct <= 1.0,
        "monitor.crop_pct",
        f"expected 0 < crop_pct <= 1, got {mo.crop_pct}",
    )
    _check(mo.batch_size >= 1, "monitor.batch_size", f"expected 1 or more, got {mo.batch_size}")
    _check(mo.num_workers >= 0, "monitor.num_workers", f"expected 0 or more, got {mo.num_workers}")
    _check(
        mo.temperature > 0,
        "monitor.temperature",
        f"expected a positive number, got {mo.temperature}",
    )
    _check(mo.max_images >= 2, "monitor.max_images", f"expected 2 or more, got {mo.max_images}")
    if mo.max_frames is not None:
        # Frame 0 is given and the last is not scored (as `siamae eval davis --max-frames`).
        _check(mo.max_frames >= 3, "monitor.max_frames", f"expected 3 or more, got {mo.max_frames}")
    if mo.sequences is not None:
        _check(
            all(mo.sequences.split(",")),
            "monitor.sequences",
            f"expected comma-separated sequence names or null, got {mo.sequences!r}",
        )
    if mo.davis_set is not None:
        _check(
            all("=" in s for s in mo.davis_set.split(",")),
            "monitor.davis_set",
            f"expected comma-separated KEY=VALUE protocol overrides, got {mo.davis_set!r}",
        )
    _check_online_linear(cfg)


def _check_online_linear(cfg: Config) -> None:
    mo = cfg.monitor
    _check(
        mo.online_linear_lr > 0,
        "monitor.online_linear_lr",
        f"expected a positive number, got {mo.online_linear_lr}",
    )
    _check(
        mo.online_linear_every >= 1,
        "monitor.online_linear_every",
        f"expected 1 or more, got {mo.online_linear_every}",
    )
    _check(
        mo.online_linear_weight_decay >= 0,
        "monitor.online_linear_weight_decay",
        f"expected 0 or more, got {mo.online_linear_weight_decay}",
    )
    if mo.online_linear:  # the classes come from the folder layout or the shards' .cls members
        _check(
            cfg.data.source == "images",
            "monitor.online_linear",
            f"data.source {cfg.data.source!r} has no class labels; the online linear probe "
            "needs data.source=images with an ImageFolder-layout folder or labelled shards "
            "(or set monitor.online_linear=false)",
        )


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
