-- A site router's state (see licd/core/router.py).
-- The block of seats held upstream per block-mode licence: kept so that a router that
-- restarts resumes its block instead of asking upstream for a new one.
CREATE TABLE block (
    licence_id TEXT PRIMARY KEY,
    secret     TEXT NOT NULL,        -- the upstream lease secret of the block
    handle     TEXT NOT NULL,
    request    TEXT NOT NULL,        -- the idempotency key the block was taken with
    seats      INTEGER NOT NULL,
    expires    REAL NOT NULL,
    token      BLOB NOT NULL,        -- upstream's signed block token
    chain      BLOB NOT NULL,        -- upstream's chain, msgpack array of bin
    renewed    REAL NOT NULL,        -- wall time of the last successful take or renewal
    revoked    INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Leases relayed upstream in forward mode: the router holds no seat, but remembers who
-- holds what (for listings) and which lease secrets to relay.
CREATE TABLE forwarded (
    secret     TEXT PRIMARY KEY,
    handle     TEXT NOT NULL,
    licence_id TEXT NOT NULL,
    host       TEXT NOT NULL,
    hostid     TEXT NOT NULL,
    user       TEXT NOT NULL,
    pid        INTEGER NOT NULL,
    ip         TEXT,
    seats      INTEGER NOT NULL,
    created    REAL NOT NULL,
    expires    REAL NOT NULL
) WITHOUT ROWID;
