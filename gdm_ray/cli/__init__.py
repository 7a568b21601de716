"""Hydra entry points and the `gdm-ray` console script."""
