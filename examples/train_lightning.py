"""Pre-train a siamae method as a Lightning ``LightningModule``, with siamae's public API only.

    pip install -e ".[lightning]"
    python examples/train_lightning.py --data DIR --steps 100 --out runs/lightning

The same data, model and optimizer as ``train_plain_pytorch.py`` (its options too); Lightning
runs the loop. Writes ``<out>/encoder.safetensors``, which ``siamae eval davis --checkpoint``
reads.
"""

import argparse
from pathlib import Path
from typing import Any

import lightning as L
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, RandomSampler
from torchvision.datasets import ImageFolder

import siamae

METHODS = ["cropmae", "siammae", "mae", "siameseim", "mixedae"]


class Pretraining(L.LightningModule):
    """A siamae method: ``training_step`` is its forward, ``on_train_batch_end`` its after-step
    hook (SiameseIM's EMA target), the optimizer the recipe's AdamW groups."""

    def __init__(self, method: siamae.Method, lr: float, total_steps: int) -> None:
        super().__init__()
        self.method, self.lr, self.total_steps = method, lr, total_steps

    def training_step(self, batch: dict[str, torch.Tensor], index: int) -> torch.Tensor:
        out = self.method(batch)
        self.log("loss", out.loss, prog_bar=True)
        self.log_dict(out.logs)
        return out.loss

    def on_train_batch_end(self, *args: Any) -> None:
        if hasattr(self.method, "after_step"):
            self.method.after_step(self.global_step, self.total_steps)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = self.method.param_groups(0.05)
        return torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.95))


def videos(root: str) -> list[list[object]]:
    """SiamMAE's items: every folder of frames under ``root``, its frames in name order."""
    folders = sorted({p.parent for p in Path(root).rglob("*") if p.suffix in (".jpg", ".png")})
    return [[siamae.open_image(f) for f in sorted(d.glob("*.[jp][pn]g"))] for d in folders]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="cropmae")
    p.add_argument("--data", required=True, help="image folder (siammae: frame folders)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--out", default="runs/lightning", help="folder for encoder.safetensors")
    p.add_argument("--encoder", default="vit_tiny_patch16_224", help="a timm ViT name")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1.5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args()

    views = siamae.create_views(args.method, args.img_size, args.patch_size)
    items = videos(args.data) if args.method == "siammae" else ImageFolder(
        args.data, loader=siamae.open_image)  # fmt: skip
    dataset = siamae.ViewDataset(items, views, seed=args.seed)
    order = RandomSampler(dataset, generator=siamae.shuffle_generator(args.seed))
    loader = DataLoader(dataset, args.batch_size, sampler=order, drop_last=True,
        num_workers=args.workers, collate_fn=siamae.collate)  # fmt: skip

    torch.manual_seed(args.seed)
    method = siamae.create_method(args.method, args.encoder, img_size=args.img_size,
        patch_size=args.patch_size, seed=args.seed)  # fmt: skip
    trainer = L.Trainer(max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, default_root_dir=args.out)  # fmt: skip
    trainer.fit(Pretraining(method, args.lr, args.steps), loader)

    Path(args.out).mkdir(parents=True, exist_ok=True)
    save_file(method.encoder_state_dict(), str(Path(args.out) / "encoder.safetensors"))
    print(
        f"{trainer.global_step} steps; encoder written to {Path(args.out) / 'encoder.safetensors'}"
    )


if __name__ == "__main__":
    main()
