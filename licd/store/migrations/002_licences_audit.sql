-- Licences live in the database so that admin edits (licd licence add/update/remove)
-- survive a restart; licences declared in the config file are written here on start and
-- on reload. Features are a JSON object.
CREATE TABLE licence (
    id         TEXT PRIMARY KEY,
    key        TEXT NOT NULL UNIQUE,
    product    TEXT NOT NULL,
    seats      INTEGER NOT NULL CHECK (seats >= 1),
    lease_ttl  REAL NOT NULL,
    grace      REAL NOT NULL,
    not_before REAL,
    expires    REAL,
    features   TEXT NOT NULL DEFAULT '{}',
    updated    REAL NOT NULL
) WITHOUT ROWID;

-- The address the holder checked out from, for listings and the audit log.
ALTER TABLE lease ADD COLUMN ip TEXT;

-- The audit log: append-only. One row per checkout, checkin, reclaim, denial, revoke,
-- licence edit and config reload. Heartbeats are not logged one by one.
CREATE TABLE audit (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    time      REAL NOT NULL,
    event     TEXT NOT NULL,
    licence   TEXT,
    handle    TEXT,
    host      TEXT,
    hostid    TEXT,
    user      TEXT,
    ip        TEXT,
    seats     INTEGER,
    reason    TEXT,
    admin_uid INTEGER,
    detail    TEXT NOT NULL DEFAULT '{}'
);

CREATE INDEX audit_by_time ON audit (time);

-- Append-only: rows are never changed or deleted.
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;

CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;
