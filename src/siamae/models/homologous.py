"""MixedAE's homologous attention, computed with a plain timm ViT block's own weights.

Per query, only the k largest attention logits are kept (the rest count as -inf) in the
softmax, so a patch of a mixed image attends mostly to patches of its own source once the task
is learned. It has no parameters of its own: these functions read a timm ``Block``'s
``norm1``, ``attn.{qkv, q_norm, k_norm, norm, proj}``, ``ls1``, ``drop_path1`` and MLP and apply
them in timm's order. The encoder stays a plain ``VisionTransformer`` (strict timm loading),
and everything after pre-training (evaluation, probes, export, fine-tuning) uses its ordinary
attention: nothing is patched into the model.

The logits, top-k, softmax and the weighted sum of values are computed in fp32 with autocast
switched off (autocast would otherwise run the matmuls in bf16/fp16): bf16 logits move in 0.4 %
steps, enough to change which keys are selected, and the selection decides which keys exist.

The same logits give the homologous figures and the recognition loss: the share of a patch
query's kept keys from its own image (precision), and the softmax mass of its logits on the
other patches of its own image (mass; the loss is -log of it).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def attention_logits(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm ``Attention``'s scaled q.k logits (fp32, (B, H, L, L)) and its values (B, H, L, hd).

    Autocast is switched off for the logits: they decide which keys a top-k keeps.
    """
    if getattr(attn, "gate", None) is not None:
        raise ValueError("gated timm attention is not supported by homologous attention")
    b, length, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(b, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, key, v = qkv.unbind(0)
    q, key = attn.q_norm(q), attn.k_norm(key)
    with torch.autocast(x.device.type, enabled=False):
        logits = (q.float() * attn.scale) @ key.float().transpose(-2, -1)
    return logits, v


def attend(
    attn: nn.Module,
    logits: torch.Tensor,
    v: torch.Tensor,
    k: int | None,
    cls_key: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rest of the timm ``Attention`` forward from (B, H, L, L) fp32 logits.

    Args:
        k: keys kept per query (top-k of the logits), or None for every key (ordinary softmax).
        cls_key: False removes the CLS (token 0) from the keys of every patch query (the CLS
            query still sees every token): the shared CLS is otherwise a channel between the
            images of a mixture.
    Returns:
        (B, L, H*hd) the output after ``proj``, and (B, H, L, k) the kept key indices (None
        when k is None).
    """
    b, heads, length, _ = logits.shape
    keys = length if cls_key else length - 1  # the keys a patch query may attend
    if k is not None and not 1 <= k <= keys:
        raise ValueError(f"top-k attention needs 1 <= k <= {keys} keys, got k={k}")
    if not cls_key:
        blocked = torch.zeros(length, length, dtype=torch.bool, device=logits.device)
        blocked[1:, 0] = True
        logits = logits.masked_fill(blocked, float("-inf"))
    kept = None
    with torch.autocast(logits.device.type, enabled=False):
        if k is None:
            weights = logits.softmax(dim=-1)
        else:
            top, kept = logits.topk(k, dim=-1)
            # Softmax over the k kept logits, scattered back into place: the same as masking
            # the rest to -inf before a softmax over all L, in less time (1.6x less on a CPU).
            # Exactly k keys per query, ties included: the places come from the indices.
            weights = torch.zeros_like(logits).scatter_(-1, kept, top.softmax(dim=-1))
        weights = attn.attn_drop(weights)
        out = (weights @ v.float()).to(v.dtype)
    out = out.transpose(1, 2).reshape(b, length, heads * v.shape[-1])
    out = attn.norm(out)
    return attn.proj_drop(attn.proj(out)), kept


def topk_attention(
    attn: nn.Module, x: torch.Tensor, k: int, cls_key: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm ``Attention``'s forward with only the top-k logits of each query kept.

    Args:
        attn: ``timm.models.vision_transformer.Attention`` (its weights are used, not changed).
        x: (B, L, D) tokens (after the block's first norm).
        k: keys kept per query, 1 <= k <= L. With k = L it equals ordinary attention.
        cls_key: see :func:`attend`.
    Returns:
        (B, L, D) the attention output after ``proj``, and (B, heads, L, k) the indices of the
        kept keys of every query (for the homologous precision).
    """
    length = x.shape[1]
    if not 1 <= k <= length:
        raise ValueError(f"top-k attention needs 1 <= k <= {length} keys, got k={k}")
    logits, v = attention_logits(attn, x)
    out, kept = attend(attn, logits, v, k, cls_key)
    assert kept is not None
    return out, kept


def homologous_block(
    block: nn.Module, x: torch.Tensor, k: int | None, cls_key: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A timm ``Block``'s forward with top-k attention (k None: ordinary attention, computed
    from explicit logits). Returns (tokens, fp32 logits (B, H, L, L), kept key indices or
    None)."""
    logits, v = attention_logits(block.attn, block.norm1(x))
    attended, kept = attend(block.attn, logits, v, k, cls_key)
    x = x + block.drop_path1(block.ls1(attended))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, logits, kept


def token_sources(source_of: torch.Tensor) -> torch.Tensor:
    """(G, N) source slot of every patch -> (G, 1 + N) with -1 for the CLS (no source)."""
    cls_source = torch.full(
        (source_of.shape[0], 1), -1, dtype=source_of.dtype, device=source_of.device
    )
    return torch.cat([cls_source, source_of], dim=1)


def homologous_precision(kept: torch.Tensor, source_of: torch.Tensor) -> torch.Tensor:
    """Share of the kept keys of each patch query that come from the query's own source image.

    Args:
        kept: (G, H, 1 + N, k) kept key indices (token 0 is CLS, which belongs to no source and
            so never counts as homologous).
        source_of: (G, N) the source slot of every patch position.
    Returns:
        A scalar: the mean over groups, heads and patch queries (CLS queries left out).
    """
    g, heads, length, k = kept.shape
    flat = kept[:, :, 1:].reshape(g, -1)
    key_source = torch.gather(token_sources(source_of), 1, flat).view(g, heads, length - 1, k)
    query_source = source_of.view(g, 1, length - 1, 1)
    return (key_source == query_source).float().mean()
