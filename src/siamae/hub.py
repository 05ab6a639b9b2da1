"""Export to a folder in the Hugging Face Hub layout that timm reads.

The folder holds ``config.json`` (timm's own pretrained config, written by timm's
``save_config_for_hf``), ``model.safetensors`` (the timm state dict) and ``README.md`` (a model
card: method, recipe, data, steps and the run's evaluation figures). It loads with::

    timm.create_model("local-dir:DIR", pretrained=True)

and, once uploaded (``hf upload ORG/NAME DIR .``; ``huggingface-cli upload`` before
huggingface_hub 1.0), for anyone with::

    timm.create_model("hf-hub:ORG/NAME", pretrained=True)

A pre-training checkpoint gives the encoder alone (``num_classes=0``: the model returns the
pooled CLS feature, ``forward_features`` every token); a ``siamae finetune`` checkpoint gives the
classifier with its trained head; a segmentation fine-tuning checkpoint gives its encoder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models._hub import save_config_for_hf

from siamae.errors import SiamaeError
from siamae.export import export_encoder

HUB_FILES = ("config.json", "model.safetensors", "README.md")

# The figures a model card shows from an evaluation's summary.json, in this order.
HEADLINE_FIGURES = (
    "J&F-Mean",
    "J-Mean",
    "F-Mean",
    "PCK@0.1",
    "PCK@0.2",
    "mIoU",
    "mAcc",
    "aAcc",
    "top1",
    "top5",
)


def export_hub(
    checkpoint: str | Path,
    out_dir: str | Path,
    timm_name: str | None = None,
    ema: bool = False,
    evaluations: list[str | Path] | None = None,
    name: str | None = None,
) -> Path:
    """Write ``checkpoint``'s encoder (or fine-tuned classifier) as a Hub-layout folder.

    Args:
        checkpoint: anything :func:`siamae.load_encoder` reads (a run folder, a training
            checkpoint, an export, a timm/DINO/MAE state dict).
        out_dir: the folder to write; it must be new, empty, or an earlier hub export (its
            three files are replaced). Written in a staging folder and moved into place.
        timm_name: the timm model name; default: from the encoder's arch and patch size.
        ema: fine-tuning checkpoints: the EMA weights.
        evaluations: more evaluation folders (or ``summary.json`` files) whose figures the
            model card shows, beside those under the run's ``eval/`` folder.
        name: the model's name in the card; default: ``out_dir``'s name.
    Returns:
        ``out_dir``.

    Example:
        >>> import tempfile, timm, torch
        >>> from pathlib import Path
        >>> from siamae.hub import export_hub
        >>> from siamae.models.vit import Encoder
        >>> tmp = Path(tempfile.mkdtemp())
        >>> torch.save(Encoder("vit_tiny", 16, 32).vit.state_dict(), tmp / "enc.pt")
        >>> folder = export_hub(tmp / "enc.pt", tmp / "hub")
        >>> sorted(p.name for p in folder.iterdir())
        ['README.md', 'config.json', 'model.safetensors']
        >>> model = timm.create_model(f"local-dir:{folder}", pretrained=True)
        >>> model(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 192])
    """
    out_dir = Path(out_dir)
    _check_target(out_dir)
    summaries = _evaluation_summaries(Path(checkpoint), evaluations or [])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        weights, sidecar_path = export_encoder(
            checkpoint, stage / "export.safetensors", timm_name, ema=ema, encoder_only=True
        )
        sidecar = json.loads(sidecar_path.read_text())
        model = _timm_model(load_file(str(weights)), sidecar)
        weights.unlink()
        sidecar_path.unlink()
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            str(stage / "model.safetensors"),
            metadata={"format": "pt"},
        )
        _write_config(model, sidecar, stage / "config.json")
        card = model_card(sidecar, summaries, name or out_dir.name, model)
        (stage / "README.md").write_text(card)
        _move_into_place(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_dir


def _check_target(out_dir: Path) -> None:
    """Refuse a file, or a folder holding anything but an earlier hub export."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SiamaeError(f"--hub-dir {str(out_dir)!r} is a file; pass a new or empty folder")
    if out_dir.is_dir():
        others = sorted(p.name for p in out_dir.iterdir() if p.name not in HUB_FILES)
        if others:
            raise SiamaeError(
                f"--hub-dir {str(out_dir)!r} holds other files ({', '.join(others[:3])}); "
                "pass a new or empty folder (an earlier hub export is replaced)"
            )


