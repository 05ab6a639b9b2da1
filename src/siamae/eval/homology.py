"""``siamae eval homology``: does an encoder recognise the patches of its own image in a mixture?

Held-out images (the first ``--count`` of ``--data``, sorted, centre crops at the encoder's
size) are mixed in groups of R with partitions drawn from ``--seed`` alone, and the encoder runs
over the mixtures. Per block it reports the homologous precision (the share of the k keys a
patch query keeps, or would keep, that come from its own image) and the soft homologous mass
(the softmax mass of its attention logits on the other patches of its own image). Chance is
about 1/R for both.

A MixedAE training checkpoint runs as it was trained (its top-k blocks, CLS option, segment
embeddings at the encoder input if it had them); its figures equal the ``heldout_*`` figures its
training log gave at the same step for the same ``mixing.homology_*`` settings. Any other
encoder (MAE, naive mixing, an export) runs its ordinary attention in every block, and the
precision is that of the k keys a top-k would keep.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from siamae.arguments import (
    CHECKPOINT_HELP,
    add_device_option,
    add_result_file_option,
    add_threads_option,
    apply_threads_option,
    non_negative_int,
    positive_int,
    resolve_device,
    write_result_file,
)
from siamae.checkpoint import TRAIN_FORMAT, load_checkpoint
from siamae.config import upgraded
from siamae.data.mixing import heldout_images, heldout_partitions
from siamae.errors import CheckpointError, SiamaeError
from siamae.loading import describe_encoder, load_encoder
from siamae.methods.mixedae import MixedAE, parse_topk_blocks
from siamae.models.decoder import MAEDecoder
from siamae.recipes import config_from_dict


def method_for(path: str | Path, ratio: int = 4, topk: int | None = None) -> MixedAE:
    """A MixedAE for the checkpoint at ``path``: its own, for a MixedAE training checkpoint;
    else the encoder inside a MixedAE with ordinary attention everywhere (mixing ``ratio``,
    ``topk`` keys measured, default ceil((N + 1) / R))."""
    return load_for_homology(path, ratio, topk)[0]


def load_for_homology(
    path: str | Path, ratio: int = 4, topk: int | None = None
) -> tuple[MixedAE, str]:
    """:func:`method_for` and one line saying what was loaded and how it will run."""
    ckpt: dict[str, Any] | None = None
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError:
        ckpt = None  # not a training checkpoint: load_encoder says what it is, or why not
    if ckpt is not None and ckpt.get("format") == TRAIN_FORMAT and ckpt.get("method") == "mixedae":
        config = upgraded(ckpt["config"], str(path))
        # The figures are measured on --data, not on the run's own held-out folder.
        config["mixing"] = {**config.get("mixing", {}), "homology_data": None}
        method = MixedAE.from_config(config_from_dict(config))
        method.load_state_dict(ckpt["model"])
        return method.eval(), (
            f"MixedAE training checkpoint {path} (step {ckpt.get('step')}): as trained, top-k "
            f"in blocks {list(method.topk_blocks) or 'none'}, segment embeddings "
            f"{method.segment_place}, CLS among the patch keys: {method.cls_key}"
        )
    encoder = load_encoder(path)
    n = encoder.num_patches
    if ratio < 2 or n % ratio or n // ratio < 2:
        raise SiamaeError(
            f"--ratio {ratio}: the encoder's {n} patches must split into {ratio} equal sets of 2 "
            "or more"
        )
    if topk is not None and not 1 <= topk <= n + 1:
        raise SiamaeError(f"--topk {topk}: expected 1 <= k <= {n + 1}")
    # The decoder is never run: MixedAE needs one to exist.
    decoder = MAEDecoder(
        encoder.embed_dim, encoder.grid_size, encoder.patch_size, dim=16, depth=1, num_heads=1
    )
    method = MixedAE(
        encoder,
        decoder,
        ratio,
        topk=topk,
        topk_blocks=(),
        attention_loss_weight=0.0,
        contrastive_weight=0.0,
        contrastive_features="final",
    )
    return method.eval(), f"{describe_encoder(encoder)}; ordinary attention in every block"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``homology`` to the ``siamae eval`` group."""
    p = subparsers.add_parser(
        "homology",
        help="MixedAE's homologous precision and mass on held-out mixtures, per block",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help=CHECKPOINT_HELP + "; a MixedAE training checkpoint or run folder runs as trained",
    )
    p.add_argument("--data", required=True, help="folder (or .txt list) of held-out images")
    p.add_argument(
        "--count", type=positive_int, default=64, help="images used, in sorted order (64)"
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the partitions (0)")
    p.add_argument(
        "--blocks",
        default=None,
        help="blocks to measure: 'all' or indices '0,5' (default: a MixedAE's top-k and loss "
        "blocks, else all)",
    )
    p.add_argument(
        "--ratio",
        type=positive_int,
        default=4,
        help="images per mixture, for non-MixedAE encoders (4)",
    )
    p.add_argument("--topk", type=positive_int, default=None, help="k, for non-MixedAE encoders")
    p.add_argument(
        "--batch-size", type=positive_int, default=64, help="images per forward pass (64)"
    )
    add_device_option(p)
    add_result_file_option(p)
    add_threads_option(p)
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    apply_threads_option(args)
    if args.count < 1:
        raise SiamaeError(f"--count {args.count}: expected 1 or more images")
    method, description = load_for_homology(args.checkpoint, args.ratio, args.topk)
    blocks = None
    if args.blocks is not None:
        try:
            blocks = parse_topk_blocks(args.blocks, method.encoder.depth)
        except ValueError as err:
            raise SiamaeError(f"--blocks: {err}") from None
        if not blocks:
            raise SiamaeError("--blocks: name at least one block, e.g. 'all' or '0,5'")
    device = resolve_device(args.device)
    print(description)
    pixels = heldout_images(args.data, method.encoder.img_size, args.count, method.ratio)
    noise = heldout_partitions(pixels.shape[0], method.encoder.num_patches, method.ratio, args.seed)
    method.to(device)
    with torch.inference_mode():
        figures = method.homology(pixels, noise, device, args.batch_size, blocks)
    n = method.encoder.num_patches
    print(
        f"{pixels.shape[0]} images in {pixels.shape[0] // method.ratio} mixtures of "
        f"{method.ratio}, partitions from seed {args.seed}; k = {method.topk} keys of "
        f"{n + 1 if method.cls_key else n}; chance about {1 / method.ratio:.3f}"
    )
    for key, value in figures.items():
        print(f"  {key:32s} {value:.4f}")
    if args.out:
        record = {
            "checkpoint": str(args.checkpoint),
            "data": str(args.data),
            "images": int(pixels.shape[0]),
            "seed": args.seed,
            "ratio": method.ratio,
            "topk": method.topk,
            **figures,
        }
        print(f"  written to {write_result_file(args.out, record)}")
    return 0
