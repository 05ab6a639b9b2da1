"""Errors a user can fix. The CLI prints their message on one line and exits with code 2."""


class SiamaeError(Exception):
    """Bad input from the user: a path, a file, a config value or a checkpoint.

    The message names the thing that is wrong and says what to do about it.
    """


class ConfigError(SiamaeError):
    """An invalid configuration field or value."""


class CheckpointError(SiamaeError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


class DataError(SiamaeError):
    """A data path or file that cannot be used."""


class TrainingDiverged(SiamaeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
