"""How a store shapes a batch's statements (base.py `batched`, both backends): few
executemany calls (round trips, for PostgreSQL), and nothing a reorder could change."""

from __future__ import annotations

from licd.store.base import Statements, batched
from licd.store.records import (
    DELETE_LEASE,
    INSERT_AUDIT,
    INSERT_LEASE,
    TOUCH_LEASE,
    UPSERT_COUNTER,
    UPSERT_LICENCE,
)


def test_a_churn_batch_becomes_one_call_per_kind_of_statement() -> None:
    """Checkouts and checkins alternate a lease row and an audit row: regrouped, 45 of
    each make three executemany calls, not ninety; the audit entries keep their order."""
    batch: Statements = []
    for n in range(45):
        kind = INSERT_LEASE if n % 2 else DELETE_LEASE
        batch += [(kind, [(f"lease-{n}",)]), (INSERT_AUDIT, [(f"entry-{n}",)])]
    merged = batched(batch)
    assert [sql for sql, _ in merged] == [DELETE_LEASE, INSERT_LEASE, INSERT_AUDIT]
    assert [row[0] for row in merged[2][1]] == [f"entry-{n}" for n in range(45)]


def test_empty_statements_are_dropped_and_runs_merged() -> None:
    batch: Statements = [(INSERT_LEASE, []), (UPSERT_LICENCE, [("a",)]), (UPSERT_LICENCE, [("b",)])]
    assert batched(batch) == [(UPSERT_LICENCE, [("a",), ("b",)])]


def test_deletions_come_first_and_other_statements_keep_their_order() -> None:
    batch: Statements = [
        (UPSERT_LICENCE, [("cad", 1)]),
        (TOUCH_LEASE, [("a",)]),
        (INSERT_LEASE, [("b",)]),
        (UPSERT_COUNTER, [("cad", 1)]),
        (DELETE_LEASE, [("c",)]),
        (INSERT_AUDIT, [("x",)]),
        (UPSERT_LICENCE, [("cad", 2)]),
    ]
    assert [sql for sql, _ in batched(batch)] == [
        DELETE_LEASE,  # a seat freed before one is taken: the guard never sees both
        INSERT_LEASE,
        TOUCH_LEASE,
        UPSERT_LICENCE,
        UPSERT_COUNTER,
        UPSERT_LICENCE,
        INSERT_AUDIT,
    ]
