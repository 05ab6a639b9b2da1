"""SiameseIM (Tao et al., CVPR 2023): predict view 2's dense features from a masked view 1.

The online branch encodes CLS + the visible patches of view 1, projects them (Linear + 2
blocks) and a predictor (4 blocks) reads them together with one mask token per view-2 patch,
each told where that patch lies relative to view 1 (a sin-cos embedding of its position in
view-1 patch units and of the scale, then a Linear). The target branch, an EMA of the online
encoder, Linear and projector, encodes view 2 whole without gradient; its outputs, LayerNorm-ed
without affine, are what the prediction must match under the UniGrad loss.

Details the paper leaves open follow the official code (OpenGVLab/Siamese-Image-Modeling,
``models_sim.py``, ``util/pos_embed.py``, ``main_pretrain.py``, ``engine_pretrain.py``):
BatchNorm over tokens computed in fp32 inside the projector and predictor blocks (also in the
target's projector, in training mode), the target's LayerNorm with eps 1e-5, the CLS token
carried through the projector and predictor but left out of the loss, the EMA over parameters
only (the target's BatchNorm keeps its own running statistics), the momentum for step t applied
before the forward of step t (here: right after step t-1's optimizer step).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from siamae.config import SiameseIMConfig, check_mask_ratio_range
from siamae.data.siameseim_views import SiameseIMViews
from siamae.methods.base import (
    Batch,
    ColourScale,
    Method,
    MethodOutput,
    denormalize,
)
from siamae.models.losses import unigrad_loss
from siamae.models.masking import gather_tokens
from siamae.models.pos_embed import sincos_2d
from siamae.models.vit import VIT_SIZES, Encoder
from siamae.options import check, option_error
from siamae.world import world_size

if TYPE_CHECKING:
    from siamae.config import Config

# The recipe masks 118 of 196 patches (ViT-B/16 at 224); other grids keep the ratio.
MASK_RATIO = 118 / 196
# The official ``get_2d_sincos_pos_embed`` puts the row's sin-cos in the first half of the
# channels (MAE's code puts the column there).
POS_ORDER = "hw"
TARGET_LN_EPS = 1e-5


# -- relative position of view 2 in view 1 ---------------------------------------------------


def relative_positions(
    box1: torch.Tensor,
    box2: torch.Tensor,
    flip1: torch.Tensor,
    flip2: torch.Tensor,
    image_width: torch.Tensor,
    grid: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where view 2's patch centres lie, in view-1 patch units.

    Args:
        box1, box2: (B, 4) (top, left, height, width), each in the coordinates of the image
            its view was cropped from (after that view's own flip of the whole image).
        flip1, flip2: (B,) bool, whether each view's image was flipped.
        image_width: (B,) or (B, 1), the image width in the boxes' units.
        grid: g, patches per side of both views.
    Returns:
        y, x: (B, g*g) row-major over view 2's patches; view 1's patch (r, c) is at (r, c).
        sh, sw: (B,) view 2's size relative to view 1 (height, width).
    """
    box1, box2 = box1.double(), box2.double()
    t1, l1, h1, w1 = box1.unbind(-1)
    t2, l2, h2, w2 = box2.unbind(-1)
    width = image_width.double().reshape(-1)
    sh, sw = h2 / h1, w2 / w1
    centre = torch.arange(grid, dtype=torch.float64, device=box1.device) + 0.5
    rows = centre.repeat_interleave(grid)  # r + 0.5 of patch r*g + c
    cols = centre.repeat(grid)  # c + 0.5
    y = sh[:, None] * rows + (grid * (t2 - t1) / h1)[:, None] - 0.5
    x_same = sw[:, None] * cols + (grid * (l2 - l1) / w1)[:, None] - 0.5
    # Exactly one view flipped: view 2's column c is mirrored about the image's centre line.
    x_mirrored = -sw[:, None] * cols + (grid * (width - l1 - l2) / w1)[:, None] - 0.5
    one_flipped = (flip1.bool() != flip2.bool()).reshape(-1, 1)
    x = torch.where(one_flipped, x_mirrored, x_same)
    return y, x, sh, sw


