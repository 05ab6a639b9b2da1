"""A grid of linear heads trained in one pass (``siamae eval linear --grid``), as DINOv2's linear
evaluation does: every combination of a learning rate, the last 1 or 4 blocks' CLS tokens, and
with or without the average-pooled patch tokens, each a :class:`LinearProbe` (BatchNorm1d
without affine + Linear) trained on the same batches of the same cached features, with the
protocol's optimizer and schedule (only the learning rate differs); the results list every
head's top-1 and name the best on the validation split.

Features are computed once (:data:`GRID_POOL`: the last 4 blocks' CLS tokens and the last
block's mean patch token, after the final norm) and cached like the single probe's. Heads that
read the same features share one BatchNorm pass (their batch statistics are the same numbers)
and one matmul over their stacked (h, C, D') weights, and one optimizer steps every stacked
tensor with a per-head rate (:class:`~siamae.eval.probes.stacked.StackedSGD`), so a step costs a
few tensor operations whatever the number of heads. Every head starts from the same initial weights (the seed's),
so the head at the preset's learning rate, last block, CLS alone, is the single probe's run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from siamae.eval.probes.features import GRID_BLOCKS, GRID_POOL, open_probe
from siamae.eval.probes.linear import (
    LinearConfig,
    LinearProbe,
    _epoch_order,
    _restore,
    _save,
    _Schedule,
    _threads,
)
from siamae.eval.probes.stacked import StackedSGD
from siamae.models.vit import Encoder
from siamae.optim import lr_at

# DINOv2's linear-evaluation learning rates, scaled as there by batch / 256 (our lr rule).
GRID_LRS: tuple[float, ...] = (
    1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1,
)  # fmt: skip
GRID_BLOCK_CHOICES = (1, 4)
GRID_LAYOUT = "stacked"  # how a checkpoint holds the heads: (h, C, D') tensors per feature set
GRID_POOLS = ("cls", "cls+avg")


@dataclass(frozen=True)
class HeadSpec:
    """One head of the grid: its base lr, the blocks whose CLS it reads, and whether the
    average-pooled patch tokens are appended."""

    base_lr: float
    blocks: int
    pool: str

    @property
    def features(self) -> tuple[int, str]:
        return self.blocks, self.pool

    def name(self) -> str:
        last = "last block" if self.blocks == 1 else f"last {self.blocks} blocks"
        return f"lr {self.base_lr:g}, {last}, {self.pool}"


def grid_specs(
    lrs: tuple[float, ...] = GRID_LRS,
    blocks: tuple[int, ...] = GRID_BLOCK_CHOICES,
    pools: tuple[str, ...] = GRID_POOLS,
) -> list[HeadSpec]:
    return [HeadSpec(lr, n, pool) for n in blocks for pool in pools for lr in lrs]


def select_features(feats: torch.Tensor, blocks: int, pool: str) -> torch.Tensor:
    """(N, 5 x D) grid features -> (N, D') of one head: the CLS tokens of the last ``blocks``
    blocks (the oldest first), then the mean patch token for "cls+avg" (DINOv2's
    ``create_linear_input``)."""
    slots = feats.view(feats.shape[0], GRID_BLOCKS + 1, -1)
    parts = [slots[:, GRID_BLOCKS - blocks : GRID_BLOCKS].flatten(1)]
    if pool == "cls+avg":
        parts.append(slots[:, GRID_BLOCKS])
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def feature_columns(blocks: int, pool: str, dim: int) -> tuple[int, int]:
    """The columns of the (N, 5 x D) grid features that :func:`select_features` takes: always
    one contiguous run (CLS slots 4 - blocks .. 3, then slot 4 for "cls+avg")."""
    return (GRID_BLOCKS - blocks) * dim, (GRID_BLOCKS + (pool == "cls+avg")) * dim


class LinearGrid(nn.Module):
    """Heads trained together: ``forward`` gives (H, B, C) logits of all of them.

    BatchNorm normalises each feature on its own, so one BatchNorm over the 5 x D grid features
    gives every head's normalised input (a column slice of it). The heads that read the same
    slice are one (h, C, D') weight and one (h, C) bias, trained as one matmul and stepped by
    :class:`~siamae.eval.probes.stacked.StackedSGD`; :attr:`probes` gives each head as a whole
    :class:`LinearProbe` (its norm with the grid's running statistics of its columns)."""

    def __init__(self, specs: list[HeadSpec], dim: int, num_classes: int, seed: int) -> None:
        super().__init__()
        self.specs, self.dim, self.num_classes = specs, dim, num_classes
        self.norm = nn.BatchNorm1d((GRID_BLOCKS + 1) * dim, affine=False, eps=1e-6)
        groups: dict[tuple[int, str], list[int]] = {}
        for i, spec in enumerate(specs):
            groups.setdefault(spec.features, []).append(i)
        self.groups = groups
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for (blocks, pool), members in groups.items():
            lo, hi = feature_columns(blocks, pool, dim)
            # every head from the seed's initial weights, as LinearProbe(hi - lo, C, seed)
            first = LinearProbe(hi - lo, num_classes, seed).fc
            self.weights.append(first.weight.detach().expand(len(members), -1, -1).clone())
            self.biases.append(first.bias.detach().expand(len(members), -1).clone())
        spans = [feature_columns(blocks, pool, dim) for blocks, pool in groups]
        # the columns some head reads (the last block's CLS alone for a grid of lrs)
        self.span = (min(lo for lo, _ in spans), max(hi for _, hi in spans))
        grouped = [i for members in groups.values() for i in members]
        self.grouped = grouped  # head order inside the stacked tensors and the logits
        # position in the group-ordered output of each head, in spec order
        self.register_buffer(
            "order", torch.tensor([grouped.index(i) for i in range(len(specs))]), persistent=False
        )

    def columns(self, feats: torch.Tensor) -> torch.Tensor:
        """The (N, 5 x D) grid features cut to the columns the heads read (no copy if all)."""
        first, last = self.span
        return feats if last - first == feats.shape[1] else feats[:, first:last]

    def grouped_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """(H, C, B) logits, the heads in group order, of (B, D') features already cut by
        :meth:`columns`: one BatchNorm, then one matmul per group of heads. Heads-major:
        ``W @ x.T`` is twice as fast as ``x @ W.T`` on a CPU for a few heads' outputs and long
        features, and (H, C, B) is the cross-entropy's (N, C, d) layout as it stands."""
        first, last = self.span
        norm = self.norm
        if self.training:
            norm.num_batches_tracked.add_(1)
        normed = F.batch_norm(
            feats,
            norm.running_mean[first:last],  # views: updated in place, as BatchNorm1d does
            norm.running_var[first:last],
            training=self.training,
            momentum=norm.momentum,
            eps=norm.eps,
        )
        parts = []
        for (blocks, pool), weight, bias in zip(self.groups, self.weights, self.biases):
            lo, hi = (c - first for c in feature_columns(blocks, pool, self.dim))
            x = normed if hi - lo == normed.shape[1] else normed[:, lo:hi]
            parts.append(torch.addmm(bias.flatten()[:, None], weight.flatten(0, 1), x.t()))
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        return logits.view(len(self.specs), self.num_classes, feats.shape[0])

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        grouped = self.grouped_logits(self.columns(feats))
        return grouped.index_select(0, self.order).transpose(1, 2)

    @property
    def probes(self) -> list[LinearProbe]:
        """Every head, in spec order, as a :class:`LinearProbe` of its own (copies)."""
        heads: list[LinearProbe] = [None] * len(self.specs)  # type: ignore[list-item]
        stacked = zip(self.groups.items(), self.weights, self.biases)
        for ((blocks, pool), members), weight, bias in stacked:
            lo, hi = feature_columns(blocks, pool, self.dim)
            for row, i in enumerate(members):
                probe = LinearProbe(hi - lo, self.num_classes).to(weight.device)
                with torch.no_grad():
                    probe.fc.weight.copy_(weight[row])
                    probe.fc.bias.copy_(bias[row])
                    probe.norm.running_mean.copy_(self.norm.running_mean[lo:hi])
                    probe.norm.running_var.copy_(self.norm.running_var[lo:hi])
                    probe.norm.num_batches_tracked.copy_(self.norm.num_batches_tracked)
                heads[i] = probe
        return heads


def grid_optimizer(grid: LinearGrid, cfg: LinearConfig) -> StackedSGD:
    """The protocol's optimizer over the stacked heads: SGD (weight decay on weights and
    biases, as torch's SGD over a LinearProbe), or LARS (trust ratio and weight decay on the
    weights, plain momentum SGD on the biases, as :func:`siamae.eval.probes.linear.make_lars`).
    Each head's rate is set every step (:func:`grid_rates`)."""
    groups: list[dict[str, Any]] = []
    lo = 0
    for members, weight, bias in zip(grid.groups.values(), grid.weights, grid.biases):
        heads = (lo, lo + len(members))
        lo += len(members)
        lars = cfg.optimizer == "lars"
        groups.append(
            {"params": [weight], "heads": heads, "weight_decay": cfg.weight_decay, "adapt": lars}
        )
        groups.append(
            {"params": [bias], "heads": heads, "weight_decay": 0.0 if lars else cfg.weight_decay}
        )
    return StackedSGD(groups, momentum=cfg.momentum)


def grid_rates(grid: LinearGrid, cfg: LinearConfig, schedule: _Schedule, step: int) -> torch.Tensor:
    """Every head's rate at ``step`` (group order): the schedule from its peak base x batch/256."""
    return torch.tensor(
        [
            lr_at(
                step,
                grid.specs[i].base_lr * cfg.batch_size / 256,
                cfg.min_lr,
                schedule.warmup,
                schedule.total,
            )
            for i in grid.grouped
        ]  # fmt: skip
    )


@torch.no_grad()
def evaluate_grid(
    grid: LinearGrid, feats: torch.Tensor, labels: torch.Tensor, device: Any
) -> list[float]:
    """Top-1 (percent) of every head on (N, 5 x D) features, all heads per batch."""
    was = grid.training
    grid.eval()
    feats = grid.columns(feats)
    correct = torch.zeros(len(grid.specs), dtype=torch.int64)
    for start in range(0, feats.shape[0], 1024):
        logits = grid.grouped_logits(feats[start : start + 1024].to(device))  # (H, C, B)
        hits = logits.argmax(1).cpu() == labels[None, start : start + 1024]
        correct += hits.sum(dim=1)
    grid.train(was)
    correct = correct.index_select(0, grid.order.cpu())
    return [100.0 * int(c) / max(1, feats.shape[0]) for c in correct]


def fit_grid(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    specs: list[HeadSpec],
    cfg: LinearConfig | None = None,
    out_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    resume: bool = False,
    progress: bool = False,
    run_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train every head of ``specs`` on the same batches of (N, 5 x D) grid features (the
    protocol's batch, optimizer and schedule; only the lr differs); the results: every head's
    final and best top-1 and the best head on the validation features, also written to
    ``out_dir/results.json``. Checkpoints after every epoch, as the single probe's."""
    from tqdm.auto import tqdm

    cfg = cfg or LinearConfig()
    cfg.check()
    device = torch.device(device)
    out = Path(out_dir) if out_dir is not None else None
    specs_info = [dataclasses.asdict(s) for s in specs]
    run_info = {"recipe": dataclasses.asdict(cfg), "grid": specs_info, **(run_info or {})}
    # checkpoints of the per-head layout (before stacking) are refused in one line on resume
    run_info["grid_layout"] = GRID_LAYOUT
    dim = train_feats.shape[1] // (GRID_BLOCKS + 1)
    grid = LinearGrid(specs, dim, num_classes, cfg.seed).to(device)
    opt = grid_optimizer(grid, cfg)
    start_epoch, history = 0, []
    ckpt = out / "checkpoints" / "last.pt" if out is not None else None
    if resume and ckpt is not None and ckpt.is_file():
        start_epoch, history = _restore(ckpt, run_info, grid, opt)  # type: ignore[arg-type]
    schedule = _Schedule.of(len(train_feats), cfg)
    # the columns the heads read, once: each batch then gathers only those
    train_cols = grid.columns(train_feats).contiguous()
    grid.train()
    with _threads(1 if device.type == "cpu" else None):  # tiny matmuls: one thread is faster
        bar = tqdm(
            range(start_epoch, cfg.epochs), desc="linear grid", unit="epoch", disable=not progress
        )
        for epoch in bar:
            record = _grid_epoch(grid, opt, train_cols, train_labels, schedule, epoch, device)
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                record["top1"] = evaluate_grid(grid, val_feats, val_labels, device)
                bar.set_postfix(loss=f"{record['loss']:.3f}", best=f"{max(record['top1']):.2f}")
            history.append(record)
            if ckpt is not None:
                _save(ckpt, run_info, grid, opt, epoch + 1, history)  # type: ignore[arg-type]
        bar.close()
        top1 = evaluate_grid(grid, val_feats, val_labels, device)
    return _grid_result(grid, cfg, top1, history, out, run_info)


def _grid_epoch(
    grid: LinearGrid,
    opt: StackedSGD,
    feats: torch.Tensor,
    labels: torch.Tensor,
    schedule: _Schedule,
    epoch: int,
    device: torch.device,
) -> dict[str, Any]:
    """One epoch of every head on the same batches of features cut by ``grid.columns``; the
    record (mean loss over heads)."""
    cfg = schedule.cfg
    t0 = time.perf_counter()
    step = epoch * schedule.steps_per_epoch
    heads = len(grid.specs)
    loss_sum, seen = 0.0, 0
    for batch, batch_labels in _grid_batches(feats, labels, cfg.batch_size, cfg.seed, epoch):
        lrs = grid_rates(grid, cfg, schedule, step).to(device)
        logits = grid.grouped_logits(batch.to(device))  # (H, C, B)
        n = batch_labels.shape[0]
        target = batch_labels.to(device)[None].expand(heads, n)
        # each head's mean loss, summed: every head gets its own gradient, as if alone.
        # (H, C, B) is (N, C, d): log-softmax runs across the batch at once, 4x faster than
        # over B x H rows of C (the sums' order differs from one head's: agreement to ~1e-7)
        loss = F.cross_entropy(logits, target, reduction="sum") / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(lrs=lrs)
        loss_sum += float(loss.detach()) / heads * n
        seen += n
        step += 1
    return {
        "epoch": epoch + 1,
        "loss": loss_sum / max(1, seen),
        "seconds": time.perf_counter() - t0,
    }


def _grid_batches(
    feats: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, epoch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The single probe's batches (the same order: ``_epoch_order``), gathered with
    ``index_select`` (several times faster than indexing on a CPU)."""
    order = _epoch_order(feats.shape[0], seed, epoch)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < 2 and start > 0:
            break  # BatchNorm cannot train on a batch of one
        yield feats.index_select(0, idx), labels.index_select(0, idx)


def _grid_result(
    grid: LinearGrid,
    cfg: LinearConfig,
    top1: list[float],
    history: list[dict[str, Any]],
    out: Path | None,
    run_info: dict[str, Any],
) -> dict[str, Any]:
    heads = []
    for i, spec in enumerate(grid.specs):
        evaluated = [h["top1"][i] for h in history if "top1" in h]
        heads.append(
            {
                "name": spec.name(),
                **dataclasses.asdict(spec),
                "lr": spec.base_lr * cfg.batch_size / 256,
                "top1": top1[i],
                "best_top1": max([*evaluated, top1[i]]),
            }
        )
    best = max(range(len(heads)), key=lambda i: heads[i]["top1"])  # the first of equals
    result = {
        "protocol": cfg.protocol,
        "deviations_from_protocol": cfg.deviations(),
        "head": "BatchNorm1d(affine=False, eps 1e-6) + Linear per head, frozen encoder",
        "features": "CLS of the last 1 or 4 blocks (+ the mean patch token), after the final norm",
        "top1": top1[best],
        "best_head": heads[best],
        "heads": heads,
        "epochs": cfg.epochs,
        "history": history,
        "out_dir": str(out) if out is not None else None,
        "grid_model": grid,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        shown = {k: v for k, v in result.items() if k != "grid_model"}
        (out / "results.json").write_text(
            json.dumps(shown | run_info, indent=2, default=str) + "\n"
        )
    return result


def train_linear_grid(
    encoder: Encoder,
    train_dir: str | Path,
    val_dir: str | Path,
    specs: list[HeadSpec],
    out_dir: str | Path | None = None,
    cfg: LinearConfig | None = None,
    device: torch.device | str = "cpu",
    resume: bool = False,
    progress: bool = True,
    source: str = "<encoder>",
) -> dict[str, Any]:
    """:func:`fit_grid` on two ImageFolders: their grid features computed once (cached in
    ``out_dir/features``, as the single probe's), then every head trained on them."""
    cfg = cfg or LinearConfig()
    cfg.check()
    out = Path(out_dir) if out_dir is not None else None
    train_set, val_set, cache = open_probe(
        encoder,
        train_dir,
        val_dir,
        cfg.img_size,
        cfg.crop_pct,
        GRID_POOL,
        cache_dir=out / "features" if out is not None else None,
        source=source,
        device=device,
        batch_size=max(64, min(cfg.batch_size, 512)),
        num_workers=cfg.num_workers,
        progress=progress,
    )
    run_info: dict[str, Any] = {
        "encoder": source,
        "train": str(Path(train_dir).resolve()),
        "val": str(Path(val_dir).resolve()),
        "classes": train_set.classes,
    }
    if val_set.skipped:
        run_info["val_skipped"] = [line.split("\t")[0] for line in val_set.skipped]
    val_feats = cache.of_folder("val_grid", val_set, desc="val features")
    train_feats = cache.of_folder("train_grid", train_set, desc="train features")
    return fit_grid(
        train_feats,
        train_set.labels,
        val_feats,
        val_set.labels,
        len(train_set.classes),
        specs,
        cfg,
        out,
        device,
        resume,
        progress,
        run_info,
    )
