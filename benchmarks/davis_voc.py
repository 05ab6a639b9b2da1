"""Write the DAVIS sequences as a Pascal-VOC-layout, 2-class segmentation set, split by sequence.

    python benchmarks/davis_voc.py --davis ../shared/data/DAVIS --out runs/davis_voc

Reads DAVIS in its official layout (``JPEGImages/480p/<seq>/%05d.jpg``,
``Annotations/480p/<seq>/%05d.png``; DAVIS-2016 grey masks 0/255 or DAVIS-2017 palette masks of
object ids) and writes ``VOC2012/JPEGImages/<seq>_<frame>.jpg``, palette PNGs in
``VOC2012/SegmentationClass/`` with 0 = background and 1 = object (every DAVIS object id > 0;
DAVIS-2016's 255 is the object, not VOC's void), ``ImageSets/Segmentation/{train,val}.txt``
and ``class_names.txt`` (background, object). Sequences, not frames, are split (``--val-every``:
every k-th sequence in sorted order is validation), so no validation frame has a near-copy in
training. ``--every`` keeps every k-th frame and ``--short-side`` resizes (images bilinear,
masks nearest) to keep a CPU experiment small.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from siamae.overlays import PALETTE


def convert(
    davis: Path, out: Path, every: int = 1, val_every: int = 3, short_side: int | None = None
) -> dict[str, list[str]]:
    images_root = davis / "JPEGImages" / "480p"
    masks_root = davis / "Annotations" / "480p"
    if not images_root.is_dir() or not masks_root.is_dir():
        raise SystemExit(f"{davis}: expected JPEGImages/480p and Annotations/480p (DAVIS layout)")
    sequences = sorted(p.name for p in images_root.iterdir() if p.is_dir())
    base = out / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for k, seq in enumerate(sequences):
        split = "val" if k % val_every == val_every - 1 else "train"
        frames = sorted((images_root / seq).glob("*.jpg"))[::every]
        for frame in frames:
            mask_path = masks_root / seq / f"{frame.stem}.png"
            if not mask_path.is_file():
                continue  # a frame without its annotation is left out, as DAVIS readers do
            image = Image.open(frame).convert("RGB")
            ids = np.asarray(Image.open(mask_path))
            if ids.ndim == 3:
                ids = ids[..., 0]
            label = Image.fromarray((ids > 0).astype(np.uint8), "P")
            label.putpalette(PALETTE.ravel().tolist())
            if short_side is not None:
                w, h = image.size
                factor = short_side / min(w, h)
                size = (max(1, round(w * factor)), max(1, round(h * factor)))
                image = image.resize(size, Image.Resampling.BILINEAR)
                label = label.resize(size, Image.Resampling.NEAREST)
            name = f"{seq}_{frame.stem}"
            image.save(base / "JPEGImages" / f"{name}.jpg", quality=95)
            label.save(base / "SegmentationClass" / f"{name}.png")
            splits[split].append(name)
    for split, names in splits.items():
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    (base / "class_names.txt").write_text("background\nobject\n")
    return splits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--davis", type=Path, default=Path("../shared/data/DAVIS"))
    p.add_argument("--out", type=Path, default=Path("runs/davis_voc"))
    p.add_argument("--every", type=int, default=1, help="keep every k-th frame")
    p.add_argument("--val-every", type=int, default=3, help="every k-th sequence is validation")
    p.add_argument("--short-side", type=int, default=None, help="resize to this short side")
    args = p.parse_args()
    splits = convert(args.davis, args.out, args.every, args.val_every, args.short_side)
    for split, names in splits.items():
        seqs = sorted({n.rsplit("_", 1)[0] for n in names})
        print(f"{split}: {len(names)} frames of {len(seqs)} sequences ({', '.join(seqs)})")
    print(f"wrote {args.out / 'VOC2012'}")


if __name__ == "__main__":
    main()
