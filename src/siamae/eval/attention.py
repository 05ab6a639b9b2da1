"""Attention maps: where the CLS token looks in the last block, per head (the DINO picture).

For an image of any size (each side cut to a multiple of the patch size; the position grid is
interpolated), the last block's attention is recomputed from its own weights (the fused kernel
never materialises it): softmax(q k^T / sqrt(d)) of the CLS query over the patch keys, per head.
The CLS token's attention to itself is left out and the rest rescaled, so each head's map is a
distribution over the patches (it sums to 1).

The thresholded mask of a map keeps the fewest patches that together hold at least ``keep``
(e.g. 60 %) of its attention mass, the most attended first (DINO's ``threshold``).

From Python::

    from siamae.eval.attention import attention_for_image, save_attention_figure
    result = attention_for_image(encoder, "cat.jpg")          # AttentionResult
    save_attention_figure(result, "cat_attention.png", keep=0.6)

From the command line: ``siamae visualize attention --checkpoint CKPT --images a.jpg b.jpg``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from siamae.arguments import resolve_device
from siamae.data.image_folder import normalize
from siamae.data.sources import DECODE_ERRORS, bomb_pixels, to_rgb
from siamae.errors import DataError, SiamaeError
from siamae.loading import load_encoder
from siamae.models.vit import Encoder
from siamae.sizes import MAX_PATCHES  # shared with the config checks

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class AttentionResult:
    """One image's attention: ``maps`` (heads, gh, gw), each summing to 1; ``image`` the uint8
    (H, W, 3) pixels the encoder saw (H = gh * patch, W = gw * patch)."""

    maps: torch.Tensor
    image: np.ndarray
    patch_size: int
    name: str = "image"

    @property
    def num_heads(self) -> int:
        return self.maps.shape[0]


@torch.no_grad()
def cls_attention(encoder: Encoder, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised images -> (B, heads, H/p, W/p): the last block's CLS attention
    over the patches, each head's map rescaled to sum to 1 (its CLS-to-CLS weight left out)."""
    tokens, cls, (gh, gw) = encoder.embed(images)
    x = torch.cat([cls, tokens], dim=1)
    blocks = list(encoder.vit.blocks)
    for block in blocks[:-1]:
        x = block(x)
    attn = blocks[-1].attn
    y = blocks[-1].norm1(x)
    b, n, _ = y.shape
    qkv = attn.qkv(y).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, h, 1, N)
    to_patches = weights[:, :, 0, 1:].float()
    to_patches = to_patches / to_patches.sum(dim=-1, keepdim=True)
    return to_patches.reshape(b, attn.num_heads, gh, gw)


