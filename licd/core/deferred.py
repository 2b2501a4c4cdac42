"""Kept only for `licd.core.dispatch`'s import while it is being reworked (issue 15):
`Deferred` lives in `licd.deferred`, below every layer that uses it. Delete this module
once nothing imports it."""

from licd.deferred import Deferred

__all__ = ["Deferred"]
