"""The ``siamae`` console script and ``python -m siamae``: the environment first, then the CLI.

Idle OpenMP threads sleep instead of spinning: on cores that other processes hold (loader
workers, other jobs) spinning slowed a step up to 25x and it was never clearly slower
(docs/performance.md, "Shared cores"). OpenMP reads the setting once, when torch loads it, so it
is set here, before :mod:`siamae.commands.cli` (which imports torch) is imported. A value the user set is
kept. This module imports no torch, and ``siamae eval davis|vip|jhmdb --score-only`` runs without
it (:mod:`siamae.eval.propagation.score_command`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from siamae.eval.propagation.score_command import score_without_torch

OPENMP_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}


def main(argv: Sequence[str] | None = None) -> int:
    for name, value in OPENMP_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    # Scoring a folder needs no torch: answered without importing it (seconds of a short run).
    code = score_without_torch(sys.argv[1:] if argv is None else argv)
    if code is not None:
        return code
    # The one deferred siamae import: siamae.commands.cli imports torch, which must load after the above.
    from siamae.commands.cli import main as cli_main

    return cli_main(argv)
