"""Errors raised by polarocc: each names the offending key or file and the fix, on one line.

Every error a user can cause (a bad param, a missing or broken file, an unsafe output path) is a
:class:`PolaroccError`; the stage runner and the CLI print its message and exit with status 2 instead of
showing a traceback.
"""


class PolaroccError(Exception):
    """Base class of every error polarocc raises on purpose."""

    def __str__(self) -> str:
        # One line whatever the message was built from (a wrapped library message may hold newlines).
        return " ".join(super().__str__().split())


class ConfigError(PolaroccError, ValueError):
    """An invalid or inconsistent entry in params.yaml or on the command line."""


class DataError(PolaroccError):
    """A dataset, image or mask that cannot be used as it is."""


class WeightsError(PolaroccError):
    """Backbone weights that cannot be found or loaded."""


class NumericalError(PolaroccError, FloatingPointError):
    """NaN/Inf in features or training."""


class ModelError(PolaroccError):
    """A saved model or state file that cannot be used as asked (wrong, damaged or foreign file, or features
    it was not trained on)."""


class UnsafePathError(PolaroccError):
    """An output that would delete or overwrite something polarocc did not create, or a path from params or
    data that leads outside the folder it must stay in."""


class MissingOutputError(PolaroccError, FileNotFoundError):
    """An earlier stage's output is missing: run that stage first."""
