"""gdm-ray: find, model and remove neural backdoors by generative distribution modeling."""

__version__ = "0.1.0"
