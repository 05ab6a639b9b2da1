"""``siamae eval knn`` and ``siamae eval linear``: image-level probes of a frozen encoder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from siamae.arguments import (
    add_device_option,
    add_encoder_source,
    add_output_folder_option,
    add_result_file_option,
    add_threads_option,
    apply_threads_option,
    encoder_from_args,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    resolve_device,
    write_result_file,
)
from siamae.errors import SiamaeError
from siamae.eval.probes import fewshot
from siamae.eval.probes.features import GRID_BLOCKS, POOLS
from siamae.eval.probes.grid import (
    GRID_BLOCK_CHOICES,
    GRID_LRS,
    GRID_POOLS,
    grid_specs,
    train_linear_grid,
)
from siamae.eval.probes.knn import knn_eval
from siamae.eval.probes.linear import LinearConfig, train_linear
from siamae.eval.probes.protocols import (
    DEFAULT_FEWSHOT_PROTOCOL,
    DEFAULT_LINEAR_PROTOCOL,
    FEWSHOT_PROTOCOLS,
    LINEAR_PROTOCOLS,
    fewshot_protocol,
)
from siamae.models.vit import Encoder
from siamae.sizes import size_problem


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    """The probes' shared options: the encoder, the two folders and how images become features."""
    add_encoder_source(p)
    p.add_argument("--train", required=True, help="labelled training ImageFolder (DIR/<class>/*)")
    p.add_argument("--val", required=True, help="labelled validation ImageFolder (same classes)")
    p.add_argument(
        "--pool",
        choices=POOLS,
        default=None,
        help="feature: cls (the CLS token after the final norm), mean (of the patch tokens, "
        "after the final norm), mean-ln (of the last block's patch tokens, then a fresh "
        "LayerNorm: SiameseIM's linear probe), cls-raw (the last block's CLS: SiameseIM's "
        "few-shot); default: cls, or the --protocol's",
    )
    p.add_argument(
        "--img-size",
        type=positive_int,
        default=None,
        help="evaluation size, a multiple of the patch size (default: the encoder's training size)",
    )
    p.add_argument(
        "--crop-pct",
        type=positive_float,
        default=0.875,
        help="resize the short side to img-size/crop-pct, then centre-crop (default 0.875: "
        "256->224; use 1.0 for tiny images such as CIFAR)",
    )
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per forward pass")
    p.add_argument(
        "--num-workers", type=non_negative_int, default=2, help="image-decoding worker processes"
    )
    add_device_option(p)
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of --random-init and of the probe"
    )
    add_threads_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _encoder(args: argparse.Namespace) -> tuple[Encoder, str]:
    apply_threads_option(args)
    encoder, source = encoder_from_args(args)
    img_size = args.img_size or encoder.img_size
    problem = size_problem(img_size, img_size, encoder.patch_size)
    if problem is not None:
        raise SiamaeError(f"--img-size {img_size}: {problem} of the encoder")
    return encoder, source


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``knn``, ``linear`` and ``fewshot`` to the ``siamae eval`` group."""
    p = subparsers.add_parser(
        "knn",
        help="weighted k-NN top-1/top-5 of frozen features on a labelled ImageFolder",
        description=(
            "k-NN probe (DINO protocol): L2-normalised frozen features, cosine similarity, the k "
            "nearest training images vote with weight exp(sim/T). Features are computed once."
        ),
    )
    _add_encoder_args(p)
    p.add_argument(
        "--k",
        type=positive_int,
        nargs="+",
        default=[10, 20, 100, 200],
        help="neighbours (several at once)",
    )
    p.add_argument("--temperature", type=positive_float, default=0.07, help="vote temperature T")
    add_result_file_option(p)
    p.set_defaults(func=_run_knn)

    p = subparsers.add_parser(
        "linear",
        help="linear probe (BatchNorm1d + Linear on frozen features), top-1",
        description=(
            "Linear probe: frozen encoder, BatchNorm1d(affine=False) + Linear, SGD or LARS, "
            "warm-up then cosine. --protocol names the published settings (mae, siameseim; "
            "default mae-sgd256). Checkpoints every epoch in OUT_DIR; running the same command "
            "again resumes."
        ),
    )
    _add_encoder_args(p)
    add_output_folder_option(
        p, "checkpoints, cached features, results", flag="--out-dir", required=True
    )
    p.add_argument(
        "--protocol",
        choices=tuple(LINEAR_PROTOCOLS),
        default=DEFAULT_LINEAR_PROTOCOL,
        help="the published settings to use: "
        + "; ".join(f"{name}: {proto.summary}" for name, proto in LINEAR_PROTOCOLS.items())
        + f" (default {DEFAULT_LINEAR_PROTOCOL}). Options given below override it",
    )
    p.add_argument("--epochs", type=positive_int, default=None, help="default: the protocol's")
    p.add_argument("--optimizer", choices=("sgd", "lars"), default=None)
    p.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="base learning rate; lr = base x batch / 256",
    )
    p.add_argument("--momentum", type=non_negative_float, default=None)
    p.add_argument("--weight-decay", type=non_negative_float, default=None)
    p.add_argument("--warmup-epochs", type=non_negative_float, default=None)
    p.add_argument(
        "--cache-features",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compute centre-crop features once (default), or run the encoder on random crops "
        "every epoch (--no-cache-features)",
    )
    p.add_argument("--eval-every", type=positive_int, default=1, help="validate every N epochs")
    p.add_argument(
        "--no-resume", action="store_true", help="start again even if OUT_DIR has a checkpoint"
    )
    _add_grid_options(p)
    p.set_defaults(func=_run_linear)

    _register_fewshot(subparsers)


def _add_grid_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--grid",
        action="store_true",
        help="train a grid of heads in one pass over cached features (DINOv2's linear "
        "evaluation): every --grid-lrs x --grid-blocks x --grid-pools, with the protocol's "
        "optimizer, batch and schedule; results.json lists every head's top-1 and names the best",
    )
    p.add_argument(
        "--grid-lrs",
        type=positive_float,
        nargs="+",
        default=None,
        metavar="LR",
        help="base lrs of the grid, each x batch / 256 as --lr (default DINOv2's "
        + " ".join(f"{lr:g}" for lr in GRID_LRS)
        + ")",
    )
    p.add_argument(
        "--grid-blocks",
        type=int,
        nargs="+",
        choices=GRID_BLOCK_CHOICES,
        default=None,
        help="CLS tokens of the last 1 and/or 4 blocks (default both)",
    )
    p.add_argument(
        "--grid-pools",
        nargs="+",
        choices=GRID_POOLS,
        default=None,
        help="CLS alone and/or with the average-pooled patch tokens appended (default both)",
    )


def _check_grid(args: argparse.Namespace, cfg: LinearConfig, encoder: Encoder) -> None:
    """--grid's options, checked before any work."""
    given = [f"--{n.replace('_', '-')}" for n in ("grid_lrs", "grid_blocks", "grid_pools")]
    given = [flag for flag in given if getattr(args, flag[2:].replace("-", "_")) is not None]
    if not args.grid:
        if given:
            raise SiamaeError(f"{given[0]} sets the grid of heads; add --grid or drop it")
        return
    if not cfg.cache_features:
        raise SiamaeError("--grid trains its heads on cached features; drop --no-cache-features")
    if cfg.pool != "cls":
        raise SiamaeError(
            f"--grid reads CLS tokens (+ the mean patch token), not --pool {cfg.pool} (the "
            f"{cfg.protocol} protocol's features); drop --grid or use --protocol mae / mae-sgd256"
        )
    if encoder.depth < GRID_BLOCKS:
        raise SiamaeError(
            f"--grid reads the last {GRID_BLOCKS} blocks; the encoder has {encoder.depth}"
        )


