"""What a person reads: palette masks and panels, plots, and MLflow tracking (opt in)."""
