"""licd_client: the client side of the licd protocol, for threaded and asyncio apps.

The public API is re-exported here: `checkout()` / `Client` (blocking), `AsyncClient`
(asyncio), their lease types, and the exception tree. The package installs with msgpack
and PyNaCl only: it must never import `licd`, aiosqlite or click.
"""

import logging

from .backoff import Backoff, is_retryable
from .client import AsyncClient
from .clock import Clock, ManualClock, SystemClock, lease_clock
from .errors import (
    BadRequest,
    ClientError,
    ConnectionLost,
    Denied,
    Internal,
    LeaseUnknown,
    LicdError,
    LicenceExpired,
    LicenceNotYetValid,
    ProtocolViolation,
    QuotaExhausted,
    RateLimited,
    SeatsExhausted,
    ShuttingDown,
    TokenInvalid,
    TooManyConnections,
    Unavailable,
    UnknownLicence,
    UpstreamUnavailable,
)
from .identity import holder
from .lease import AsyncLease, LeaseState
from .messages import AvailableReply, Holder
from .sync import Client, Lease, available, checkout, default_client

#: The release of licd and licd-client, both built from this tree: written here only
#: (pyproject.toml, setup.py and wheels/licd-client/pyproject.toml read it).
__version__ = "0.1.0"

# A library logs, the app decides where it goes (and nothing is printed by default).
logging.getLogger("licd_client").addHandler(logging.NullHandler())

__all__ = [
    "AsyncClient",
    "AsyncLease",
    "AvailableReply",
    "Backoff",
    "BadRequest",
    "Client",
    "ClientError",
    "Clock",
    "ConnectionLost",
    "Denied",
    "Holder",
    "Internal",
    "Lease",
    "LeaseState",
    "LeaseUnknown",
    "LicdError",
    "LicenceExpired",
    "LicenceNotYetValid",
    "ManualClock",
    "ProtocolViolation",
    "QuotaExhausted",
    "RateLimited",
    "SeatsExhausted",
    "ShuttingDown",
    "SystemClock",
    "TokenInvalid",
    "TooManyConnections",
    "Unavailable",
    "UnknownLicence",
    "UpstreamUnavailable",
    "available",
    "checkout",
    "default_client",
    "holder",
    "is_retryable",
    "lease_clock",
]
