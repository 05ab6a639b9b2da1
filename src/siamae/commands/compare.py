"""``siamae compare RUN [RUN ...]``: one table of several runs (Markdown on stdout, or CSV) and
one picture of their loss and monitor curves overlaid.

A run's row: its method and recipe (``config.yaml``), its last step and loss and the last value
of each monitor (``metrics.jsonl``), and the headline figures of every evaluation summary found
for it (``summary.json`` files under ``<run>/eval/``, or in a folder ``--eval RUN DIR`` names).
A figure a run does not have is a blank cell; runs of different methods compare alike.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from siamae.errors import DataError

#: What a summary.json holds beside its figures: not compared.
NOT_FIGURES = {"params", "encoder", "timing", "max_frames", "world_size", "step", "seed"}
#: Logged every monitor interval but a cost, not a figure of the encoder.
SECONDS_SUFFIX = "_seconds"


@dataclass
class RunRecord:
    """What the table and the picture read of one run."""

    name: str
    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    evaluations: dict[str, float] = field(default_factory=dict)

    def monitor_keys(self) -> list[str]:
        keys = {
            k
            for r in self.metrics
            for k in r
            if (k.startswith("monitor/") or k.startswith("knn_")) and not k.endswith(SECONDS_SUFFIX)
        }
        return sorted(keys)

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in self.metrics if _number(r.get(key))]
        return [s for s, _ in points], [v for _, v in points]

    def last(self, key: str) -> float | None:
        _, values = self.curve(key)
        return values[-1] if values else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by a crash
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def open_run(path: str | Path) -> RunRecord:
    """A run folder read back; a path that is not one raises a DataError naming it."""
    folder = Path(path)
    config_file, metrics_file = folder / "config.yaml", folder / "metrics.jsonl"
    if not folder.is_dir() or not (config_file.is_file() or metrics_file.is_file()):
        raise DataError(
            f"{str(path)!r} is not a run folder (no config.yaml or metrics.jsonl in it); pass the "
            "folders `siamae pretrain --out` wrote"
        )
    try:
        config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise DataError(f"{config_file}: not a readable config ({type(err).__name__})") from None
    return RunRecord(folder.name, folder, config or {}, _read_json_lines(metrics_file))


def summary_figures(folder: Path) -> dict[str, float]:
    """The numeric figures of every ``summary.json`` under ``folder``, named
    ``<its folder>: <key>`` (a nested mapping of numbers, as a probe's top-1 per k, as
    ``key@k``)."""
    figures: dict[str, float] = {}
    for summary in sorted(folder.rglob("summary.json")):
        try:
            data = json.loads(summary.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            continue
        if not isinstance(data, dict):
            continue
        where = summary.parent.name if summary.parent != folder else folder.name
        for key, value in data.items():
            if key in NOT_FIGURES:
                continue
            if _number(value):
                figures[f"{where}: {key}"] = float(value)
            elif isinstance(value, dict):
                for sub, v in value.items():
                    if _number(v):
                        figures[f"{where}: {key}@{sub}"] = float(v)
    return figures


def recipe_of(config: dict[str, Any]) -> str:
    """A short line of the recipe: encoder, views, batch, learning rate, length."""
    model, data, optim = (config.get(k) or {} for k in ("model", "data", "optim"))
    length = (
        f"{optim['max_steps']} steps"
        if optim.get("max_steps")
        else f"{optim.get('epochs', '?')} epochs"
    )
    return (
        f"{model.get('arch', '?')}/{model.get('patch_size', '?')} {model.get('img_size', '?')}px, "
        f"batch {data.get('batch_size', '?')}, lr {optim.get('base_lr', '?')}, {length}"
    )


def _cell(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


def table(runs: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    """The header and one row per run; a figure a run lacks is an empty cell."""
    monitors = sorted({k for r in runs for k in r.monitor_keys()})
    evaluations = sorted({k for r in runs for k in r.evaluations})
    header = ["run", "method", "recipe", "steps", "final loss", *monitors, *evaluations]
    rows = []
    for r in runs:
        steps = max((rec["step"] for rec in r.metrics), default=None)
        rows.append(
            [
                r.name,
                str(r.config.get("method", "")),
                recipe_of(r.config) if r.config else "",
                "" if steps is None else str(steps),
                _cell(r.last("loss")),
                *(_cell(r.last(k)) for k in monitors),
                *(_cell(r.evaluations.get(k)) for k in evaluations),
            ]
        )
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def as_csv(header: list[str], rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def draw_curves(runs: list[RunRecord], path: Path) -> Path:
    """One panel for the loss and one per monitor, every run's curve overlaid, with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["loss", *sorted({k for r in runs for k in r.monitor_keys()})]
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for run in runs:
            steps, values = run.curve(key)
            if steps:
                ax.plot(
                    steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=run.name
                )
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle("siamae compare: " + ", ".join(r.name for r in runs))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _unique_names(runs: list[RunRecord]) -> None:
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = str(r.path)


def compare(paths: list[str], evals: list[tuple[str, str]] | None = None) -> list[RunRecord]:
    """The runs read back with their evaluations; every path is checked before any is read."""
    runs = [open_run(p) for p in paths]
    by_path = {r.path.resolve(): r for r in runs}
    extra: list[tuple[RunRecord, Path]] = []
    for run_path, folder in evals or []:
        run = by_path.get(Path(run_path).resolve())
        if run is None:
            raise DataError(
                f"--eval {run_path}: not one of the runs compared; name it as a RUN too"
            )
        if not Path(folder).is_dir():
            raise DataError(f"--eval {run_path} {folder}: {folder!r} is not a folder")
        extra.append((run, Path(folder)))
    for run in runs:
        if (run.path / "eval").is_dir():
            run.evaluations.update(summary_figures(run.path / "eval"))
    for run, folder in extra:
        run.evaluations.update(summary_figures(folder))
    _unique_names(runs)
    return runs


def _command(args: argparse.Namespace) -> int:
    runs = compare(args.runs, args.eval)
    header, rows = table(runs)
    print(
        as_csv(header, rows) if args.csv else markdown(header, rows), end="" if args.csv else "\n"
    )
    picture = draw_curves(runs, Path(args.out))
    if not args.csv:
        print(f"\ncurves: {picture}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """``siamae compare``."""
    p = subparsers.add_parser(
        "compare",
        help="one table of runs (method, recipe, steps, loss, monitors, evaluations) and one "
        "picture of their curves",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    p.add_argument("--csv", action="store_true", help="CSV on stdout instead of Markdown")
    p.add_argument(
        "--eval",
        nargs=2,
        action="append",
        metavar=("RUN", "DIR"),
        help="evaluations of RUN: every summary.json under DIR (repeatable; <RUN>/eval/ is "
        "always read)",
    )
    p.add_argument(
        "--out",
        default="compare.png",
        help="the picture of the curves (default: compare.png)",
    )
    p.set_defaults(func=_command)