def _timm_model(state: dict[str, torch.Tensor], sidecar: dict[str, Any]) -> torch.nn.Module:
    """timm's model for the export, its weights loaded strictly (a check that timm reads them).

    An encoder export carries a zero placeholder classifier for timm's default config; the hub
    folder needs none (``num_classes=0`` is in its config), so it is dropped."""
    kwargs = dict(sidecar.get("timm_kwargs") or {})
    if sidecar.get("placeholder_head"):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    kwargs.setdefault("num_classes", 0 if "head.weight" not in state else sidecar["num_classes"])
    model = timm.create_model(sidecar["timm_name"], pretrained=False, **kwargs)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _write_config(model: torch.nn.Module, sidecar: dict[str, Any], path: Path) -> None:
    """timm's ``config.json`` for the model, with the mean/std siamae trained with, and
    without what timm's config for the name says of *its* weights (tag, licence, source)."""
    kwargs = {k: v for k, v in (sidecar.get("timm_kwargs") or {}).items() if k != "global_pool"}
    save_config_for_hf(
        model,
        str(path),
        model_args=kwargs,
        data_config={"mean": tuple(sidecar["mean"]), "std": tuple(sidecar["std"])},
    )
    config = json.loads(path.read_text())
    pretrained = config["pretrained_cfg"]
    for key in ("tag", "license", "hf_hub_id", "url", "paper_ids", "paper_name", "origin_url"):
        pretrained.pop(key, None)
    pretrained["tag"] = f"siamae_{sidecar.get('method') or 'import'}"
    path.write_text(json.dumps(config, indent=2) + "\n")


def _move_into_place(stage: Path, out_dir: Path) -> None:
    """The three files into ``out_dir``, each by a rename (same file system)."""
    out_dir.mkdir(exist_ok=True)
    for file in HUB_FILES:
        (stage / file).replace(out_dir / file)


def _run_folder(checkpoint: Path) -> Path | None:
    if checkpoint.is_dir():
        return checkpoint
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent
    return None


def _evaluation_summaries(
    checkpoint: Path, evaluations: list[str | Path]
) -> list[tuple[str, dict[str, Any]]]:
    """(label, summary) of each evaluation: the run's ``eval/**/summary.json`` and the given
    folders or files; a given one that is missing or unreadable is bad input."""
    found: list[tuple[str, Path]] = []
    run = _run_folder(checkpoint)
    if run is not None and (run / "eval").is_dir():
        found += [
            (str(p.parent.relative_to(run)), p)
            for p in sorted((run / "eval").rglob("summary.json"))
        ]
    for item in evaluations:
        path = Path(item)
        file = path / "summary.json" if path.is_dir() else path
        if not file.is_file():
            raise SiamaeError(
                f"--eval {str(item)!r}: no summary.json there; pass an evaluation's --out folder"
            )
        found.append((path.name if path.is_dir() else path.parent.name, file))
    summaries = []
    for label, file in found:
        try:
            summary = json.loads(file.read_text())
        except (OSError, ValueError) as err:
            raise SiamaeError(
                f"{file}: not a readable summary.json ({err}); pass another --eval"
            ) from None
        if isinstance(summary, dict):
            summaries.append((label, summary))
    return summaries


