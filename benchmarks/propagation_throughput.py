"""Frames per second of label propagation on real DAVIS: feature extraction and propagation apart.

    python benchmarks/propagation_throughput.py --data-root ../shared/data/DAVIS \
        --model vit_small_patch16 --sequences dog --max-frames 20

Runs the ``cropmae`` protocol (480x880, queue 20, top-k 7) on a random-init encoder (weights do not
change the cost) and prints one JSON line per model with frames/s for each stage.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from siamae.eval.propagation.davis import evaluate_davis
from siamae.eval.propagation.engine import protocol
from siamae.loading import random_encoder

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "DAVIS"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=str(DEFAULT_ROOT))
    ap.add_argument("--model", action="append", help="e.g. vit_tiny_patch16 (repeatable)")
    ap.add_argument("--sequences", default="dog")
    ap.add_argument("--max-frames", type=int, default=20)
    ap.add_argument("--protocol", default="cropmae")
    ap.add_argument("--set", action="append", default=[], help="protocol override key=value")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if not Path(args.data_root).is_dir():
        raise SystemExit(f"DAVIS not found at {args.data_root}; pass --data-root")
    torch.set_num_threads(args.threads)
    params = protocol(args.protocol, "davis", args.set)
    for name in args.model or ["vit_tiny_patch16", "vit_small_patch16"]:
        encoder = random_encoder(name)
        with tempfile.TemporaryDirectory() as out:
            res = evaluate_davis(
                encoder,
                args.data_root,
                out,
                params,
                sequences=args.sequences.split(","),
                max_frames=args.max_frames,
                device=args.device,
                progress=False,
            )
        t = res.summary["timing"]
        print(
            json.dumps(
                {
                    "model": name,
                    "protocol": params.name,
                    "resize": params.resize,
                    "device": args.device,
                    "threads": args.threads,
                    "frames": t["frames"],
                    "features_fps": round(t["features_fps"], 3),
                    "propagation_fps": round(t["propagation_fps"], 3),
                    "end_to_end_fps": round(t["frames"] / t["seconds_total"], 3),
                }
            )
        )


if __name__ == "__main__":
    main()