def _run_linear_grid(
    args: argparse.Namespace, cfg: LinearConfig, encoder: Encoder, source: str
) -> int:
    specs = grid_specs(
        tuple(args.grid_lrs or GRID_LRS),
        tuple(dict.fromkeys(args.grid_blocks or GRID_BLOCK_CHOICES)),
        tuple(dict.fromkeys(args.grid_pools or GRID_POOLS)),
    )
    result = train_linear_grid(
        encoder,
        args.train,
        args.val,
        specs,
        out_dir=args.out_dir,
        cfg=cfg,
        device=resolve_device(args.device),
        resume=not args.no_resume,
        progress=not args.no_progress,
        source=source,
    )
    best = result["best_head"]
    print(
        f"linear probe grid, protocol {cfg.protocol} ({cfg.optimizer}, batch {cfg.batch_size}, "
        f"{cfg.epochs} epochs), {len(specs)} heads: best {best['name']} (lr {best['lr']:g}), "
        f"top-1 {best['top1']:.2f}"
    )
    print(f"every head's top-1 in {Path(args.out_dir) / 'results.json'}")
    return 0


def _run_knn(args: argparse.Namespace) -> int:
    if any(k < 1 for k in args.k):
        raise SiamaeError(f"--k: every k must be 1 or more, got {args.k}")
    if args.temperature <= 0:
        raise SiamaeError(f"--temperature must be positive, got {args.temperature}")
    encoder, source = _encoder(args)
    args.pool = args.pool or "cls"
    result = knn_eval(
        encoder,
        args.train,
        args.val,
        ks=args.k,
        temperature=args.temperature,
        **_feature_options(args),
    )
    result.info["encoder"] = source
    result.info["pos_resample"] = encoder.pos_resample
    print(
        f"k-NN (weighted cosine, T={args.temperature}, {args.pool} features, "
        f"{result.info['img_size']}px): {result.num_train} train / {result.num_test} val images, "
        f"{result.num_classes} classes"
    )
    print(result.table())
    if args.out:
        write_result_file(args.out, result.to_dict())
        print(f"wrote {args.out}")
    return 0