def headline_figures(summary: dict[str, Any]) -> dict[str, float]:
    """The figures of a ``summary.json`` worth a table cell, flattened (``top1`` of a k-NN
    summary is one per k: ``top1 (k=20)``).

    Example:
        >>> headline_figures({"benchmark": "DAVIS", "J&F-Mean": 0.61, "J-Mean": 0.59, "x": 1})
        {'J&F-Mean': 0.61, 'J-Mean': 0.59}
        >>> headline_figures({"top1": {"10": 71.5, "20": 72.0}})
        {'top1 (k=10)': 71.5, 'top1 (k=20)': 72.0}
    """
    figures: dict[str, float] = {}
    for key in HEADLINE_FIGURES:
        value = summary.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            figures[key] = float(value)
        elif isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    figures[f"{key} (k={sub})"] = float(v)
    return figures


def model_card(
    sidecar: dict[str, Any],
    summaries: list[tuple[str, dict[str, Any]]],
    name: str,
    model: torch.nn.Module,
) -> str:
    """The ``README.md`` of a hub export: front matter the Hub reads, then what the model is,
    how it was trained, its evaluation figures, and how to load and upload it."""
    method = sidecar.get("method") or "unknown (imported weights)"
    recipe = sidecar.get("recipe") or {}
    data = recipe.get("data") or {}
    optim = recipe.get("optim") or {}
    params = sum(p.numel() for p in model.parameters())
    tags = ["timm", "image-feature-extraction", "siamae", "self-supervised"]
    if sidecar.get("method"):
        tags.append(str(sidecar["method"]))
    lines = ["---", "library_name: timm", "tags:"]
    lines += [f"- {tag}" for tag in tags]
    lines += ["pipeline_tag: image-feature-extraction", "---", "", f"# {name}", ""]
    lines += [
        f"A Vision Transformer ({sidecar['timm_name']}, {params / 1e6:.1f} M parameters, "
        f"patch {sidecar['patch_size']}, {sidecar['img_size']} px) "
        f"pre-trained with **{method}** in [siamae](https://pypi.org/project/siamae/).",
        "",
        "## Training",
        "",
        "| | |",
        "| --- | --- |",
        f"| method | {method} |",
        f"| data | {data.get('source', '')} {data.get('path') or ''} |".replace("  ", " "),
        f"| steps | {sidecar.get('step', '')} |",
        f"| epochs | {sidecar.get('epoch', '')} |",
        f"| batch size (per process) | {data.get('batch_size', '')} |",
        f"| base lr | {optim.get('base_lr', '')} |",
        f"| normalisation | mean {sidecar['mean']}, std {sidecar['std']} |",
        "",
    ]
    if recipe:
        lines += ["The resolved recipe (siamae config):", "", "```yaml"]
        lines += [json.dumps(recipe, indent=2, default=str), "```", ""]
    lines += _evaluation_table(summaries)
    lines += [
        "## Use",
        "",
        "```python",
        "import timm",
        'model = timm.create_model("hf-hub:ORG/NAME", pretrained=True)  # or "local-dir:FOLDER"',
        "features = model.forward_features(images)  # (B, 1 + patches, dim): CLS first",
        "```",
        "",
        "## Upload",
        "",
        "```bash",
        "hf upload ORG/NAME FOLDER .   # huggingface_hub >= 1.0 (before: huggingface-cli upload)",
        "```",
        "",
    ]
    return "\n".join(lines)


def _evaluation_table(summaries: list[tuple[str, dict[str, Any]]]) -> list[str]:
    rows = [(label, s.get("benchmark", ""), headline_figures(s)) for label, s in summaries]
    rows = [row for row in rows if row[2]]
    if not rows:
        return ["## Evaluation", "", "No evaluation was found for this run.", ""]
    lines = ["## Evaluation", "", "| evaluation | benchmark | figures |", "| --- | --- | --- |"]
    for label, benchmark, figures in rows:
        cells = ", ".join(f"{k} {v:.4g}" for k, v in figures.items())
        lines.append(f"| {label} | {benchmark} | {cells} |")
    return [*lines, ""]
