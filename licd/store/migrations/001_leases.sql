-- Leases: one row per live lease. A row exists from the commit of its checkout until
-- the commit of its checkin or reclaim. The secret is what the holder presents; it is
-- never shown in listings (the handle is the public name).
CREATE TABLE lease (
    secret         TEXT PRIMARY KEY,
    handle         TEXT NOT NULL UNIQUE,
    licence_id     TEXT NOT NULL,
    request        TEXT NOT NULL,
    host           TEXT NOT NULL,
    hostid         TEXT NOT NULL,
    user           TEXT NOT NULL,
    pid            INTEGER NOT NULL,
    app            TEXT,
    instance       TEXT,
    seats          INTEGER NOT NULL CHECK (seats >= 1),
    ttl            REAL NOT NULL,
    created        REAL NOT NULL,
    expires        REAL NOT NULL,
    last_heartbeat REAL NOT NULL,
    delegate       BLOB
) WITHOUT ROWID;

CREATE INDEX lease_by_licence ON lease (licence_id);
