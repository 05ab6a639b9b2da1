"""UperNet on a plain ViT, the BEiT/MAE semantic-segmentation model, as a small torch module.

- :func:`block_features`: the patch tokens after 4 chosen blocks (3, 5, 7, 11 at depth 12), as
  (B, D, H/p, W/p) maps, before the final norm (as BEiT's backbone takes them).
- :class:`MultiScaleNeck`: the maps made multi-scale: two 2x transposed convolutions (with
  norm + GELU between), one, identity, a 2x max-pool; strides 4, 8, 16, 32 at patch 16.
- :class:`UperHead`: UperNet (Xiao et al., 2018) as mmsegmentation's ``UPerHead`` computes it: a
  pyramid pooling module (scales 1, 2, 3, 6) on the coarsest level, an FPN (1x1 laterals, top-down
  sums, 3x3 convs), all levels upsampled to stride 4, concatenated, a 3x3 fusion conv, dropout,
  a 1x1 classifier. Every conv is conv + norm + ReLU (mmcv's ConvModule), bias-free.
- :class:`FCNHead`: the auxiliary head on the stride-16 level (one 3x3 conv, dropout, 1x1).

Written here rather than taken from a library: neither segmentation-models-pytorch nor
transformers is a dependency, both would bring many more (and transformers' UperNet head is
built from its own config classes), and the module is about 150 lines.

The norm is a parameter (``norm_layer``: channels -> module on (B, C, H, W)); the fine-tuning
passes one synchronised across processes (SyncBN in the recipe), the default is BatchNorm2d.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from siamae.models.vit import Encoder

NormLayer = Callable[[int], nn.Module]


def default_out_indices(depth: int) -> tuple[int, ...]:
    """The 4 blocks whose outputs feed the neck: (3, 5, 7, 11) at depth 12 (BEiT/MAE), the
    same fractions of other depths (ViT-L, 24 blocks: 7, 11, 15, 23)."""
    if depth == 24:
        return (7, 11, 15, 23)
    return tuple(max(0, round((i + 1) * depth / 12) - 1) for i in (3, 5, 7, 11))


def block_features(
    encoder: Encoder, images: torch.Tensor, indices: Sequence[int]
) -> list[torch.Tensor]:
    """The patch tokens after blocks ``indices`` (0-based), each (B, D, H/p, W/p); the blocks
    after the last index are not run."""
    tokens, cls, (gh, gw) = encoder.embed(images)
    x = torch.cat([cls, tokens], dim=1)
    wanted = set(indices)
    out = []
    for i, block in enumerate(encoder.vit.blocks[: max(indices) + 1]):
        x = block(x)
        if i in wanted:
            patches = x[:, 1:]
            out.append(patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], gh, gw))
    return out


class ConvNormAct(nn.Sequential):
    """Conv (no bias) + norm + ReLU: mmcv's ConvModule with a norm, kaiming-initialised."""

    def __init__(self, cin: int, cout: int, kernel: int, norm_layer: NormLayer) -> None:
        conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(conv, norm_layer(cout), nn.ReLU(inplace=True))


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)  # mmseg's conv_seg init
    nn.init.zeros_(conv.bias)
    return conv


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class MultiScaleNeck(nn.Module):
    """4 same-stride ViT maps -> strides /4, /8, /16, /32 of the image (patch 16)."""

    def __init__(self, dim: int, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            norm_layer(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
        )
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, stride=2)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != 4:
            raise ValueError(f"the neck takes 4 feature maps, got {len(features)}")
        ops = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        return [op(x) for op, x in zip(ops, features)]


class PyramidPooling(nn.Module):
    """PSPNet's pooling module: adaptive average pools, 1x1 convs, upsampled back."""

    def __init__(
        self, cin: int, channels: int, scales: Sequence[int], norm_layer: NormLayer
    ) -> None:
        super().__init__()
        self.scales = tuple(scales)
        self.convs = nn.ModuleList(ConvNormAct(cin, channels, 1, norm_layer) for _ in scales)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [
            _resize(conv(F.adaptive_avg_pool2d(x, s)), x.shape[-2:])
            for s, conv in zip(self.scales, self.convs)
        ]


class UperHead(nn.Module):
    """UperNet's decode head on 4 levels (finest first) -> logits at the finest level's size."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        *fine, coarse = in_channels
        self.psp = PyramidPooling(coarse, channels, pool_scales, norm_layer)
        self.psp_bottleneck = ConvNormAct(
            coarse + len(pool_scales) * channels, channels, 3, norm_layer
        )
        self.laterals = nn.ModuleList(ConvNormAct(c, channels, 1, norm_layer) for c in fine)
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3, norm_layer) for _ in fine)
        self.fpn_bottleneck = ConvNormAct(len(in_channels) * channels, channels, 3, norm_layer)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = _classifier(channels, num_classes)

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        *fine, coarse = levels
        top = self.psp_bottleneck(torch.cat([coarse, *self.psp(coarse)], dim=1))
        laterals = [conv(x) for conv, x in zip(self.laterals, fine)] + [top]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse into fine
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([_resize(x, size) for x in outs], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """The auxiliary head: ``num_convs`` 3x3 conv-norm-ReLU, dropout, 1x1 classifier."""

    def __init__(
        self,
        cin: int,
        channels: int,
        num_classes: int,
        num_convs: int = 1,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            *(
                ConvNormAct(cin if i == 0 else channels, channels, 3, norm_layer)
                for i in range(num_convs)
            )
        )
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = _classifier(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(x)))


class UperNet(nn.Module):
    """Neck + UperNet decode head + FCN auxiliary head (on the stride-16 level, ``aux_index``)."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        channels: int = 768,
        aux_channels: int = 256,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        aux_index: int = 2,
    ) -> None:
        super().__init__()
        self.aux_index = aux_index
        self.neck = MultiScaleNeck(dim, norm_layer)
        self.decode = UperHead(
            [dim] * 4, channels, num_classes, dropout=dropout, norm_layer=norm_layer
        )
        self.auxiliary = FCNHead(
            dim, aux_channels, num_classes, dropout=dropout, norm_layer=norm_layer
        )

    def forward(
        self, features: Sequence[torch.Tensor], with_aux: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(decode logits at stride 4, auxiliary logits at stride 16 or None)."""
        levels = self.neck(features)
        aux = self.auxiliary(levels[self.aux_index]) if with_aux else None
        return self.decode(levels), aux


class Segmentor(nn.Module):
    """Encoder + UperNet: images -> logits at the image size (for inference and export)."""

    def __init__(self, encoder: Encoder, head: UperNet, out_indices: Sequence[int]) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.out_indices = tuple(out_indices)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits, _ = self.head(
            block_features(self.encoder, images, self.out_indices), with_aux=False
        )
        return _resize(logits, images.shape[-2:])
