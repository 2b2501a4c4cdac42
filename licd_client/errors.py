"""The one exception tree shared by the daemon and every client.

Each wire error code of docs/protocol.md section 6 has exactly one class here, carrying its
code; `from_wire` maps a received error frame back to its class. The daemon raises these
and `licd.core.dispatch` turns them into error frames; the client raises them to the app.
Errors that never cross the wire (a bad token, a lost connection) derive from
`ClientError` and have no code.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal


class LicdError(Exception):
    """Base of every licd error. `code` is the wire code; `message` a human sentence."""

    code: ClassVar[str] = "internal"
    default_message: ClassVar[str] = "internal error"
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after: float | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.retry_after = retry_after
        self.detail = detail
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class BadRequest(LicdError):
    code = "bad_request"
    default_message = "malformed request"


class FrameTooLarge(LicdError):
    code = "frame_too_large"
    default_message = "frame length out of range"


class HelloRequired(LicdError):
    code = "hello_required"
    default_message = "the first request on a connection must be hello"


class UnsupportedProtocol(LicdError):
    code = "unsupported_protocol"
    default_message = "protocol version not supported"


class UnknownLicence(LicdError):
    code = "unknown_licence"
    default_message = "no such licence key"


class LicenceExpired(LicdError):
    code = "licence_expired"
    default_message = "the licence has expired"


class LicenceNotYetValid(LicdError):
    code = "licence_not_yet_valid"
    default_message = "the licence is not valid yet"


class SeatsExhausted(LicdError):
    code = "seats_exhausted"
    default_message = "maximum allowed concurrent licences reached"
    retryable = True


class LeaseUnknown(LicdError):
    """The daemon does not know the lease. `cause` says why, when the daemon said. When
    an administrator revoked it, `revoked` is True and `reason` is what they gave ("" if
    nothing); the message says so too."""

    code = "lease_unknown"
    default_message = "no such lease: it expired, was reclaimed or was revoked"

    @property
    def revoked(self) -> bool:
        return (self.detail or {}).get("revoked") is True

    @property
    def reason(self) -> str | None:
        """The administrator's reason for a revoke ("" when none was given); None when
        the lease was not revoked."""
        reason = (self.detail or {}).get("reason")
        return reason if self.revoked and isinstance(reason, str) else None

    @property
    def cause(self) -> Literal["revoked", "idle", "reclaimed"] | None:
        """Why the lease is gone, from the daemon's `detail` (docs/protocol.md,
        "heartbeat"): "revoked" by an administrator; "idle": reclaimed because the app
        had not marked it in use for the licence's idle timeout (AsyncLease.touch);
        "reclaimed" after it lapsed unrenewed; None when the daemon did not say (a bare
        lease_unknown, or a lease that lapsed on the client's own clock)."""
        detail = self.detail or {}
        if detail.get("revoked") is True:
            return "revoked"
        if detail.get("reclaimed") is True:
            return "idle" if detail.get("idle") is True else "reclaimed"
        return None


class Denied(LicdError):
    code = "denied"
    default_message = "a policy excludes this holder"


class QuotaExhausted(LicdError):
    code = "quota_exhausted"
    default_message = "the metered counter is used up"


class RateLimited(LicdError):
    code = "rate_limited"
    default_message = "too many requests"
    retryable = True


class TooManyConnections(LicdError):
    code = "too_many_connections"
    default_message = "connection limit reached"
    retryable = True


class ShuttingDown(LicdError):
    code = "shutting_down"
    default_message = "the daemon is stopping"
    retryable = True


class Unavailable(LicdError):
    code = "unavailable"
    default_message = "storage or internal failure; nothing was granted"
    retryable = True


class UpstreamUnavailable(LicdError):
    code = "upstream_unavailable"
    default_message = "the upstream licence server cannot be reached"
    retryable = True


class Internal(LicdError):
    code = "internal"
    default_message = "internal error; nothing was granted"


#: Wire code -> class. Built from the classes above; a unit test checks it is one-to-one
#: and covers exactly the codes of docs/protocol.md section 6.
REGISTRY: dict[str, type[LicdError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        FrameTooLarge,
        HelloRequired,
        UnsupportedProtocol,
        UnknownLicence,
        LicenceExpired,
        LicenceNotYetValid,
        SeatsExhausted,
        LeaseUnknown,
        Denied,
        QuotaExhausted,
        RateLimited,
        TooManyConnections,
        ShuttingDown,
        Unavailable,
        UpstreamUnavailable,
        Internal,
    )
}


def from_wire(
    code: str,
    message: str,
    *,
    retry_after: float | None = None,
    detail: dict[str, Any] | None = None,
) -> LicdError:
    """The exception for a received error frame; an unknown code becomes `Internal`."""
    cls = REGISTRY.get(code, Internal)
    err = cls(message, retry_after=retry_after, detail=detail)
    if cls is Internal and code != Internal.code:
        err.detail = {**(detail or {}), "code": code}
    return err


class ClientError(Exception):
    """An error found by the client itself; it has no wire code."""


class TokenInvalid(ClientError):
    """A signed statement or chain failed verification: the lease must not be used."""


class UntrustedKey(TokenInvalid):
    """The server's statement is genuinely signed, by a key the client does not trust
    (`signer`): a wrong LICD_SERVER_KEY, or the wrong server."""

    def __init__(self, message: str, *, signer: bytes) -> None:
        super().__init__(message)
        self.signer = signer


class ConnectionLost(ClientError):
    """No daemon could be reached, or the connection broke mid-request."""


class ProtocolViolation(ClientError):
    """The peer sent something the protocol does not allow."""
