"""Saved models put to work: model files, thresholds, predict, overlays and the online stream."""
