"""licd: a floating-licence daemon. See README.md and docs/."""

from licd_client import __version__ as __version__  # one release for daemon and client
