"""What the propagation benchmarks (DAVIS, JHMDB, VIP) share around the propagation itself.

Reading: frames as RGB arrays (:func:`read_frame`) and split files (:func:`split_lines`,
:func:`video_name`). Running: :class:`BenchmarkRun`, the frozen encoder on its device with the
timer and the clock. Writing: ``summary.json`` (:meth:`BenchmarkRun.summary`,
:func:`write_summary`: the benchmark, the protocol and its parameters, the figures, the encoder,
the timing, in that order) and the per-item CSV tables (:func:`write_table`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from siamae.data.sources import DECODE_ERRORS, UnreadableSample, to_rgb
from siamae.errors import DataError
from siamae.eval.propagation.engine import PropagationParams, Timer

# Re-exported: layouts is their home (torch-free, for --score-only).
from siamae.eval.propagation.layouts import (
    split_lines as split_lines,
)
from siamae.eval.propagation.layouts import (
    video_name as video_name,
)
from siamae.eval.propagation.layouts import (
    write_summary as write_summary,
)
from siamae.eval.propagation.layouts import (
    write_table as write_table,
)
from siamae.loading import describe_encoder

# -- reading ----------------------------------------------------------------------------------


def read_frame(path: str | Path) -> np.ndarray:
    """A video frame -> (H, W, 3) uint8 RGB; an unreadable file is a DataError naming it."""
    try:
        with Image.open(path) as img:
            return np.asarray(to_rgb(img))
    except (*DECODE_ERRORS, UnreadableSample) as err:  # a decompression bomb too
        raise DataError(f"cannot read frame {path}: {err}") from None


# -- running and writing ----------------------------------------------------------------------


@dataclass
class BenchmarkRun:
    """One benchmark's pass: the frozen encoder in eval mode on ``device``, what it spent
    (:class:`Timer`) and when it started."""

    encoder: torch.nn.Module
    device: str | torch.device
    timer: Timer = field(default_factory=Timer)
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, encoder: torch.nn.Module, device: str | torch.device) -> BenchmarkRun:
        return cls(encoder.eval().to(device), device)

    @property
    def patch(self) -> int:
        return int(self.encoder.patch_size)

    def summary(
        self,
        benchmark: str,
        params: PropagationParams,
        figures: dict[str, Any],
        detailed_timing: bool = False,
    ) -> dict[str, Any]:
        """The summary every benchmark writes: ``benchmark``, ``protocol``, ``params``, then
        ``figures`` (in their order), ``encoder`` and ``timing`` (with ``detailed_timing``,
        also the reading time and the frames per second of features and propagation)."""
        return {
            "benchmark": benchmark,
            "protocol": params.name,
            "params": params.to_dict(),
            **figures,
            "encoder": describe_encoder(self.encoder),
            "timing": self.timing(detailed_timing),
        }

    def timing(self, detailed: bool = False) -> dict[str, Any]:
        timer = self.timer
        record: dict[str, Any] = {
            "frames": timer.frames,
            "seconds_total": round(time.perf_counter() - self.started, 2),
        }
        if detailed:
            record["seconds_reading"] = round(timer.load_s, 2)
        record["seconds_features"] = round(timer.features_s, 2)
        record["seconds_propagation"] = round(timer.propagation_s, 2)
        if detailed:
            record["features_fps"] = timer.frames / timer.features_s if timer.features_s else None
            record["propagation_fps"] = (
                timer.frames / timer.propagation_s if timer.propagation_s else None
            )
        return record
