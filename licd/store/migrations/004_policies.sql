-- Licence policies (docs/policies.md): everything beyond the basic terms, as JSON:
-- max_ttl, delegable, count_by, device_period, overdraft, allow, deny, reserve, max,
-- counter, addon.
ALTER TABLE licence ADD COLUMN policy TEXT NOT NULL DEFAULT '{}';

-- Per lease: granted in overdraft; a device lease; the unit that shares its seat.
ALTER TABLE lease ADD COLUMN overdraft INTEGER NOT NULL DEFAULT 0;
ALTER TABLE lease ADD COLUMN device INTEGER NOT NULL DEFAULT 0;
ALTER TABLE lease ADD COLUMN unit TEXT NOT NULL DEFAULT '';

-- Metered counters: units used in the current period.
CREATE TABLE counter (
    licence_id   TEXT NOT NULL,
    name         TEXT NOT NULL,
    used         INTEGER NOT NULL,
    period_start REAL NOT NULL,
    PRIMARY KEY (licence_id, name)
) WITHOUT ROWID;
