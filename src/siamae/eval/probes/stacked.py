"""One optimizer step for many linear heads stacked in one tensor, each at its own learning rate.

A grid of heads (``siamae eval linear --grid``, the segmentation probe's ``--grid``) keeps the
heads that read the same features as one (H, ...) parameter, so each step is a few whole-tensor
operations instead of a few per head. torch's SGD and timm's LARS take one learning rate per
parameter, so :class:`StackedSGD` applies theirs with a per-head rate: the same operations in
the same order (weight decay, LARS's trust ratio from each head's own norms, momentum), the
final ``p -= lr x buf`` as ``addcmul`` with a (H, 1, ...) rate, which rounds as ``add`` with
``alpha=-lr`` does. Every head thus takes bit for bit the step torch's SGD (or timm's
``Lars(trust_coeff=0.001)``) would give it alone; ``tests/eval/probes/test_grid.py`` checks it.
"""

from __future__ import annotations

from typing import Any

import torch

LARS_TRUST = 0.001  # MAE's LARS (timm's default trust coefficient)
LARS_EPS = 1e-8  # timm's


class StackedSGD(torch.optim.Optimizer):
    """Momentum SGD (or LARS for groups with ``adapt``) over parameters whose first dimension
    is the head. Each group: ``params`` (stacked parameters), ``heads`` (lo, hi): their rows of
    the rate vector :meth:`step` takes, ``weight_decay`` and ``adapt`` (LARS's trust ratio)."""

    def __init__(self, groups: list[dict[str, Any]], momentum: float) -> None:
        super().__init__(groups, {"momentum": momentum, "weight_decay": 0.0, "adapt": False})

    @torch.no_grad()
    def step(self, closure: Any = None, lrs: torch.Tensor | None = None) -> None:  # type: ignore[override]
        """One step with head i at rate ``lrs[i]`` (float32, the heads in group order)."""
        assert lrs is not None, "StackedSGD.step needs the heads' rates"
        for group in self.param_groups:
            lo, hi = group["heads"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                rate = lrs[lo:hi].view(-1, *[1] * (p.ndim - 1))
                self._update(p, rate, group)

    def _update(self, p: torch.Tensor, rate: torch.Tensor, group: dict[str, Any]) -> None:
        grad, decay = p.grad, group["weight_decay"]
        if group["adapt"]:  # timm's LARS: trust = c ||p|| / (||g|| + wd ||p|| + eps), per head
            w_norm = torch.linalg.vector_norm(p.flatten(1), dim=1)
            g_norm = torch.linalg.vector_norm(grad.flatten(1), dim=1)
            trust = LARS_TRUST * w_norm / (g_norm + w_norm * decay + LARS_EPS)
            trust = torch.where(w_norm > 0, torch.where(g_norm > 0, trust, 1.0), 1.0)
            grad = grad.add(p, alpha=decay).mul_(trust.view_as(rate))
        elif decay != 0:
            grad = grad.add(p, alpha=decay)
        momentum = group["momentum"]
        if momentum != 0:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.clone(grad).detach()
            else:
                buf.mul_(momentum).add_(grad)
            grad = buf
        p.addcmul_(grad, rate, value=-1)
