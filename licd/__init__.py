"""licd: a floating-licence daemon. See README.md and docs/."""

__version__ = "0.1.0"