def mass_mask(maps: torch.Tensor, keep: float = 0.6) -> torch.Tensor:
    """Boolean masks (same shape as ``maps``, any leading dims, last two the grid): per map, the
    fewest patches whose attention sums to at least ``keep`` of the map's total."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if keep >= 1.0:  # every patch (sums of floats need not reach 1 exactly)
        return torch.ones_like(maps, dtype=torch.bool)
    flat = maps.flatten(-2)
    flat = flat / flat.sum(dim=-1, keepdim=True)
    values, order = flat.sort(dim=-1, descending=True)
    before = values.cumsum(dim=-1) - values  # mass of the patches ranked above each one
    kept_sorted = before < keep - 1e-6  # a patch is needed while the mass before it falls short
    mask = torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)
    return mask.reshape(maps.shape)


def prepare_image(image: object, patch_size: int, resize: int | None = None) -> np.ndarray:
    """A PIL image -> uint8 (H, W, 3) with H and W multiples of ``patch_size``: the short side
    resized to ``resize`` first (bicubic) if given, then centre-cropped to whole patches."""
    from PIL import Image

    assert isinstance(image, Image.Image)
    image = to_rgb(image)
    if resize is not None:
        w, h = image.size
        scale = resize / min(w, h)
        image = image.resize(
            (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC
        )
    w, h = image.size
    cw, ch = w - w % patch_size, h - h % patch_size
    if cw == 0 or ch == 0:
        raise DataError(
            f"an image of {w}x{h} pixels is smaller than one {patch_size}-pixel patch; use "
            "--resize with a larger size"
        )
    left, top = (w - cw) // 2, (h - ch) // 2
    return np.asarray(image.crop((left, top, left + cw, top + ch)), dtype=np.uint8).copy()


def patches_after_resize(size: tuple[int, int], patch_size: int, resize: int | None) -> int:
    """How many patches ``prepare_image`` makes of an image of ``size`` (width, height)."""
    w, h = size
    if resize is not None:
        scale = resize / min(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
    return (w // patch_size) * (h // patch_size)


def check_patch_budget(
    size: tuple[int, int], patch_size: int, resize: int | None, name: str, budget: int
) -> None:
    """Refuse, before decoding, an image that would make more than ``budget`` patches."""
    count = patches_after_resize(size, patch_size, resize)
    if count > budget:
        side = int(math.sqrt(budget)) * patch_size  # a square at the budget
        raise DataError(
            f"image {name!r} is {size[0]}x{size[1]} pixels"
            + (f" (--resize {resize})" if resize is not None else "")
            + f": {count:,} patches of {patch_size} pixels, above the budget of {budget:,} "
            f"(attention grows with the square of the count); pass --resize with a short side "
            f"of at most {side} pixels, e.g. --resize 480"
        )


def attention_for_image(
    encoder: Encoder,
    image: str | Path | object,
    resize: int | None = None,
    device: torch.device | str = "cpu",
    max_patches: int = MAX_PATCHES,
) -> AttentionResult:
    """The last block's per-head CLS attention over ``image`` (a path or a PIL image). An image
    that would make more than ``max_patches`` patches is refused before it is decoded."""
    from PIL import Image, UnidentifiedImageError

    name = "image"
    if isinstance(image, (str, Path)):
        name = Path(image).stem
        try:
            with Image.open(image) as opened:
                # the header holds the size: a huge image is refused without decoding it
                check_patch_budget(opened.size, encoder.patch_size, resize, str(image), max_patches)
                opened.load()
                image = opened.copy()
        except FileNotFoundError:
            raise DataError(
                f"image {str(image)!r} does not exist; pass existing image files"
            ) from None
        except Image.DecompressionBombError as err:
            # PIL refuses it as it reads the header, before --resize could shrink it.
            raise DataError(
                f"image {str(image)!r} is {bomb_pixels(err)} pixels, over PIL's decompression-"
                f"bomb limit of {2 * Image.MAX_IMAGE_PIXELS:,} (not decoded, even with --resize); "
                "save a smaller copy (e.g. a short side of 480 pixels) and pass that"
            ) from None
        except (UnidentifiedImageError, *DECODE_ERRORS) as err:
            raise DataError(f"image {str(image)!r} could not be read ({err})") from None
    else:
        check_patch_budget(image.size, encoder.patch_size, resize, name, max_patches)  # type: ignore[attr-defined]
    pixels = prepare_image(image, encoder.patch_size, resize)
    was_training = encoder.training
    encoder.eval().to(device)
    try:
        batch = torch.from_numpy(pixels).permute(2, 0, 1)[None]
        maps = cls_attention(encoder, normalize(batch, device))[0].cpu()
    finally:
        encoder.train(was_training)
    return AttentionResult(maps, pixels, encoder.patch_size, name)


# -- the picture --------------------------------------------------------------------------------


def _upsample(grid: torch.Tensor, patch_size: int) -> np.ndarray:
    """(gh, gw) -> (gh * p, gw * p), each patch a constant block (as DINO shows it)."""
    return F.interpolate(grid[None, None].float(), scale_factor=patch_size, mode="nearest")[
        0, 0
    ].numpy()


def _smooth_mask(mask: torch.Tensor, patch_size: int) -> np.ndarray:
    """(gh, gw) boolean -> (gh * p, gw * p) float, bilinearly upsampled from the patch centres:
    its 0.5 level is one smooth closed curve around each region of kept patches."""
    return F.interpolate(
        mask[None, None].float(), scale_factor=patch_size, mode="bilinear", align_corners=False
    )[0, 0].numpy()


def _draw_map(
    ax: object, image: np.ndarray, heat: np.ndarray, mask: np.ndarray | None, norm: object
) -> object:
    """The image, the colour-mapped heat map over it (``norm``: the figure's one colour scale)
    and the mask's outline as white contours. Returns the heat map's image (for a colour bar)."""
    ax.imshow(image, interpolation="nearest")  # type: ignore[attr-defined]
    shown = ax.imshow(heat, cmap="inferno", norm=norm, alpha=0.6, interpolation="nearest")  # type: ignore[attr-defined]
    if mask is not None and mask.min() < 0.5 < mask.max():  # a level to draw: some kept, some not
        ax.contour(mask, levels=[0.5], colors="white", linewidths=1.2)  # type: ignore[attr-defined]
    return shown


def save_attention_figure(
    result: AttentionResult, path: str | Path, keep: float = 0.6, title: str | None = None
) -> Path:
    """:func:`attention_figure` as a PNG at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    attention_figure(result, keep, title).savefig(path, dpi=100)
    return path


def attention_figure(
    result: AttentionResult, keep: float = 0.6, title: str | None = None
) -> Figure:
    """The labelled picture: the image, the mean attention over heads with its ``keep`` mask, the
    mask itself over the image, then each head's map with its own mask outlined (one smooth
    contour per region). Every map shares one colour scale, drawn as a colour bar in percent of
    the CLS token's attention per patch."""
    import textwrap

    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    p = result.patch_size
    image = result.image
    percent = result.maps * 100.0  # each map sums to 100 %
    # One scale for all maps; the square root keeps a diffuse head visible beside a peaked one.
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=float(percent.max()))
    panels = _panels(result, keep)
    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    aspect = image.shape[0] / image.shape[1]
    fig = Figure(
        figsize=(3.2 * cols + 1.0, (3.2 * aspect + 0.45) * rows + 0.6), layout="constrained"
    )
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    shown = None
    for ax, (label, heat, mask) in zip(axes.flat, panels):
        outline = _smooth_mask(mask, p) if mask is not None else None
        if heat is not None:
            shown = _draw_map(ax, image, heat, outline, norm)
        elif mask is not None:  # the mask itself: kept patches bright, the rest dimmed
            dim = 0.25 + 0.75 * _upsample(mask, p)[..., None]
            ax.imshow(image.astype(np.float64) / 255.0 * dim, interpolation="nearest")
            if outline.min() < 0.5 < outline.max():
                ax.contour(outline, levels=[0.5], colors="white", linewidths=1.2)
        else:
            ax.imshow(image, interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(label, 34)), fontsize=8)
    if shown is not None:
        bar = fig.colorbar(shown, ax=axes, location="right", shrink=0.8, pad=0.01)
        bar.set_label("attention per patch (% of the CLS token's attention)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
        bar.solids.set_alpha(1.0)  # the scale itself, not its blend with the image
    heading = title or (
        f"{result.name}: CLS attention of the last block (outline: {keep:.0%} of the mass)"
    )
    fig.suptitle("\n".join(textwrap.wrap(heading, 110)), fontsize=10)
    return fig


def _panels(
    result: AttentionResult, keep: float
) -> list[tuple[str, np.ndarray | None, torch.Tensor | None]]:
    """The figure's panels, each (title, heat map in percent or None, mask or None): the image,
    the mean over heads, its mask, then every head."""
    p = result.patch_size
    heads = result.num_heads
    masks = mass_mask(result.maps, keep)
    mean = result.maps.mean(dim=0)
    mean_mask = mass_mask(mean, keep)
    image = result.image
    percent = result.maps * 100.0
    panels: list[tuple[str, np.ndarray | None, torch.Tensor | None]] = [
        (f"image ({image.shape[1]}x{image.shape[0]})", None, None),
        (f"mean of {heads} heads", _upsample(mean * 100.0, p), mean_mask),
        (
            f"mask: {keep:.0%} of the mass ({int(mean_mask.sum())}/{mean_mask.numel()} patches)",
            None,
            mean_mask,
        ),
    ]
    for h in range(heads):
        panels.append(
            (
                f"head {h} ({int(masks[h].sum())} patches hold {keep:.0%})",
                _upsample(percent[h], p),
                masks[h],
            )
        )
    return panels


def visualize_attention(
    checkpoint: str | Path,
    images: list[str | Path],
    out_dir: str | Path,
    keep: float = 0.6,
    resize: int | None = None,
    device: torch.device | str = "cpu",
) -> list[Path]:
    """``<out_dir>/<image stem>_attention.png`` for each image, for the encoder of
    ``checkpoint`` (anything ``load_encoder`` reads)."""

    if not 0.0 < keep <= 1.0:
        raise DataError(f"--keep must be in (0, 1], got {keep}")
    encoder = load_encoder(checkpoint)
    source = Path(str(checkpoint)).name
    written = []
    seen: dict[str, int] = {}
    for image in images:
        result = attention_for_image(encoder, image, resize, device)
        stem = result.name
        seen[stem] = seen.get(stem, 0) + 1
        if seen[stem] > 1:  # two images with one name: keep both pictures
            stem = f"{stem}_{seen[stem]}"
        written.append(
            save_attention_figure(
                result,
                Path(out_dir) / f"{stem}_attention.png",
                keep,
                title=f"{Path(str(image)).name} - {source}: last-block CLS attention "
                f"(outline: {keep:.0%} of the mass)",
            )
        )
    return written


def run_command(args: object) -> int:
    """``siamae visualize attention``: parsed arguments -> one PNG per image."""

    images = getattr(args, "images", None)
    if not images:
        raise SiamaeError("siamae visualize attention needs --images IMAGE [IMAGE ...]")
    written = visualize_attention(
        args.checkpoint,  # type: ignore[attr-defined]
        images,
        getattr(args, "out", None) or "attention_maps",
        keep=args.keep,  # type: ignore[attr-defined]
        resize=args.resize,  # type: ignore[attr-defined]
        device=resolve_device(args.device),  # type: ignore[attr-defined]
    )
    for path in written:
        print(f"wrote {path}")
    return 0
