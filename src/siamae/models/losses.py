"""The pre-training losses, in one place: what a user's own loop combines with siamae's models.

- :func:`pixel_targets` and :func:`masked_mse` (and the two together, :func:`norm_pix_mse`):
  MAE's norm-pix reconstruction loss, which MAE, CropMAE, SiamMAE and MixedAE minimise;
- :func:`unigrad_loss`: SiameseIM's UniGrad loss on dense features;
- :func:`homologous_mass_loss` (MixedAE's recognition loss on attention logits) and
  :func:`homologous_contrastive_loss` (its SupCon form on patch tokens).

Each is a plain function of tensors (no module state), as the methods call it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from siamae.models.homologous import token_sources
from siamae.models.masking import patchify
from siamae.world import world_size

__all__ = [
    "homologous_contrastive_loss",
    "homologous_mass_loss",
    "masked_mse",
    "norm_pix_mse",
    "pixel_targets",
    "unigrad_loss",
]


def norm_pix_mse(
    pred: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool = True,
) -> torch.Tensor:
    """MAE's reconstruction loss: mean squared error on the masked patches of ``images``, each
    target patch normalised by its own mean and variance (``norm_pix``).

    Args:
        pred: (B, N, p*p*3) the decoder's per-patch prediction.
        images: (B, 3, H, W) the normalised view the prediction is scored against.
        mask: (B, N), 1 on the masked (predicted) patches.

    >>> import torch
    >>> from siamae.models.losses import norm_pix_mse
    >>> images, mask = torch.randn(2, 3, 32, 32), torch.ones(2, 4)
    >>> pred = torch.zeros(2, 4, 16 * 16 * 3)
    >>> round(norm_pix_mse(pred, images, mask, patch_size=16).item(), 2)  # unit variance per patch
    1.0
    """
    return masked_mse(pred, pixel_targets(images, patch_size, norm_pix), mask)


def pixel_targets(
    images: torch.Tensor, patch_size: int, norm_pix: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Patchified targets; with ``norm_pix`` each patch is normalised by its own mean and variance.

    >>> import torch
    >>> from siamae import pixel_targets
    >>> pixel_targets(torch.rand(2, 3, 32, 32), patch_size=16).shape  # (B, N, p*p*3)
    torch.Size([2, 4, 768])
    """
    target = patchify(images, patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    return target


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error averaged over masked patches only.

    Args:
        pred, target: (B, N, F). mask: (B, N), 1 on masked patches.

    >>> import torch
    >>> from siamae import masked_mse
    >>> target = torch.zeros(1, 2, 3)
    >>> masked_mse(torch.ones(1, 2, 3), target, mask=torch.tensor([[1.0, 0.0]])).item()
    1.0
    """
    per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)


def unigrad_loss(
    pred: torch.Tensor, target: torch.Tensor, neg_weight: float = 0.02
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UniGrad: [mean ||p - z||^2 + lambda mean(p^T F p)] / D over all tokens, F = z^T z / n.

    ``target`` is already normalised and carries no gradient. F is averaged over processes
    (every rank holds the same number of tokens, so that is the global batch's F). Returns the
    loss and its two terms (each divided by D) for logging.

    >>> import torch
    >>> from siamae import unigrad_loss
    >>> target = torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1)
    >>> loss, pull, push = unigrad_loss(target.clone(), target, neg_weight=0.02)
    >>> pull.item(), loss.item() == (0.02 * push).item()
    (0.0, True)
    """
    dim = pred.shape[-1]
    p = pred.reshape(-1, dim)
    z = target.reshape(-1, dim)
    pull = ((p - z) ** 2).sum(-1).mean()
    with torch.no_grad():
        correlation = z.T @ z / z.shape[0]
        if world_size() > 1:
            dist.all_reduce(correlation)
            correlation /= world_size()
    push = ((p @ correlation) * p).sum(-1).mean()  # mean of diag(p F p^T)
    return (pull + neg_weight * push) / dim, pull / dim, push / dim


def homologous_mass_loss(
    logits: torch.Tensor, source_of: torch.Tensor, cls_key: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recognition loss on one block's attention logits, and the soft homologous mass.

    For patch query i of a mixed sequence, with the candidate keys A(i) = every token it may
    attend except itself (the CLS included when ``cls_key``) and H(i) = the other patches of
    its own source, the homologous mass is the softmax mass of the logits on H(i):
    ``m_i = sum_{j in H(i)} exp(l_ij) / sum_{a in A(i)} exp(l_ia)``, and the loss is
    ``-log m_i``, averaged over heads, patch queries and sequences (a multi-positive InfoNCE on
    q.k with the attention's own scale). The query's own key is left out of both sums: a query
    that attends to itself recognises nothing.

    Args:
        logits: (G, H, 1 + N, 1 + N) fp32 attention logits of one block.
        source_of: (G, N) the source slot of every patch position.
    Returns:
        (loss, mean mass): the loss with gradient, the mass detached.

    >>> import torch
    >>> from siamae import homologous_mass_loss
    >>> logits = torch.zeros(1, 1, 5, 5)  # 1 sequence, 1 head, CLS + 4 patches, uniform attention
    >>> loss, mass = homologous_mass_loss(logits, torch.tensor([[0, 0, 1, 1]]))
    >>> round(mass.item(), 2)  # 1 homologous key of the 4 keys each query may attend
    0.25
    """
    with torch.autocast(logits.device.type, enabled=False):
        patch_logits = logits[:, :, 1:].float()  # (G, H, N, 1 + N): patch queries
        g, _, n, length = patch_logits.shape
        sources = token_sources(source_of)  # (G, 1 + N)
        query = torch.arange(n, device=logits.device)
        self_key = torch.zeros(n, length, dtype=torch.bool, device=logits.device)
        self_key[query, query + 1] = True
        allowed = ~self_key
        if not cls_key:
            allowed[:, 0] = False
        homologous = (sources.unsqueeze(1) == source_of.unsqueeze(2)) & allowed  # (G, N, 1 + N)
        all_keys = patch_logits.masked_fill(~allowed, float("-inf")).logsumexp(-1)
        own = patch_logits.masked_fill(~homologous.unsqueeze(1), float("-inf")).logsumexp(-1)
        log_mass = own - all_keys  # (G, H, N)
        return -log_mass.mean(), log_mass.detach().exp().mean()


def homologous_contrastive_loss(
    tokens: torch.Tensor, source_of: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """SupCon loss of the patch tokens of each mixed sequence, positives = same source.

    For anchor i of a sequence: candidates A(i) = every other patch, positives
    P(i) = the other patches of i's source, and
    ``l_i = -1/|P(i)| sum_{p in P(i)} log(exp(s_ip / t) / sum_{a in A(i)} exp(s_ia / t))``
    with s the cosine similarity. The loss is the mean of l_i over all patches of all sequences.

    Args:
        tokens: (G, N, D) final encoder patch tokens (CLS excluded).
        source_of: (G, N) source slot of each patch.

    >>> import torch
    >>> from siamae import homologous_contrastive_loss
    >>> tokens = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    >>> homologous_contrastive_loss(tokens, torch.tensor([[0, 0, 1, 1]])).item() < 1e-3
    True
    """
    # fp32 even under autocast (which would run the similarity matmul in bf16/fp16).
    with torch.autocast(tokens.device.type, enabled=False):
        z = F.normalize(tokens.float(), dim=-1)
        sim = z @ z.transpose(1, 2) / temperature  # (G, N, N)
        n = sim.shape[1]
        self_pair = torch.eye(n, dtype=torch.bool, device=sim.device)
        sim = sim.masked_fill(self_pair, float("-inf"))
        log_prob = sim - torch.logsumexp(sim, dim=-1, keepdim=True)
        positive = (source_of.unsqueeze(2) == source_of.unsqueeze(1)) & ~self_pair
        per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(-1) / positive.sum(-1)
        return per_anchor.mean()
