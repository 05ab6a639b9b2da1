"""Named probe protocols: a published number is reproduced by naming the paper's protocol.

Each preset fixes what the probe reads from the frozen encoder and how the head is trained.
An option given explicitly on the command line overrides its preset's value (the run's JSON
records the protocol and every resolved value).

Linear probe (``siamae eval linear --protocol``):

- ``mae``: MAE's ``main_linprobe.py`` as published (Table/appendix of He et al. 2022): the CLS
  token after the final norm, BatchNorm1d(affine=False, eps 1e-6) + Linear (weights N(0, 0.01)),
  LARS (momentum 0.9, trust 0.001, no weight decay), base lr 0.1 x batch / 256 at batch 16384,
  90 epochs, 10 of warm-up then a half-cosine.
- ``siameseim``: SiameseIM's ``configs/linprobe/dist_linprobe_sim_base.sh`` (``--global_pool``):
  the mean of the last block's patch tokens, then a fresh, frozen LayerNorm (its ``fc_norm``,
  never trained: the probe trains the head only), then the same BatchNorm + Linear, LARS, base
  lr 0.1 at batch 16384, 90 epochs, 10 of warm-up. The final norm of an encoder that has one
  is skipped, as the official code deletes it.
- ``mae-sgd256`` (the default, what ``siamae eval linear`` always ran): MAE's head, features and
  schedule, but SGD with momentum at batch 256 (lr 0.1), which fits any machine.

The batch of 16384 is exact whatever the memory: the head trains on features, and the images
of a batch are encoded in chunks (``--batch-size`` smaller than the preset's changes the batch
and, by the lr rule, the learning rate).

Few-shot (``siamae eval fewshot --protocol``):

- ``siameseim``: SiameseIM's ``main_logistic.py``: the last block's CLS token with the final norm
  skipped (``forward_features(x)[:, 0]`` of its ViT), lambda 0.1 (ViT-B). The spec's wording
  ("global-pooled features") differs from that code; the code is what produced the number.
- ``mean-pooled`` (the default): the mean of the patch tokens after the final norm, lambda 0.1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from siamae.errors import SiamaeError
from siamae.eval.probes.features import FEATURES


@dataclass(frozen=True)
class LinearProtocol:
    name: str
    summary: str
    pool: str
    optimizer: str
    base_lr: float
    batch_size: int
    epochs: int
    warmup_epochs: float
    weight_decay: float = 0.0
    momentum: float = 0.9

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "features": FEATURES[self.pool]}


LINEAR_PROTOCOLS: dict[str, LinearProtocol] = {
    "mae": LinearProtocol(
        "mae",
        "MAE's linear probe: CLS after the final norm, BatchNorm(affine=False) + Linear, LARS, "
        "batch 16384, base lr 0.1, 90 epochs",
        pool="cls",
        optimizer="lars",
        base_lr=0.1,
        batch_size=16384,
        epochs=90,
        warmup_epochs=10.0,
    ),
    "siameseim": LinearProtocol(
        "siameseim",
        "SiameseIM's linear probe: mean of the patch tokens, a fresh frozen LayerNorm, "
        "BatchNorm(affine=False) + Linear, LARS, batch 16384, base lr 0.1, 90 epochs",
        pool="mean-ln",
        optimizer="lars",
        base_lr=0.1,
        batch_size=16384,
        epochs=90,
        warmup_epochs=10.0,
    ),
    "mae-sgd256": LinearProtocol(
        "mae-sgd256",
        "MAE's head and schedule with SGD (momentum 0.9) at batch 256, base lr 0.1, 90 epochs",
        pool="cls",
        optimizer="sgd",
        base_lr=0.1,
        batch_size=256,
        epochs=90,
        warmup_epochs=10.0,
    ),
}
DEFAULT_LINEAR_PROTOCOL = "mae-sgd256"


@dataclass(frozen=True)
class FewShotProtocol:
    name: str
    summary: str
    pool: str
    lambd: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "features": FEATURES[self.pool]}


FEWSHOT_PROTOCOLS: dict[str, FewShotProtocol] = {
    "siameseim": FewShotProtocol(
        "siameseim",
        "SiameseIM's few-shot code: the last block's CLS token (no final norm), "
        "L2 logistic regression, lambda 0.1",
        pool="cls-raw",
        lambd=0.1,
    ),
    "mean-pooled": FewShotProtocol(
        "mean-pooled",
        "mean of the patch tokens after the final norm, L2 logistic regression, lambda 0.1",
        pool="mean",
        lambd=0.1,
    ),
}
DEFAULT_FEWSHOT_PROTOCOL = "mean-pooled"


def linear_protocol(name: str) -> LinearProtocol:
    if name not in LINEAR_PROTOCOLS:
        raise SiamaeError(
            f"--protocol {name!r}: unknown linear-probe protocol; choose one of "
            f"{', '.join(LINEAR_PROTOCOLS)}"
        )
    return LINEAR_PROTOCOLS[name]


def fewshot_protocol(name: str) -> FewShotProtocol:
    if name not in FEWSHOT_PROTOCOLS:
        raise SiamaeError(
            f"--protocol {name!r}: unknown few-shot protocol; choose one of "
            f"{', '.join(FEWSHOT_PROTOCOLS)}"
        )
    return FEWSHOT_PROTOCOLS[name]
