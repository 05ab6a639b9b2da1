"""``load_encoder``: any checkpoint a user has -> a siamae :class:`Encoder`, loudly.

Accepts:
- this project's training checkpoints (a file, or a run folder with ``checkpoints/last.pt``):
  exactly the ``encoder.vit.*`` tensors of the method's state dict are used;
- exported ``.safetensors`` encoders (``siamae export``; the placeholder classifier is ignored,
  and the JSON sidecar, when present, supplies the method and step);
- folders in the Hugging Face Hub layout (``siamae export --hub-dir``, a timm ViT's
  ``config.json`` + ``model.safetensors``): their ``model.safetensors``;
- plain state dicts from timm, DINO, MAE, CropMAE and SiamMAE code, under ``model``,
  ``state_dict``, ``teacher`` (DINO: the teacher, as its evaluations use) or at the top level,
  with ``module.``, ``backbone.``, ``encoder.`` prefixes stripped. Full training checkpoints of
  that code that store an ``argparse.Namespace`` of arguments load too (the Namespace alone is
  allowed on top of ``weights_only``; nothing else pickled is).

Keys that are not the encoder's (decoders, heads, mask tokens) are ignored and reported; a
missing encoder key or a shape that does not fit raises a CheckpointError naming it. Never a
silent partial load. Linear-probe checkpoints and feature caches hold no encoder: they raise a
CheckpointError that says which file to pass instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from siamae.checkpoint import TRAIN_FORMAT, load_checkpoint
from siamae.errors import CheckpointError
from siamae.models.pos_embed import POS_RESAMPLE_HELP
from siamae.models.vit import SUPPORTED_PATCH_SIZES, VIT_SIZES, Encoder

PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.vit.", "encoder.", "vit.", "model.")
HEADS_BY_DIM = {size.embed_dim: size.num_heads for size in VIT_SIZES.values()}
ARCH_BY_DIM = {size.embed_dim: name for name, size in VIT_SIZES.items()}


@dataclass
class LoadReport:
    """What ``load_encoder`` found: where the weights came from and what matched."""

    source: str
    kind: str
    arch: str
    patch_size: int
    img_size: int
    matched: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    method: str | None = None
    step: int | None = None
    epoch: int | float | None = None
    config: dict[str, Any] | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.kind == "random init":
            return (
                f"{self.source}: {self.arch} patch {self.patch_size} ({self.img_size}px), "
                f"untrained, {RANDOM_INIT_POSITIONS}"
            )
        ignored = f", ignored {len(self.ignored)} non-encoder keys" if self.ignored else ""
        origin = f" ({self.method}, step {self.step})" if self.method else ""
        notes = "".join(f"; {note}" for note in self.notes)
        return (
            f"loaded {self.arch} patch {self.patch_size} ({self.img_size}px) from {self.source} "
            f"[{self.kind}{origin}]: {len(self.matched)} encoder tensors matched{ignored}{notes}"
        )


NOT_ENCODERS = {
    "siamae-linear-v1": "a linear-probe checkpoint (the head only; its encoder is {encoder!r})",
    "siamae-features-v1": "a cached-feature file of a probe, not an encoder",
}


def _pick_state_dict(obj: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    fmt = obj.get("format")
    if fmt == TRAIN_FORMAT:
        model = obj.get("model")
        if not isinstance(model, dict):
            raise CheckpointError("a siamae training checkpoint without its 'model' weights")
        encoder = {k: v for k, v in model.items() if k.startswith("encoder.vit.")}
        if not encoder:
            raise CheckpointError(
                "a siamae training checkpoint whose model has no 'encoder.vit.*' tensors"
            )
        return encoder, "siamae training checkpoint"
    if fmt in NOT_ENCODERS:
        what = NOT_ENCODERS[fmt].format(encoder=obj.get("config", {}).get("encoder"))
        raise CheckpointError(f"this is {what}; pass the encoder's checkpoint instead")
    for key in ("state_dict", "model", "teacher", "module", "encoder"):
        inner = obj.get(key)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner, f"state dict under '{key}'"
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, "plain state dict"
    raise CheckpointError(
        "found no tensors under 'model', 'state_dict', 'teacher' or at the top level"
    )


def normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes so keys read like timm's (``blocks.0.attn.qkv.weight``)."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        original = key
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    changed = True
        if key in out and not torch.equal(out[key], value):
            raise CheckpointError(
                f"keys {origin[key]!r} and {original!r} both name the encoder tensor {key!r} "
                "with different values; save the one encoder you mean as a plain state dict"
            )
        out[key] = value
        origin[key] = original
    return out


def infer_architecture(state: dict[str, torch.Tensor]) -> tuple[str, int, int, dict[str, int]]:
    """(arch, patch_size, img_size, overrides) from the tensors' shapes."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None:
        raise CheckpointError(
            "no 'patch_embed.proj.weight' found: this does not look like a ViT encoder"
        )
    dim, _, patch, _ = proj.shape
    depth = 1 + max(
        (int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1
    )
    if depth == 0:
        raise CheckpointError("no 'blocks.N.*' keys found: this does not look like a ViT encoder")
    arch = ARCH_BY_DIM.get(dim)
    overrides: dict[str, int] = {}
    if arch is None:
        arch = "vit_small"
        overrides = {"embed_dim": dim, "num_heads": max(1, dim // 64)}
    if depth != VIT_SIZES[arch].depth:
        overrides["depth"] = depth
    img_size = 224
    pos = state.get("pos_embed")
    if pos is not None:
        n = pos.shape[1] - 1
        side = int(round(n**0.5))
        if side * side == n:
            img_size = side * patch
    return arch, int(patch), img_size, overrides


def _is_identity_norm(state: dict[str, torch.Tensor], name: str) -> bool:
    weight, bias = state.get(f"{name}.weight"), state.get(f"{name}.bias")
    return (
        weight is not None
        and bias is not None
        and bool((weight == 1).all())
        and bool((bias == 0).all())
    )


def _final_norm_layout(state: dict[str, torch.Tensor]) -> tuple[bool, list[str]]:
    """(whether the encoder has a final norm, notes for the report).

    SiameseIM's ViT has no final norm: its checkpoints hold neither ``norm.*`` nor ``fc_norm.*``.
    Such an encoder takes timm's average-pool layout (``norm`` an identity, ``fc_norm`` a fresh
    LayerNorm after pooling, what SiameseIM's evaluations add), and so does an export of one
    (``fc_norm`` still at (1, 0), a zero placeholder head at most). A trained ``fc_norm`` or
    head without ``norm`` is a fine-tuned classifier, refused by the strict load with a hint.
    """
    if "norm.weight" in state:
        return True, []
    notes = []
    if any(k.startswith("mm_") for k in state):
        count = sum(k.startswith("mm_") for k in state)
        notes.append(
            "SiameseIM training checkpoint: the online encoder was taken, the EMA target's "
            f"{count} mm_* tensors were ignored"
        )
    if "fc_norm.weight" not in state:
        notes.append(
            "no final norm (SiameseIM's ViT): norm is an identity and a fresh fc_norm "
            "(LayerNorm) follows the average pooling, as in SiameseIM's evaluations"
        )
        return False, notes
    head = state.get("head.weight")
    trained_head = head is not None and bool(head.any())  # an export's placeholder is zero
    if _is_identity_norm(state, "fc_norm") and not trained_head:
        notes.append("no final norm: fc_norm after the average pooling, still at (1, 0)")
        return False, notes
    return True, notes


def encoder_from_state_dict(
    state: dict[str, torch.Tensor], source: str = "<state dict>", kind: str = "plain state dict"
) -> tuple[Encoder, LoadReport]:
    """Build the encoder the tensors describe and load them strictly."""
    state = normalise_keys(state)
    arch, patch, img_size, overrides = infer_architecture(state)
    layer_scale = sorted(k for k in state if re.match(r"blocks\.\d+\.ls\d\.", k))
    if layer_scale:
        raise CheckpointError(
            f"{source}: the blocks have layer scale ({layer_scale[0]!r}), which siamae's encoder "
            "does not; use a checkpoint trained without it (e.g. SiameseIM's --init_values unset)"
        )
    final_norm, notes = _final_norm_layout(state)
    fresh: list[str] = []
    if not final_norm and "fc_norm.weight" not in state:
        # The fresh fc_norm of the layout: LayerNorm at (1, 0), exactly what timm initialises.
        dim = state["patch_embed.proj.weight"].shape[0]
        state = {**state, "fc_norm.weight": torch.ones(dim), "fc_norm.bias": torch.zeros(dim)}
        fresh = ["fc_norm.weight", "fc_norm.bias"]
    # Built on the meta device: every tensor is overwritten by the strict load below, so the
    # (slow, for large ViTs on a CPU) random initialisation is skipped.
    with torch.device("meta"):
        encoder = Encoder(arch, patch, img_size, final_norm=final_norm, **overrides)
    expected = encoder.vit.state_dict()
    if set(encoder.state_dict()) != {f"vit.{k}" for k in expected}:  # pragma: no cover
        raise RuntimeError("Encoder holds tensors outside .vit; load_encoder must initialise them")
    missing = [k for k in expected if k not in state]
    if missing:
        hint = "is this a ViT encoder checkpoint?"
        if "norm.weight" in missing and "fc_norm.weight" in state:
            hint = (
                "it has 'fc_norm' instead of the final 'norm': a fine-tuned, average-pooled "
                "classifier, not a pre-trained encoder; pass the pre-training checkpoint"
            )
        raise CheckpointError(
            f"{source}: the encoder needs {len(missing)} tensors the checkpoint lacks, e.g. {missing[:3]}; "
            + hint
        )
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(
                f"{source}: tensor '{key}' has shape {tuple(state[key].shape)}, the {arch} patch {patch} "
                f"encoder needs {tuple(tensor.shape)}"
            )
    encoder = encoder.to_empty(device="cpu")
    encoder.vit.load_state_dict({k: state[k] for k in expected}, strict=True)
    ignored = sorted(k for k in state if k not in expected)
    report = LoadReport(
        source,
        kind,
        arch if not overrides.get("embed_dim") else f"vit(dim={overrides['embed_dim']})",
        patch,
        img_size,
        matched=[k for k in expected if k not in fresh],
        ignored=ignored,
        notes=notes,
    )
    return encoder, report


def load_encoder(path: str | Path, verbose: bool = False) -> Encoder:
    """Load a frozen-ready encoder (eval mode) from any supported checkpoint.

    The returned module carries ``load_report`` (a :class:`LoadReport`) saying what matched.
    A folder in the Hugging Face Hub layout (``siamae export --hub-dir``, or any timm ViT's
    ``config.json`` + ``model.safetensors``) is read through its ``model.safetensors``.

    >>> import siamae, tempfile, os
    >>> from safetensors.torch import save_file
    >>> path = os.path.join(tempfile.mkdtemp(), "encoder.safetensors")
    >>> save_file(siamae.random_encoder("vit_tiny_patch8_32").vit.state_dict(), path)
    >>> encoder = siamae.load_encoder(path)
    >>> encoder.arch, encoder.patch_size, encoder.img_size
    ('vit_tiny', 8, 32)
    """
    hub_weights = Path(path) / "model.safetensors"
    if hub_weights.is_file() and not (Path(path) / "checkpoints").exists():
        path = hub_weights
    obj = _load_any(path)
    try:
        state, kind = _pick_state_dict(obj)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {str(path)!r}: {err}") from None
    if Path(path).suffix == ".safetensors":
        kind = "exported safetensors"
    encoder, report = encoder_from_state_dict(state, str(path), kind)
    if Path(path).suffix == ".safetensors":
        _read_sidecar(Path(path), report)
    if obj.get("format") == TRAIN_FORMAT:
        report.method = obj.get("method")
        report.step = obj.get("step")
        report.epoch = obj.get("epoch")
        report.config = obj.get("config")
        cfg_model = obj.get("config", {}).get("model", {})
        # The training config is the truth about image size (pos_embed already fixes it).
        if (
            cfg_model.get("arch")
            and cfg_model["arch"] != report.arch
            and not report.arch.startswith("vit(")
        ):
            raise CheckpointError(
                f"{path}: config says {cfg_model['arch']} but tensors describe {report.arch}"
            )
    encoder.load_report = report  # type: ignore[attr-defined]
    if verbose:
        print(report.summary())
    return encoder.eval()


def describe_encoder(encoder: Encoder) -> str:
    """One line for results: where the weights came from and how the position grid is resampled."""
    report = getattr(encoder, "load_report", None)
    origin = report.summary() if report is not None else type(encoder).__name__
    mode = getattr(encoder, "pos_resample", "dino")
    return f"{origin}; position grid at other sizes: {mode}, {POS_RESAMPLE_HELP[mode]}"


def _load_any(path: str | Path) -> dict[str, Any]:
    """``load_checkpoint``, retried with ``argparse.Namespace`` allowed (DINO/MAE/CropMAE
    training checkpoints store their arguments as one)."""
    try:
        return load_checkpoint(path)
    except CheckpointError as first:
        p = Path(path)
        if p.suffix == ".safetensors" or not p.is_file():
            raise
        import argparse

        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:
            raise first from None
        if not isinstance(obj, dict):
            raise first from None
        return obj


def _read_sidecar(path: Path, report: LoadReport) -> None:
    """Method, step, epoch and recipe from an export's JSON sidecar, if there is one beside it."""
    import json

    side = path.with_suffix(".json")
    if not side.is_file():
        return
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(data, dict):
        return
    step = data.get("step")
    report.method = data.get("method")
    report.step = int(step) if isinstance(step, int) else None
    report.epoch = data.get("epoch")
    report.config = data.get("recipe")


RANDOM_INIT_POSITIONS = (
    "fixed 2-D sin-cos position embedding (the official eval class leaves a random "
    "baseline's at zero; sin-cos is the fairer baseline)"
)


def random_encoder(name: str, seed: int = 0) -> Encoder:
    """An untrained encoder, e.g. ``vit_small_patch16`` or ``vit_tiny_patch8_224``: the baseline.

    Its position embedding is the fixed 2-D sin-cos table every trained encoder here has (not
    zeros, as the official evaluation's random baseline): its summary says so.

    >>> import siamae
    >>> siamae.random_encoder("vit_tiny_patch8_32").num_patches
    16
    """
    m = re.fullmatch(r"(vit_(?:tiny|small|base|large))_patch(\d+)(?:_(\d+))?", name)
    if not m:
        raise CheckpointError(
            f"--random-init {name!r}: expected a name like vit_small_patch16 or vit_tiny_patch8_224"
        )
    arch, patch, img_size = m.group(1), int(m.group(2)), int(m.group(3) or 224)
    if patch not in SUPPORTED_PATCH_SIZES:
        raise CheckpointError(
            f"--random-init {name!r}: patch size {patch} is not supported; use one of "
            f"{', '.join(map(str, SUPPORTED_PATCH_SIZES))} (e.g. {arch}_patch16)"
        )
    if img_size < patch or img_size % patch:
        raise CheckpointError(
            f"--random-init {name!r}: image size {img_size} is not a multiple of the patch size "
            f"{patch}; use e.g. {arch}_patch{patch}_{max(1, round(img_size / patch)) * patch}"
        )
    torch.manual_seed(seed)
    encoder = Encoder(arch, patch, img_size)
    encoder.load_report = LoadReport(  # type: ignore[attr-defined]
        f"random init (seed {seed})",
        "random init",
        m.group(1),
        int(m.group(2)),
        int(m.group(3) or 224),
    )
    return encoder.eval()
