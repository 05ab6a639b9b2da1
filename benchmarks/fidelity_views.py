"""What the crop samplers draw, against torchvision's own RandomResizedCrop sampling.

Prints, for CropMAE's global crop (area 0.1-1, aspect 3/4-4/3) on an ImageNet-sized 500x375
image: mean area, the share of crops that span the full height, and two-sample KS p-values of
area, aspect and centre against ``torchvision.transforms.RandomResizedCrop.get_params``. Then
the recipe's resampling filter per method.

    python benchmarks/fidelity_views.py [--draws 20000]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop

from siamae.data.dataset import build_view_maker
from siamae.data.views import sample_box
from siamae.recipes import load_config

WIDTH, HEIGHT = 500, 375
SCALE, RATIO = (0.1, 1.0), (3 / 4, 4 / 3)


def stats(boxes: np.ndarray) -> dict[str, np.ndarray]:
    top, left, h, w = boxes.T
    return {
        "area": h * w / (WIDTH * HEIGHT),
        "aspect": w / h,
        "centre_x": (left + w / 2) / WIDTH,
        "centre_y": (top + h / 2) / HEIGHT,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20000)
    args = parser.parse_args()
    torch.manual_seed(0)
    image = torch.empty(3, HEIGHT, WIDTH)
    reference = np.array(
        [RandomResizedCrop.get_params(image, list(SCALE), list(RATIO)) for _ in range(args.draws)],
        dtype=float,
    )
    rng = np.random.default_rng(0)
    samplers = {
        "torchvision RandomResizedCrop": reference,
        "siamae torchvision (default)": np.array(
            [sample_box(rng, WIDTH, HEIGHT, SCALE, RATIO) for _ in range(args.draws)]
        ),
        "siamae clamp (option)": np.array(
            [sample_box(rng, WIDTH, HEIGHT, SCALE, RATIO, "clamp") for _ in range(args.draws)]
        ),
    }
    ref = stats(reference)
    print(f"global crop, {WIDTH}x{HEIGHT} image, scale {SCALE}, {args.draws} draws each")
    print("| sampler | mean area | full height | KS p area | KS p aspect | KS p centre x/y |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, boxes in samplers.items():
        s = stats(boxes)
        p = {k: ks_2samp(ref[k], s[k]).pvalue for k in ref}
        print(
            f"| {name} | {s['area'].mean():.3f} | {np.mean(boxes[:, 2] == HEIGHT):.1%} | "
            f"{p['area']:.3g} | {p['aspect']:.3g} | {p['centre_x']:.3g} / {p['centre_y']:.3g} |"
        )
    print()
    print("| method | crop sampler | filter |")
    print("| --- | --- | --- |")
    for method, kind in (("cropmae", "pair"), ("siammae", "frames"), ("mae", "single")):
        maker = build_view_maker(
            load_config(None, ["data.source=synthetic", f"method={method}"]), kind
        )
        print(f"| {method} | {maker.sampler} | {maker.interpolation} |")


if __name__ == "__main__":
    main()
