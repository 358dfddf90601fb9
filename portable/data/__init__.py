"""Data shipped inside the package: the embedded default model (default_model/)."""
