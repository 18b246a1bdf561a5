"""Errors that reach the user: each one names what is wrong and where."""

from __future__ import annotations


class GancleanseError(Exception):
    """Base class: the CLI prints the message and exits with status 2."""


class ConfigError(GancleanseError):
    """A configuration key is unknown, of the wrong type or out of range."""


class DataError(GancleanseError):
    """Input data is missing, malformed, or does not fit the model."""


class RunDirError(GancleanseError):
    """A run directory is missing, incomplete, or inconsistent with its config."""


class TrainingDivergedError(GancleanseError):
    """A loss or parameter became NaN or infinite during training or replay."""


class NonFiniteError(GancleanseError):
    """A metric value, score or option is NaN or infinite: nothing is written from it."""


class GancleanseWarning(UserWarning):
    """Something finished but may be inaccurate; the CLI prints it as one line."""
