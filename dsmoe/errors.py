"""Errors caused by user input. The CLI prints these without a traceback.

Every message names the problem and the fix; callers raise them before any work
is done so that nothing is lost or half-written.
"""


class DsmoeError(ValueError):
    """Bad input: a config, a checkpoint, data or a request that cannot be used."""


class ConfigError(DsmoeError):
    """A ModelArgs field (or a training config field) breaks a rule."""


class CheckpointError(DsmoeError):
    """A checkpoint is missing, truncated, corrupt or does not match the model."""


class DataError(DsmoeError):
    """Training or evaluation data is missing, empty or does not fit the model."""
