-- Vendor-signed entitlements a site imported (see licd/core/entitlements.py and
-- docs/entitlements.md): per licence, the statement in force and the highest sequence
-- ever imported, which only grows, so an older (larger) grant cannot be replayed, not
-- even after the licence was removed. The licence served under it is in `licence`.
CREATE TABLE entitlement (
    licence_id TEXT PRIMARY KEY,
    sequence   INTEGER NOT NULL CHECK (sequence >= 1),
    statement  BLOB NOT NULL,            -- the vendor-signed statement, as imported
    imported   REAL NOT NULL,            -- wall time of its import
    removed    INTEGER NOT NULL DEFAULT 0 CHECK (removed IN (0, 1))  -- `licence remove`d
) WITHOUT ROWID;