def _feature_options(args: argparse.Namespace) -> dict[str, Any]:
    """How the k-NN and few-shot probes compute features, from the probes' shared options."""
    return {
        "pool": args.pool,
        "img_size": args.img_size,
        "crop_pct": args.crop_pct,
        "batch_size": args.batch_size or 64,
        "num_workers": args.num_workers,
        "device": resolve_device(args.device),
        "progress": not args.no_progress,
    }


def _run_linear(args: argparse.Namespace) -> int:
    encoder, source = _encoder(args)
    cfg = LinearConfig.for_protocol(
        args.protocol,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        base_lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        pool=args.pool,
        img_size=args.img_size,
        crop_pct=args.crop_pct,
        cache_features=args.cache_features,
        seed=args.seed,
        num_workers=args.num_workers,
        eval_every=args.eval_every,
    )
    _check_grid(args, cfg, encoder)
    if args.grid:
        return _run_linear_grid(args, cfg, encoder, source)
    result = train_linear(
        encoder,
        args.train,
        args.val,
        out_dir=args.out_dir,
        cfg=cfg,
        device=resolve_device(args.device),
        resume=not args.no_resume,
        progress=not args.no_progress,
        source=source,
    )
    # "epochs 2, base_lr 0.1", not a Python dict
    changed = ", ".join(
        f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"
        for name, value in cfg.deviations().items()
    )
    print(
        f"linear probe, protocol {cfg.protocol}"
        + (f" with {changed}" if changed else "")
        + f" ({cfg.optimizer}, batch {cfg.batch_size}, lr {cfg.lr:g}, {cfg.epochs} epochs, "
        f"{cfg.pool} features): top-1 {result.top1:.2f} (best {result.best_top1:.2f})"
    )
    print(f"results in {Path(args.out_dir) / 'results.json'}")
    return 0


def _register_fewshot(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fewshot`` to the ``siamae eval`` group."""
    p = subparsers.add_parser(
        "fewshot",
        help="1 %%-label few-shot top-1: logistic regression on frozen global-pooled features",
        description=(
            "Few-shot evaluation (MSN/SiameseIM protocol): frozen features of a labelled subset "
            "of --train (a list file, or a seeded draw of N images a class), an L2-regularised "
            "multinomial logistic regression, top-1 on the whole --val folder. Features are "
            "cached in --out-dir, shared with 'siamae eval linear'."
        ),
    )
    _add_encoder_args(p)
    p.add_argument(
        "--protocol",
        choices=tuple(FEWSHOT_PROTOCOLS),
        default=DEFAULT_FEWSHOT_PROTOCOL,
        help="the features and lambda to use: "
        + "; ".join(f"{name}: {proto.summary}" for name, proto in FEWSHOT_PROTOCOLS.items())
        + f" (default {DEFAULT_FEWSHOT_PROTOCOL}); --pool and --lambd override it",
    )
    subset = p.add_mutually_exclusive_group()
    subset.add_argument(
        "--subset", help="list file of the labelled images (e.g. ImageNet's 1percent.txt)"
    )
    subset.add_argument(
        "--per-class",
        type=positive_int,
        default=13,
        help="draw this many images a class (default 13: ImageNet's 1 %%)",
    )
    p.add_argument(
        "--lambd",
        type=non_negative_float,
        default=None,
        help="L2 regularisation (default: the protocol's)",
    )
    add_output_folder_option(
        p, "feature cache and fewshot.json (shared with eval linear)", flag="--out-dir"
    )
    p.set_defaults(func=_run_fewshot)


def _run_fewshot(args: argparse.Namespace) -> int:
    encoder, source = _encoder(args)
    protocol = fewshot_protocol(args.protocol)
    args.pool = args.pool or protocol.pool
    args.lambd = protocol.lambd if args.lambd is None else args.lambd
    result = fewshot.fewshot_eval(
        encoder,
        args.train,
        args.val,
        per_class=None if args.subset else args.per_class,
        subset_file=args.subset,
        seed=args.seed,
        lambd=args.lambd,
        out_dir=args.out_dir,
        source=source,
        protocol=protocol.name,
        **_feature_options(args),
    )
    print(
        f"few-shot ({result.subset}: {result.num_labelled} labelled images, {args.pool} "
        f"features, lambda {result.lambd}): top-1 {result.top1:.2f} on {result.num_val} images"
    )
    if args.out_dir:
        print(f"wrote {Path(args.out_dir) / 'fewshot.json'}")
    return 0
