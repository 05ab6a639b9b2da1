"""torchrun's worker in test_cluster: ``siamae <command>`` whose main process dies once.

On torchrun's first attempt (TORCHELASTIC_RESTART_COUNT 0) the process of rank 0 exits with an
error right after it logged step $CRASH_AT_STEP, as a node failure would; torchrun's restart
runs the command again. Every attempt appends the steps it logged to $STEPS_FILE
("<attempt> <step>" lines), so the test sees where the restart resumed.
"""

from __future__ import annotations

import os
import sys

from siamae.commands.entry import main
from siamae.engine.logging import MetricsLogger

ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
CRASH_AT_STEP = int(os.environ["CRASH_AT_STEP"])
STEPS_FILE = os.environ["STEPS_FILE"]
_log = MetricsLogger.log


def _log_then_maybe_die(self: MetricsLogger, record: dict) -> None:
    _log(self, record)
    if "loss" not in record:  # an evaluation's record
        return
    with open(STEPS_FILE, "a") as f:
        f.write(f"{ATTEMPT} {record['step']}\n")
    if ATTEMPT == 0 and record["step"] == CRASH_AT_STEP:
        os._exit(3)


MetricsLogger.log = _log_then_maybe_die  # only the main process (rank 0) has a logger

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
