"""Anomaly maps, smoothing, image scores and the image and pixel metrics."""
