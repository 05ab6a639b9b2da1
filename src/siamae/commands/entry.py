"""The ``siamae`` console script and ``python -m siamae``: the environment first, then the CLI.

Idle OpenMP threads sleep instead of spinning: on cores that other processes hold (loader
workers, other jobs) spinning slowed a step up to 25x and it was never clearly slower
(docs/performance.md, "Shared cores"). OpenMP reads the setting once, when torch loads it, so it
is set here, before :mod:`siamae.commands.cli` (which imports torch) is imported. A value the user set is
kept. This module imports no torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

OPENMP_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}


def main(argv: Sequence[str] | None = None) -> int:
    for name, value in OPENMP_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    # The one deferred siamae import: siamae.commands.cli imports torch, which must load after the above.
    from siamae.commands.cli import main as cli_main

    return cli_main(argv)
