"""The checkout rules' verdicts: what each rule said of one holder's request, in the order
the engine decides (`RULES`), and the error a checkout gets from the first that refuses.

A checkout (`Engine.checkout`) asks each rule in turn and raises the first refusal; `licd
why` (`Engine.explain`) asks every rule and shows all their verdicts, the deciding one
first among the refusals. Both run the very same rule methods, so what `why` says is
what a checkout then gets. A refusal names its rule in the error's `detail.rule` too, so
a client, the audit log and `licd audit` can say which rule refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from licd_client.errors import LicdError

#: Every rule, in the order a checkout asks them.
RULES = (
    "validity",  # the licence is in force now (not_before, expires)
    "deny",  # no deny rule matches the holder
    "allow",  # an allow list, if any, matches the holder
    "clock",  # a vendor licence is not held back by a clock set back
    "unit",  # the holder's unit (count_by) has room for one more lease
    "max",  # the holder's caps (max per user, host, group)
    "borrow",  # a long lease (borrow_after): who may borrow, and borrow_max
    "reservation",  # seats reserved for groups the holder is not in
    "seats",  # the seats in force
    "overdraft",  # seats beyond them, each flagged
    "queue",  # no checkout waits in the licence's queue ahead of this one
)

#: The rules whose refusal a checkout with `queue` waits out in the licence's queue.
QUEUEABLE = ("reservation", "seats", "overdraft", "queue")


@dataclass(frozen=True)
class Verdict:
    """One rule's answer: `error` is None when it lets the request through."""

    rule: str
    reason: str  # in words, for a person
    error: LicdError | None = None
    flagged: bool = False  # it lets the request through flagged (in overdraft)

    @property
    def passed(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule, "passed": self.passed, "reason": self.reason}
        if self.error is not None:
            out["error"] = self.error.code
        if self.flagged:
            out["flagged"] = True
        return out


def refusal(rule: str, reason: str, error: LicdError) -> Verdict:
    """A refusing verdict whose error names its rule in `detail.rule`."""
    error.detail = {**(error.detail or {}), "rule": rule}
    return Verdict(rule, reason, error)
