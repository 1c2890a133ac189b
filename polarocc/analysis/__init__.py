"""Polar diagnostics and cosine similarities of features."""
