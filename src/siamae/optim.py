"""AdamW parameter groups and the per-iteration learning rate (warmup, then half-cosine or poly)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

TOKEN_NAMES = ("pos_embed", "cls_token", "mask_token")


def decays(name: str, param: torch.Tensor, no_decay_tokens: bool = False) -> bool:
    """timm's rule, what the published CropMAE/MAE code ran: every tensor of 2+ dimensions
    except biases is decayed (so CLS and mask tokens are); 1-D tensors (norms, biases) are not.
    ``no_decay_tokens`` also exempts position embeddings, CLS and mask tokens."""
    if param.ndim <= 1 or name.endswith(".bias"):
        return False
    return not (no_decay_tokens and name.endswith(TOKEN_NAMES))


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay_tokens: bool = False,
    exempt: tuple[str, ...] = (),
) -> list[dict]:
    """Two AdamW groups: decayed weights and the rest; frozen tensors are left out. Parameters
    named in ``exempt`` (a method's own embedding tables) are never decayed."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = decays(name, param, no_decay_tokens) and name not in exempt
        (decay if decayed else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    groups: list[dict],
    lr: float,
    betas: tuple[float, float],
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW over ``groups`` (each with its weight decay, optionally an ``lr_scale``)."""
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **kwargs)


def lr_at(
    step: int,
    peak_lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "cosine",
    power: float = 1.0,
) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    ``cosine``: linear warmup from 0, then half-cosine from ``peak_lr`` to ``min_lr`` at
    ``total_steps``. ``poly`` (mmsegmentation's schedule): ``min_lr + (peak_lr - min_lr) x
    (1 - step / total_steps) ^ power`` over the whole run, scaled by ``step / warmup_steps``
    during the warmup (mmcv's linear warmup of the poly value).
    """
    if schedule == "poly":
        progress = min(1.0, step / max(total_steps, 1))
        value = min_lr + (peak_lr - min_lr) * (1.0 - progress) ** power
        return value * step / warmup_steps if step < warmup_steps else value
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled lr, times each group's ``lr_scale`` (layer-wise decay) where it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
