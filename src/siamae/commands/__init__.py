"""The command room: ``siamae``'s console script and ``python -m siamae`` (:mod:`.entry`), the
command line (:mod:`.cli`) and the commands that stand above the library: ``demo``,
``visualize`` (:mod:`.viz`) and ``submit``. Nothing here is imported by the library below it.

Empty on purpose: :mod:`.entry` must import no torch, and it is imported through this package.
"""
