"""Results tables, plots and the markdown report."""
