"""Low-level image operations shared by restorers, degradations and metrics."""
