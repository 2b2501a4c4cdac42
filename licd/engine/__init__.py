"""The pure engine: seat accounting and lease rules over in-memory state.

No sockets, no awaits, no SQL, no clock of its own: every decision takes the instant it
is made at. Everything else carries data to and from it.
"""

from licd.engine.engine import Availability, Engine, Grant
from licd.engine.lease import LeasePhase, SeatLease
from licd.engine.licence import Licence

__all__ = ["Availability", "Engine", "Grant", "LeasePhase", "Licence", "SeatLease"]
