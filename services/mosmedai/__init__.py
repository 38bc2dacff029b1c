"""mosmedai: medical-imaging AI served to regional hospitals through Triton and Ray Serve."""

__version__ = "0.1.0"
