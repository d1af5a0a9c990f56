"""ragline."""
