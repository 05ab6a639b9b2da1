"""``python -m siamae`` (also what ``torchrun -m siamae pretrain ...`` runs)."""

import sys

from siamae.commands.entry import main

sys.exit(main())
