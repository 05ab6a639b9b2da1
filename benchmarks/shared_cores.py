"""The demo's training step and one propagation frame, on quiet cores and on cores shared with
competing CPU-bound processes, with torch's old default threads and with the thread policy.

    python benchmarks/shared_cores.py   # about 5 minutes on 2 cores (--settings for a subset)

Each measurement runs in a fresh process (thread settings and OMP_WAIT_POLICY only take effect
before torch starts), with OMP_NUM_THREADS unset. A loaded row starts ``--rivals`` busy-loop
Python processes before the measurement and stops them after it (``1``: the issue's "a
competing CPU-bound process"; ``cores``: one per usable core, the harshest). Settings:

- ``old``: torch's default threads (one per core) as siamae ran before the policy, the demo's 1
  loader worker beside them; propagation with the same default.
- ``policy``: ``siamae.threads``: usable cores less loader workers (the demo step: 1
  thread beside its worker); propagation as ``siamae eval davis`` runs it (no workers: all
  usable cores).
- ``old+passive``, ``policy+passive``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP
  threads sleep instead of spinning), which the ``siamae`` command sets unless the user did.
  With it the policy is re-fitted as the run goes (``siamae.threads.ThreadGovernor``: a light
  worker gives its core back, a rival takes its core); the thread column gives the count the
  step ran with at the end, and ``a->b`` when it changed.

The demo step is the median of the logged per-step times over the last ``--measure`` of
``--steps`` steps (never the first: worker start-up; the governor's first re-fit closes about 3 s
after the second step), or of what ``--budget`` seconds allowed (an oversubscribed step can take
a minute); ``--rounds N`` takes every row N times, interleaved, and gives the median and the
range (a single step time on 2 shared cores varies by 2x from one run to the next); the
propagation frame is the median over repeats of one synthetic demo video (96 px, vit_tiny
patch 8, protocol cropmae), divided by its propagated frames. Prints a markdown table; the load
averages before and after each measurement are in its last column, because other processes on
the machine change them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from siamae.commands.demo import DEMO_OVERRIDES
from siamae.data.synthetic import synthetic_video
from siamae.engine.setup import THREADS_FILE
from siamae.engine.trainer import train
from siamae.eval.propagation.engine import protocol
from siamae.eval.propagation.synthetic_videos import predict
from siamae.loading import random_encoder
from siamae.recipes import load_config
from siamae.threads import apply_thread_policy, usable_cores

SETTINGS = {
    "old": {},
    "old+passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "policy": {},
    "policy+passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def _demo_step(threads: int | None, steps: int, measure: int, budget_s: float) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as out:
        overrides = [
            "run.log_every=1",
            "run.progress=false",
            "run.visualize=false",
            "run.tensorboard=false",
            "run.checkpoint_every=100000",
            f"run.threads={'null' if threads is None else threads}",
        ]
        cfg = load_config(None, DEMO_OVERRIDES + [f"run.out_dir={out}"] + overrides)
        # A step can take a minute on oversubscribed cores: past the budget, stop the run as
        # Ctrl-C would (the trainer finishes the step and stops).
        stop = threading.Timer(budget_s, os.kill, (os.getpid(), signal.SIGINT))
        stop.start()
        try:
            train(cfg, resume=False, stop_after_steps=steps)
        finally:
            stop.cancel()
        records = [
            json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
        ]
        plan = json.loads((Path(out) / THREADS_FILE).read_text())
    per_step = [cfg.data.batch_size / r["pairs_per_s"] for r in records if r.get("pairs_per_s")]
    counts = [plan["threads"]] + [c["threads"] for c in plan.get("changes", [])]
    return statistics.median((per_step[1:] or per_step)[-measure:]), "->".join(map(str, counts))


def _propagation_frame(repeats: int, budget_s: float) -> float:
    encoder = random_encoder("vit_tiny_patch8_64").eval()
    frames, masks = synthetic_video(0, 96, 12, 123)
    params = replace(protocol("cropmae"), resize="native", batch_size=len(frames))
    predict(encoder, frames, masks, params)  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        predict(encoder, frames, masks, params)
        times.append((time.perf_counter() - t0) / (len(frames) - 1))
    return statistics.median(times)


def child(setting: str, steps: int, measure: int, repeats: int, budget_s: float) -> None:
    default_threads = torch.get_num_threads()
    old = setting.startswith("old")
    step, step_threads = _demo_step(default_threads if old else None, steps, measure, budget_s)
    if old:
        torch.set_num_threads(default_threads)
    else:
        apply_thread_policy(None, workers=0)
    frame = _propagation_frame(repeats, budget_s / 2)
    result = {
        "step_s": step,
        "step_threads": step_threads,
        "frame_s": frame,
        "frame_threads": torch.get_num_threads(),
    }
    print(json.dumps(result), flush=True)


def _busy_loops(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def measure(setting: str, rivals: int, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.pop("OMP_WAIT_POLICY", None)
    env.update(SETTINGS[setting])
    before = _load()
    loops = _busy_loops(rivals)
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--child", setting, "--steps", str(args.steps)]
            + ["--measure", str(args.measure), "--repeats", str(args.repeats)]
            + ["--budget", str(args.budget)],
            env=env,
            capture_output=True,
            text=True,
        )
    finally:
        for loop in loops:
            loop.terminate()
            loop.wait()
    if done.returncode != 0:
        raise SystemExit(f"the {setting} measurement failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(setting=setting, rivals=rivals, load=f"{before} -> {_load()}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="demo steps per measurement")
    ap.add_argument(
        "--measure", type=int, default=8, help="the last this many steps give the median"
    )
    ap.add_argument("--repeats", type=int, default=5, help="propagation repeats")
    ap.add_argument(
        "--budget", type=float, default=40.0, help="seconds of demo steps at most (then stop)"
    )
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset")
    ap.add_argument(
        "--rivals",
        default="0,1",
        help="comma-separated busy-loop counts, one row each (0: quiet; 'cores': one per "
        "usable core)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="take every row this many times, interleaved (a round is every row once); the "
        "table gives the median and the range",
    )
    ap.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.steps, args.measure, args.repeats, args.budget)
        return
    cpu = platform.processor() or platform.machine()
    print(
        f"machine: {cpu}, {os.cpu_count()} cores ({usable_cores()} usable), torch "
        f"{torch.__version__}, Python {platform.python_version()}"
    )
    loads = [usable_cores() if n == "cores" else int(n) for n in args.rivals.split(",")]
    taken: dict[tuple[int, str], list[dict]] = {}
    for _ in range(args.rounds):
        for rivals in loads:
            for setting in args.settings.split(","):
                result = measure(setting, rivals, args)
                taken.setdefault((rivals, setting), []).append(result)
                print(json.dumps(result), file=sys.stderr, flush=True)
    print()
    print(
        "| cores | setting | demo step (threads) | x quiet | propagation frame (threads) "
        "| x quiet | load avg before -> after |"
    )
    print("|---|---|---|---|---|---|---|")
    for (rivals, setting), results in taken.items():
        quiet = taken.get((0, setting))
        where = f"{rivals} rival{'s' if rivals > 1 else ''}" if rivals else "quiet"
        print(
            f"| {where} | {setting} "
            f"| {_figure(results, 'step_s', 1, 's')} ({_threads(results)}) "
            f"| {_ratio(results, quiet, 'step_s')} "
            f"| {_figure(results, 'frame_s', 1000, 'ms')} ({results[0]['frame_threads']}) "
            f"| {_ratio(results, quiet, 'frame_s')} "
            f"| {results[0]['load'].split(' -> ')[0]} -> {results[-1]['load'].split(' -> ')[1]} |"
        )


def _figure(results: list[dict], key: str, scale: float, unit: str) -> str:
    """The median, and the range when a row was taken more than once."""
    values = sorted(scale * r[key] for r in results)
    digits = 3 if unit == "s" else 1
    median = f"{statistics.median(values):.{digits}f} {unit}"
    if len(values) == 1:
        return median
    return f"{median} [{values[0]:.{digits}f}-{values[-1]:.{digits}f}]"


def _threads(results: list[dict]) -> str:
    """The thread counts the rows' steps ran with, each once (``1->2``: re-fitted to 2)."""
    return ", ".join(dict.fromkeys(str(r["step_threads"]) for r in results))


def _ratio(results: list[dict], quiet: list[dict] | None, key: str) -> str:
    if not quiet:
        return "-"
    return f"{statistics.median(r[key] for r in results) / statistics.median(r[key] for r in quiet):.1f}"


if __name__ == "__main__":
    main()
