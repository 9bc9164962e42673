"""Command-line tasks (Hydra entry points) of the lab."""
