"""``python -m siamae`` (also what ``torchrun -m siamae pretrain ...`` runs)."""

import sys

from siamae.entry import main

sys.exit(main())
