"""Weights & Biases, optional (``pip install -e ".[wandb]"``), beside the CSV and JSONL files.

With ``run.wandb=true`` the main process logs every scalar the CSV holds (under the same names,
against the training step), the resolved config, and the pictures the run writes into its
folder. The W&B run's id is kept in the run folder, so a resumed run (a requeued Slurm job, a
second ``siamae pretrain``) goes on logging into the same W&B run. The files W&B writes go under
``<run folder>/wandb/``; in offline mode that is all it does (``wandb sync`` uploads them later).
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from siamae.options import option_error

if TYPE_CHECKING:
    from siamae.config import Config

INSTALL_HINT = 'pip install -e ".[wandb]"'
RUN_ID_FILE = "wandb_run_id.txt"
PICTURES_KEY = "pictures"


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise option_error(
            "run.wandb",
            f"true needs the wandb package, which is not installed: {INSTALL_HINT} (or pip "
            "install wandb), or set run.wandb=false",
        ) from None
    return wandb


def check_tracking(cfg: Config) -> None:
    """Fail before any work when the config asks for W&B and it is not installed."""
    if cfg.run.wandb:
        _import_wandb()


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class WandbRun:
    """One W&B run per run folder: ``log`` takes the records MetricsLogger writes to the CSV."""

    def __init__(self, cfg: Config, run_dir: Path, resume_step: int = 0) -> None:
        wandb = _import_wandb()
        self.wandb = wandb
        self.run_dir = run_dir
        id_file = run_dir / RUN_ID_FILE
        resumed = resume_step > 0 and id_file.is_file()
        # W&B's own id alphabet: lowercase letters and digits.
        run_id = id_file.read_text().strip() if resumed else secrets.token_hex(4)
        r = cfg.run
        try:
            self.run = wandb.init(
                project=r.wandb_project,
                entity=r.wandb_entity,
                name=r.wandb_name or run_dir.resolve().name,
                mode=r.wandb_mode,
                dir=str(run_dir),
                config=cfg.to_dict(),
                id=run_id,
                resume="allow",
                # The console stays where it is (the terminal, the Slurm log): W&B does not
                # wrap stdout/stderr.
                settings=wandb.Settings(console="off"),
            )
        except wandb.errors.Error as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise option_error(
                "run.wandb",
                f"W&B did not start ({first}); log in (wandb login, or WANDB_API_KEY), or set "
                "run.wandb_mode=offline to log without a network",
            ) from None
        id_file.write_text(run_id + "\n")
        # Every key is plotted against the training step, not W&B's count of log calls: a
        # record of an evaluation shares its step with the training record before it.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.started = time.time()
        self.last_step = resume_step

    def log(self, record: dict[str, Any]) -> None:
        scalars = {k: v for k, v in record.items() if _is_scalar(v)}
        self.last_step = int(record.get("step", self.last_step))
        self.run.log(scalars)

    def log_pictures(self) -> list[Path]:
        """The PNGs this run wrote into its folder (the reconstruction, the loss curve)."""
        pictures = [
            p
            for p in sorted(self.run_dir.glob("*.png"))
            if p.stat().st_mtime >= self.started - 1  # a file system's coarse mtimes
        ]
        if pictures:
            self.run.log(
                {
                    "step": self.last_step,
                    **{f"{PICTURES_KEY}/{p.stem}": self.wandb.Image(str(p)) for p in pictures},
                }
            )
        return pictures

    def close(self) -> None:
        self.run.finish()


def open_tracking(cfg: Config | None, run_dir: Path, resume_step: int) -> WandbRun | None:
    """The W&B run the config asks for, or None."""
    if cfg is None or not cfg.run.wandb:
        return None
    return WandbRun(cfg, run_dir, resume_step)