def relative_embedding(
    y: torch.Tensor, x: torch.Tensor, sh: torch.Tensor, sw: torch.Tensor, dim: int
) -> torch.Tensor:
    """(B, M, 2*dim): sin and cos of y, x, 10 ln sh, 10 ln sw, each at dim/4 frequencies.

    Channel layout [sin y, cos y, sin x, cos x, sin s_h, cos s_h, sin s_w, cos s_w], frequencies
    1 / 10000^(k / (dim/4)), k = 0..dim/4-1 (the official ``get_2d_sincos_pos_embed_relative``).
    """
    if dim % 4:
        raise ValueError(f"the relative embedding needs a dimension divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=y.dtype, device=y.device) / quarter)
    m = y.shape[1]
    parts = []
    for value in (
        y,
        x,
        (10 * torch.log(sh))[:, None].expand(-1, m),
        (10 * torch.log(sw))[:, None].expand(-1, m),
    ):
        angle = value[..., None] * omega
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=-1)


# -- BatchNorm over tokens ------------------------------------------------------------------


def _sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """Sum across processes, differentiable (the gradient is summed back): SyncBN's reduction."""
    if world_size() == 1:
        return value
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():  # deprecated in favour of a private module; still correct
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(value)


class TokenBatchNorm(nn.Module):
    """BatchNorm1d over every token of the batch (channels last), in fp32, synced across ranks.

    Statistics are those of all B x L tokens of all processes, as ``SyncBatchNorm`` computes
    them (but also on CPU/gloo, where torch's SyncBatchNorm refuses to run): a global mean,
    then the global mean of squared deviations. Parameter and buffer names are BatchNorm1d's.
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(dim, **kw))
        self.bias = nn.Parameter(torch.zeros(dim, **kw))
        self.register_buffer("running_mean", torch.zeros(dim, **kw))
        self.register_buffer("running_var", torch.ones(dim, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(tokens.device.type, enabled=False):
            return self._normalise(tokens)

    def _normalise(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.float() if tokens.dtype in (torch.float16, torch.bfloat16) else tokens
        flat = x.reshape(-1, x.shape[-1])
        if self.training:
            count = _sum_over_ranks(flat.new_tensor(float(flat.shape[0])))
            mean = _sum_over_ranks(flat.sum(0)) / count
            var = _sum_over_ranks(((flat - mean) ** 2).sum(0)) / count
            with torch.no_grad():
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
                self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
        scale = self.weight.to(x.dtype) * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias.to(x.dtype)


def make_blocks(dim: int, num_heads: int, depth: int, mlp_ratio: float, norm: str) -> nn.ModuleList:
    """timm pre-norm blocks normalised with BatchNorm over tokens ("batch") or LayerNorm."""
    norm_layer = TokenBatchNorm if norm == "batch" else _layer_norm
    return nn.ModuleList(
        Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)
    )


def _layer_norm(dim: int, device: Any = None, dtype: Any = None) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, device=device, dtype=dtype)


# -- loss and momentum ------------------------------------------------------------------------


def momentum_at(step: int, total_steps: int, base: float = 0.995) -> float:
    """EMA momentum after ``step`` of ``total_steps``: ``base`` at 0, rising to 1 by a cosine."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (1.0 + math.cos(math.pi * progress)) / 2.0


# -- the method --------------------------------------------------------------------------------


