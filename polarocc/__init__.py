"""polarocc: data-agnostic deep one-class anomaly detection with a random hypersphere center."""

__version__ = "0.1.0"
