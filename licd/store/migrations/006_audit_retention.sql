-- Audit retention: entries older than `[audit] keep` are exported to a file and then
-- deleted (licd/audit_upkeep.py). The log stays append-only otherwise: UPDATE is still
-- refused, and DELETE only of entries older than the cut-off recorded here, which the
-- retention job sets in the same transaction as its delete. The cut-off starts at
-- -inf (nothing may be deleted) and cannot itself be deleted. These triggers guard
-- against mistakes (an operator's stray DELETE), not against a hostile writer of the
-- database file, who could drop them.
CREATE TABLE audit_retention (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    cutoff REAL NOT NULL
);

INSERT INTO audit_retention (id, cutoff) VALUES (1, -9e999);

CREATE TRIGGER audit_retention_kept BEFORE DELETE ON audit_retention
BEGIN
    SELECT RAISE(ABORT, 'the audit retention cut-off cannot be deleted');
END;

DROP TRIGGER audit_no_delete;

-- NULL (no cut-off row, or a NULL time) refuses too: coalesce(NULL, 0) is false.
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
WHEN NOT coalesce(OLD.time < (SELECT cutoff FROM audit_retention WHERE id = 1), 0)
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only: only entries older than the retention cut-off may be deleted');
END;
