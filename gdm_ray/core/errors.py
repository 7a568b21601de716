"""Errors that the CLI turns into one clear line and a non-zero exit.

Each message names the bad value; no traceback reaches the user for these.
"""

__all__ = ["GdmRayError", "ConfigError", "DataError", "ModelLoadError"]


class GdmRayError(Exception):
    """Base class: an input problem the user can fix."""


class ConfigError(GdmRayError, ValueError):
    """A config value is out of range or inconsistent."""


class DataError(GdmRayError, ValueError):
    """A data set is missing, unreadable or not images."""


class ModelLoadError(GdmRayError, ValueError):
    """A model file is unreadable, corrupt, or of the wrong shape."""
