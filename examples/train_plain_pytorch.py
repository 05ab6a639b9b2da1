"""Pre-train a siamae method in a plain PyTorch loop, with siamae's public API only.

    python examples/train_plain_pytorch.py --data DIR --steps 100 --out runs/plain

--data: an image folder (``<class>/<image>``, as torchvision's ImageFolder reads it); for
``--method siammae`` a folder of videos as frame folders (``<video>/<frame>.jpg``). Writes
``<out>/encoder.safetensors``, which ``siamae eval davis --checkpoint`` (and ``siamae.load_encoder``)
reads. The learning rate is constant (``--lr``); ``siamae pretrain`` warms up and decays it.
"""

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, RandomSampler
from torchvision.datasets import ImageFolder

import siamae

METHODS = ["cropmae", "siammae", "mae", "siameseim", "mixedae"]


def videos(root: str) -> list[list[object]]:
    """SiamMAE's items: every folder of frames under ``root``, its frames in name order."""
    folders = sorted({p.parent for p in Path(root).rglob("*") if p.suffix in (".jpg", ".png")})
    return [[siamae.open_image(f) for f in sorted(d.glob("*.[jp][pn]g"))] for d in folders]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="cropmae")
    p.add_argument("--data", required=True, help="image folder (siammae: frame folders)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--out", default="runs/plain", help="folder for encoder.safetensors")
    p.add_argument("--encoder", default="vit_tiny_patch16_224", help="a timm ViT name")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1.5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    views = siamae.create_views(args.method, args.img_size, args.patch_size)
    items = videos(args.data) if args.method == "siammae" else ImageFolder(
        args.data, loader=siamae.open_image)  # fmt: skip
    # Item i's views are seeded by (seed, epoch, i) and read in the engine's order.
    dataset = siamae.ViewDataset(items, views, seed=args.seed)

    torch.manual_seed(args.seed)  # dropout and drop-path draws; the weights come from seed=
    model = siamae.create_method(args.method, args.encoder, img_size=args.img_size,
        patch_size=args.patch_size, seed=args.seed).to(args.device)  # fmt: skip
    optimizer = torch.optim.AdamW(model.param_groups(0.05), lr=args.lr, betas=(0.9, 0.95))

    model.train()
    step, epoch = 0, 0
    while step < args.steps:
        dataset.set_epoch(epoch)
        order = RandomSampler(dataset, generator=siamae.shuffle_generator(args.seed, epoch))
        # its own generator for the workers' seeds: torch's global one is left to dropout
        loader = DataLoader(dataset, args.batch_size, sampler=order, drop_last=True,
            num_workers=args.workers, collate_fn=siamae.collate,
            generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
        for batch in loader:
            out = model({k: v.to(args.device) for k, v in batch.items()})
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if hasattr(model, "after_step"):  # SiameseIM's EMA target
                model.after_step(step, args.steps)
            print(f"step {step}: loss {out.loss.item():.4f}", flush=True)
            if step == args.steps:
                break
        epoch += 1

    Path(args.out).mkdir(parents=True, exist_ok=True)
    save_file(model.encoder_state_dict(), str(Path(args.out) / "encoder.safetensors"))
    print(f"encoder written to {Path(args.out) / 'encoder.safetensors'}")


if __name__ == "__main__":
    main()
