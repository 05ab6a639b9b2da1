"""The dense monitor: label propagation J&F of the encoder being pre-trained, on a small
DAVIS-layout root, through :func:`siamae.eval.propagation.davis.evaluate_davis` with the options
of ``siamae eval davis`` (protocol, ``--set``, ``--sequences``, ``--max-frames``), so the figure
logged at a step is the one that command gives on that step's checkpoint."""

from __future__ import annotations

import tempfile

import torch

from siamae.eval.propagation.davis import check_root, evaluate_davis, list_sequences, load_sequence
from siamae.eval.propagation.engine import PropagationParams, check_resize_rule, protocol


def davis_params(name: str, overrides: str | None) -> PropagationParams:
    """The protocol the monitor uses: ``eval davis --protocol NAME --set K=V ...``."""
    return protocol(name, "davis", [s for s in (overrides or "").split(",") if s])


class DenseMonitor:
    """``monitor/davis_jf`` (and its J and F means) on ``root``'s ``sequences``."""

    def __init__(
        self,
        root: str,
        params: PropagationParams,
        patch_size: int,
        device: torch.device,
        sequences: list[str] | None = None,
        max_frames: int | None = None,
    ) -> None:
        check_resize_rule(params.resize, patch_size)
        self.root = check_root(root)
        # Every named sequence is read now: a wrong name fails before training starts.
        self.sequences = list_sequences(self.root, None, sequences)
        for name in self.sequences:
            load_sequence(self.root, name)
        self.params, self.device, self.max_frames = params, device, max_frames

    def run(self, encoder: torch.nn.Module) -> dict[str, float]:
        was_training = encoder.training
        try:
            # The predictions go to a scratch folder: the figures are what the monitor keeps.
            with tempfile.TemporaryDirectory(prefix="siamae-dense-monitor-") as out:
                result = evaluate_davis(
                    encoder,
                    self.root,
                    out,
                    self.params,
                    sequences=self.sequences,
                    max_frames=self.max_frames,
                    device=self.device,
                    progress=False,
                )
        finally:
            encoder.train(was_training)
        s = result.summary
        return {
            "monitor/davis_jf": float(s["J&F-Mean"]),
            "monitor/davis_j": float(s["J-Mean"]),
            "monitor/davis_f": float(s["F-Mean"]),
        }
