-- A site router's wall-clock high-water mark (see licd/core/router.py): the latest wall time
-- it knows has passed. A router restarted with its clock set back judges its block's
-- remaining life from this mark, not from the clock, so the block does not last longer.
-- One row; the mark only ever grows (UPSERT_WALL_MARK keeps the larger value).
CREATE TABLE wall_mark (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    wall REAL NOT NULL            -- seconds since the Unix epoch, UTC
);
