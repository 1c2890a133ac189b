"""Optimisation of the projector: Gram-statistics and direct trainers, Adam, batch schedule, radius certificate."""
