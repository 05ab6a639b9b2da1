"""Metrics to JSONL and CSV (and TensorBoard when installed, W&B when asked), safe to resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from siamae.engine.tracking import WandbRun

CSV_COLUMNS = [
    "step",
    "epoch",
    "loss",
    "lr",
    "pairs_per_s",
    "data_wait",
    "skipped",
    "knn_top1",
    "knn_top5",
]


def _truncate_jsonl(path: Path, max_step: int) -> None:
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= max_step
    ]
    path.write_text("".join(line + "\n" for line in keep))


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or CSV_COLUMNS), rows


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


class MetricsLogger:
    """Appends one record per log step. On resume, records after the resumed step are dropped,
    so the files read as one uninterrupted run.

    The CSV starts with the engine's columns; a scalar a method logs (its loss terms, an
    evaluation's top-1) gets a column of its own the first time it appears.
    """

    def __init__(
        self,
        run_dir: Path,
        resume_step: int = 0,
        tensorboard: bool = True,
        tracker: WandbRun | None = None,
    ) -> None:
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.columns = list(CSV_COLUMNS)
        if resume_step > 0:
            _truncate_jsonl(self.jsonl, resume_step)
            if self.csv.exists():
                self.columns, rows = _read_csv(self.csv)
                _write_csv(
                    self.csv, self.columns, [r for r in rows if int(r["step"]) <= resume_step]
                )
        else:
            self.jsonl.unlink(missing_ok=True)
            self.csv.unlink(missing_ok=True)
        if not self.csv.exists():
            _write_csv(self.csv, self.columns, [])
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(
                    str(run_dir / "tensorboard"),
                    purge_step=resume_step + 1 if resume_step else None,
                )
            except ImportError:  # tensorboard is an optional extra
                self.tb = None
        # W&B when the config asks for it (run.wandb): the same records, the config, pictures.
        # Started by the caller, before the run's first file is written: it can fail.
        self.tracker = tracker

    def log(self, record: dict[str, Any]) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        new = [k for k, v in record.items() if k not in self.columns and _is_scalar(v)]
        if new:  # rare: rewrite the file once with the wider header
            _, rows = _read_csv(self.csv)
            self.columns += new
            _write_csv(self.csv, self.columns, rows)
        with self.csv.open("a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(record)
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
        if self.tracker is not None:
            self.tracker.log(record)

    def close(self) -> None:
        """Close the files; the tracker gets the pictures the run wrote into its folder."""
        if self.tb is not None:
            self.tb.close()
        if self.tracker is not None:
            self.tracker.log_pictures()
            self.tracker.close()


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
