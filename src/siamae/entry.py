"""The console script of installs made before the command room (``siamae.entry:main``, written
into ``bin/siamae`` at install time): the same :func:`siamae.commands.entry.main`. Imports no
torch."""

from siamae.commands.entry import main

__all__ = ["main"]
