"""Peer detectors (PatchCore-, PaDiM-style) scored on the same cached features."""
