"""Metrics to JSONL and CSV (and TensorBoard when installed), safe to resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

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


def _truncate_csv(path: Path, max_step: int) -> None:
    if not path.exists():
        return
    with path.open() as f:
        rows = list(csv.DictReader(f))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["step"]) <= max_step)


class MetricsLogger:
    """Appends one record per log step. On resume, records after the resumed step are dropped,
    so the files read as one uninterrupted run."""

    def __init__(self, run_dir: Path, resume_step: int = 0, tensorboard: bool = True) -> None:
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        if resume_step > 0:
            _truncate_jsonl(self.jsonl, resume_step)
            _truncate_csv(self.csv, resume_step)
        else:
            self.jsonl.unlink(missing_ok=True)
            self.csv.unlink(missing_ok=True)
        if not self.csv.exists():
            with self.csv.open("w", newline="") as f:
                csv.DictWriter(f, CSV_COLUMNS).writeheader()
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

    def log(self, record: dict[str, Any]) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        with self.csv.open("a", newline="") as f:
            csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore").writerow(record)
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
