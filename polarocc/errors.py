"""Errors raised by polarocc: each names the offending key or file and the fix."""


class PolaroccError(Exception):
    """Base class of every error polarocc raises on purpose."""


class ConfigError(PolaroccError, ValueError):
    """An invalid or inconsistent entry in params.yaml."""


class DataError(PolaroccError):
    """A dataset, image or mask that cannot be used as it is."""


class WeightsError(PolaroccError):
    """Backbone weights that cannot be found or loaded."""


class NumericalError(PolaroccError, FloatingPointError):
    """NaN/Inf in features or training."""


class ModelError(PolaroccError):
    """A saved model that cannot be used as asked (wrong file, or features it was not trained on)."""