class SiameseIM(Method):
    """Siamese image modeling with a masked online view 1 and an EMA target on view 2.

    ``batch``: "images" (B, 2, 3, H, W), "mask" (B, N) bool (True = hidden patch of view 1,
    the same count in every sample), "box" (B, 2, 4), "flip" (B, 2), "image_width" (B, 1).

    >>> import siamae
    >>> model = siamae.create_method("siameseim", "vit_tiny_patch16_224", img_size=32, patch_size=8)
    >>> list(siamae.batch_spec("siameseim", img_size=32, patch_size=8))
    ['images', 'mask_noise', 'box', 'flip', 'image_width', 'mask']
    >>> model.after_step(1, 100)  # the EMA target update a user's loop calls after each step
    """

    name = "siameseim"
    num_views = 2
    view_kind = "pair"
    config_sections = {"siameseim": SiameseIMConfig}

    def __init__(
        self,
        encoder: Encoder,
        dim: int | None = None,
        num_heads: int = 16,
        projector_depth: int = 2,
        predictor_depth: int = 4,
        mlp_ratio: float = 4.0,
        norm: str = "batch",
        neg_weight: float = 0.02,
        base_momentum: float = 0.995,
    ) -> None:
        super().__init__()
        dim = dim or encoder.embed_dim
        self.encoder = encoder
        self.dim = dim
        self.neg_weight = neg_weight
        self.base_momentum = base_momentum
        # MoCo v3's trick: the patch embedding stays at its random init. The encoder has no
        # final norm (features go straight to the Linear): built with final_norm=False it is
        # an identity and the fc_norm after pooling stays a fresh LayerNorm (frozen at (1, 0)),
        # what SiameseIM's evaluations put there. An encoder with a final norm keeps it frozen.
        for param in (
            *encoder.vit.patch_embed.parameters(),
            *encoder.vit.norm.parameters(),
            *encoder.vit.fc_norm.parameters(),
        ):
            param.requires_grad_(False)
        self.embed = nn.Linear(encoder.embed_dim, dim)
        self.projector = make_blocks(dim, num_heads, projector_depth, mlp_ratio, norm)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.relative_pos = nn.Linear(2 * dim, dim)
        # SiameseIM's channel order (row first), as its encoder's table and the relative
        # embedding of view 2's patches.
        self.register_buffer(
            "decoder_pos_embed",
            sincos_2d(dim, encoder.grid_size, encoder.grid_size, order=POS_ORDER)[None],
        )
        self.predictor = make_blocks(dim, num_heads, predictor_depth, mlp_ratio, norm)
        self.head = nn.Linear(dim, dim)
        self._initialize_weights()
        # The target starts as an exact copy and only ever moves by the EMA.
        self.target_encoder = copy.deepcopy(encoder)
        self.target_embed = copy.deepcopy(self.embed)
        self.target_projector = copy.deepcopy(self.projector)
        for param in self.target_parameters():
            param.requires_grad_(False)
        # The picture's prediction-error column is coloured on the scale of its last picture.
        self.picture_scales: dict[str, ColourScale] = {}

    def _initialize_weights(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.embed, self.projector, self.relative_pos, self.predictor, self.head):
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)

    # -- config --------------------------------------------------------------------------------
    @classmethod
    def published_defaults(cls, cfg: Config) -> dict[str, Any]:
        # The projector/predictor: as wide as the encoder (768 for ViT-B), 16 heads, 4
        # predictor blocks; crops of area (0.08, 1).
        width = VIT_SIZES[cfg.model.arch].embed_dim
        return {
            "siameseim": {
                "mask_ratio": MASK_RATIO,
                "dim": width,
                "predictor_depth": 4,
                "num_heads": 16,
                "mlp_dim": 4 * width,
            },
            "global_scale": (0.08, 1.0),
            "interpolation": "bicubic",
        }

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        s = cfg.section(SiameseIMConfig)
        if cfg.data.crop_sampler != "torchvision":
            raise option_error(
                "data.crop_sampler",
                "siameseim samples crops as torchvision does; set 'torchvision'",
            )
        if cfg.data.source in ("videos", "frames"):
            raise option_error(
                "data.source", "siameseim learns from images; use 'images' or 'synthetic'"
            )
        if cfg.data.repeated_sampling != 1:
            raise option_error(
                "data.repeated_sampling", "siameseim makes one pair per image; set 1"
            )
        for name in ("dim", "num_heads", "mlp_dim", "predictor_depth"):
            value = getattr(s, name)
            check(value > 0, f"siameseim.{name}", f"expected a positive integer, got {value}")
        check(
            s.dim % s.num_heads == 0 and s.dim % 4 == 0,
            "siameseim.dim",
            f"expected a multiple of 4 (2-D sin-cos positions) divisible by "
            f"siameseim.num_heads={s.num_heads}, got {s.dim}",
        )
        check_mask_ratio_range(s.mask_ratio, "siameseim.mask_ratio")
        grid = cfg.model.img_size // cfg.model.patch_size
        masked = num_masked(grid * grid, s.mask_ratio)
        if not 0 < masked < grid * grid:
            raise option_error(
                "siameseim.mask_ratio",
                f"{s.mask_ratio} of {grid * grid} patches masks "
                f"{masked}; it must leave at least one patch hidden and one visible",
            )
        if s.projector_depth < 0:
            raise option_error(
                "siameseim.projector_depth", f"expected 0 or more, got {s.projector_depth}"
            )
        if not 0.0 <= s.momentum < 1.0:
            raise option_error("siameseim.momentum", f"expected 0 <= m < 1, got {s.momentum}")
        if s.neg_weight < 0:
            raise option_error("siameseim.neg_weight", f"expected 0 or more, got {s.neg_weight}")
        if s.mask_min_block is not None and s.mask_min_block < 1:
            raise option_error(
                "siameseim.mask_min_block", f"expected 1 or more, got {s.mask_min_block}"
            )

    @classmethod
    def from_config(cls, cfg: Config) -> SiameseIM:
        m = cfg.model
        # SiameseIM's ViT: no final norm, position table in its own channel order.
        encoder = Encoder(
            m.arch, m.patch_size, m.img_size, m.drop_path, final_norm=False, pos_order=POS_ORDER
        )
        s = cfg.section(SiameseIMConfig)
        method = cls(
            encoder,
            dim=s.dim,
            num_heads=s.num_heads,
            projector_depth=s.projector_depth,
            predictor_depth=s.predictor_depth,
            mlp_ratio=s.mlp_dim / s.dim,
            norm=s.norm,
            neg_weight=s.neg_weight,
            base_momentum=s.momentum,
        )
        return method

    @classmethod
    def build_views(cls, cfg: Config) -> SiameseIMViews:
        grid = cfg.model.img_size // cfg.model.patch_size
        s = cfg.section(SiameseIMConfig)
        return SiameseIMViews(
            out=cfg.model.img_size,
            patch_size=cfg.model.patch_size,
            scale=cfg.data.global_scale,
            ratio=cfg.data.ratio,
            hflip=cfg.data.hflip,
            num_masked=num_masked(grid * grid, s.mask_ratio),
            min_block=min_block(grid * grid, s.mask_min_block),
            photometric=s.photometric,
            interpolation=cfg.data.interpolation or "bicubic",
        )

    # -- the two branches ----------------------------------------------------------------------
    def target_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.startswith("target_")]

    def ddp_ignored_names(self) -> list[str]:
        names = [n for n, _ in self.named_parameters() if n.startswith("target_")]
        return names + [n for n, _ in self.named_buffers() if n.startswith("target_")]

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA of the online weights into the target with the momentum for ``step``."""
        self.update_target(momentum_at(step, total_steps, self.base_momentum))

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        pairs = [
            (self.encoder.vit.patch_embed, self.target_encoder.vit.patch_embed),
            (self.encoder.vit.blocks, self.target_encoder.vit.blocks),
            (self.embed, self.target_embed),
            (self.projector, self.target_projector),
        ]
        online = [self.encoder.vit.cls_token] + [p for a, _ in pairs for p in a.parameters()]
        target = [self.target_encoder.vit.cls_token] + [p for _, b in pairs for p in b.parameters()]
        torch._foreach_mul_(target, momentum)
        torch._foreach_add_(target, online, alpha=1.0 - momentum)

    def _visible_ids(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, N) bool mask -> (B, K) indices of the visible patches in raster order."""
        visible = (~mask).sum(1)
        if not bool((visible == visible[0]).all()):
            raise ValueError("every sample must hide the same number of patches")
        order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
        return order[:, : int(visible[0])]

    def predict(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The online prediction of view 2's features: (B, N, dim), and view 1's visible ids."""
        view1 = batch["images"][:, 0]
        b = view1.shape[0]
        ids_keep = self._visible_ids(batch["mask"].bool())
        tokens, cls, _ = self.encoder.embed(view1)
        x = torch.cat([cls, gather_tokens(tokens, ids_keep)], dim=1)
        for block in self.encoder.vit.blocks:  # no final norm
            x = block(x)
        x = self.embed(x)
        for block in self.projector:
            x = block(x)

        pos = self.decoder_pos_embed.to(x.dtype)
        visible_pos = gather_tokens(pos[:, 1:].expand(b, -1, -1), ids_keep)
        boxes, flips = batch["box"], batch["flip"]
        geometry = relative_positions(
            boxes[:, 0],
            boxes[:, 1],
            flips[:, 0],
            flips[:, 1],
            batch["image_width"],
            self.encoder.grid_size,
        )
        rel = relative_embedding(*geometry, self.dim).to(self.relative_pos.weight.dtype)
        queries = self.mask_token + self.relative_pos(rel)
        x = torch.cat([x[:, :1] + pos[:, :1], x[:, 1:] + visible_pos, queries], dim=1)
        for block in self.predictor:
            x = block(x)
        pred = self.head(x[:, -queries.shape[1] :])
        return pred, ids_keep

    @torch.no_grad()
    def target_features(self, view2: torch.Tensor) -> torch.Tensor:
        """(B, N, dim): the target branch on the whole view 2, LayerNorm-ed without affine."""
        tokens, cls, _ = self.target_encoder.embed(view2)
        # The target's CLS: its own EMA token plus the fixed (zero) CLS position.
        x = torch.cat([cls, tokens], dim=1)
        for block in self.target_encoder.vit.blocks:
            x = block(x)
        x = self.target_embed(x)
        for block in self.target_projector:
            x = block(x)
        x = x[:, 1:].float()
        return F.layer_norm(x, x.shape[-1:], eps=TARGET_LN_EPS)

    def forward(self, batch: Batch) -> MethodOutput:
        pred, _ = self.predict(batch)
        target = self.target_features(batch["images"][:, 1])
        with torch.autocast(pred.device.type, enabled=False):
            loss, pull, push = unigrad_loss(pred.float(), target, self.neg_weight)
        return MethodOutput(loss, {"pull": pull.detach(), "push": push.detach()})

    # -- pictures ------------------------------------------------------------------------------
    @torch.no_grad()
    def picture(self, batch: Batch) -> list[tuple[str, torch.Tensor]]:
        """View 1 with view 2's box drawn, view 1's visible patches, view 2, prediction error."""
        images = batch["images"].float()
        view1, view2 = denormalize(images[:, 0]), denormalize(images[:, 1])
        size, grid = view1.shape[-1], self.encoder.grid_size
        pred, _ = self.predict(batch)
        target = self.target_features(batch["images"][:, 1])
        error = ((pred.float() - target) ** 2).sum(-1)  # (B, N) per view-2 patch
        # One scale for every sample, from 0 (low, blue) to the largest error (high, red).
        scale = ColourScale(
            "squared error per patch\n(feature units², all channels)",
            0.0,
            float(error.max()),
        )
        self.picture_scales = {"prediction error": scale}
        heat = scale.colour(_patch_map(error, grid, size))
        hidden = _patch_map(batch["mask"].float(), grid, size)
        boxed = _draw_boxes(view1, _box_in_view1(batch, size))
        return [
            ("view 1 + view 2's box", boxed),
            ("visible patches", view1 * (1 - hidden) + 0.5 * hidden),
            ("view 2", view2),
            ("prediction error", heat),
        ]


def num_masked(num_patches: int, mask_ratio: float) -> int:
    """Patches hidden in view 1: 118 of 196 at the recipe's ratio."""
    return int(round(num_patches * mask_ratio))


def min_block(num_patches: int, configured: int | None) -> int:
    """Smallest block of the mask: 16 patches of 196 (BEiT), scaled with the grid when unset."""
    if configured is not None:
        return configured
    return max(1, int(round(16 * num_patches / 196)))


def _patch_map(values: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """(B, g*g) per-patch values -> (B, 1, size, size), each patch a flat square."""
    square = values.float().reshape(-1, 1, grid, grid)
    return F.interpolate(square, size=(size, size), mode="nearest")


def _box_in_view1(batch: Batch, size: int) -> torch.Tensor:
    """(B, 4) view 2's extent (y0, x0, y1, x1) in view-1 pixels (mirrored when one is flipped)."""
    box = batch["box"].double()
    t1, l1, h1, w1 = box[:, 0].unbind(-1)
    t2, l2, h2, w2 = box[:, 1].unbind(-1)
    width = batch["image_width"].double().reshape(-1)
    one_flipped = batch["flip"][:, 0].bool() != batch["flip"][:, 1].bool()
    left = torch.where(one_flipped, width - l1 - l2 - w2, l2 - l1)
    y0, x0 = (t2 - t1) / h1 * size, left / w1 * size
    return torch.stack([y0, x0, y0 + h2 / h1 * size, x0 + w2 / w1 * size], dim=1)


def _draw_boxes(images: torch.Tensor, boxes: torch.Tensor, width: int = 2) -> torch.Tensor:
    """Red rectangle outlines (clipped to the image) drawn into (B, 3, H, W) images in [0, 1]."""
    size = images.shape[-1]
    coords = torch.arange(size, dtype=torch.float64, device=images.device)
    y0, x0, y1, x1 = (v.view(-1, 1, 1).to(images.device) for v in boxes.unbind(-1))
    ys, xs = coords.view(1, -1, 1), coords.view(1, 1, -1)
    outer = (ys >= y0 - width) & (ys < y1 + width) & (xs >= x0 - width) & (xs < x1 + width)
    inner = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    outline = (outer & ~inner).unsqueeze(1)
    red = images.new_tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    return torch.where(outline, red, images)
