-- The whole schema on PostgreSQL, as the SQLite migrations 001-008 leave it (see
-- licd/store/migrations/ for what each table is for), plus what a cluster needs: the
-- leadership row and a seat guard no leader can bypass (docs/ha.md). Times are seconds
-- since the Unix epoch (double precision), as in SQLite.

CREATE TABLE lease (
    secret         text PRIMARY KEY,
    handle         text NOT NULL,
    licence_id     text NOT NULL,
    request        text NOT NULL,
    host           text NOT NULL,
    hostid         text NOT NULL,
    "user"         text NOT NULL,
    pid            bigint NOT NULL,
    app            text,
    instance       text,
    seats          integer NOT NULL CHECK (seats >= 1),
    ttl            double precision NOT NULL,
    created        double precision NOT NULL,
    expires        double precision NOT NULL,
    last_heartbeat double precision NOT NULL,
    delegate       bytea,
    ip             text,
    overdraft      integer NOT NULL DEFAULT 0,
    device         integer NOT NULL DEFAULT 0,
    unit           text NOT NULL DEFAULT ''
);

-- One live lease per (licence, machine, request key), the engine's idempotency key: a
-- retried checkout can never hold two.
CREATE UNIQUE INDEX lease_request ON lease (licence_id, hostid, request);
CREATE INDEX lease_by_unit ON lease (licence_id, unit);

CREATE TABLE licence (
    id         text PRIMARY KEY,
    key        text NOT NULL UNIQUE,
    product    text NOT NULL,
    seats      integer NOT NULL CHECK (seats >= 1),
    lease_ttl  double precision NOT NULL,
    grace      double precision NOT NULL,
    not_before double precision,
    expires    double precision,
    features   text NOT NULL DEFAULT '{}',
    updated    double precision NOT NULL,
    policy     text NOT NULL DEFAULT '{}'
);

CREATE TABLE audit (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time      double precision NOT NULL,
    event     text NOT NULL,
    licence   text,
    handle    text,
    host      text,
    hostid    text,
    "user"    text,
    ip        text,
    seats     integer,
    reason    text,
    admin_uid bigint,
    detail    text NOT NULL DEFAULT '{}'
);

CREATE TABLE audit_retention (
    id     integer PRIMARY KEY CHECK (id = 1),
    cutoff double precision NOT NULL
);

INSERT INTO audit_retention (id, cutoff) VALUES (1, '-Infinity');

-- Append-only, as in SQLite: no UPDATE; DELETE only of entries older than the cut-off;
-- the cut-off row itself stays.
CREATE FUNCTION licd_audit_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        RAISE EXCEPTION 'the audit log is append-only';
    END IF;
    IF NOT coalesce(OLD.time < (SELECT cutoff FROM audit_retention WHERE id = 1), false) THEN
        RAISE EXCEPTION 'the audit log is append-only: only entries older than the retention cut-off may be deleted';
    END IF;
    RETURN OLD;
END $$;

CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION licd_audit_guard();

CREATE FUNCTION licd_retention_kept() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit retention cut-off cannot be deleted';
END $$;

CREATE TRIGGER audit_retention_kept BEFORE DELETE ON audit_retention
    FOR EACH ROW EXECUTE FUNCTION licd_retention_kept();

CREATE TABLE block (
    licence_id text PRIMARY KEY,
    secret     text NOT NULL,
    handle     text NOT NULL,
    request    text NOT NULL,
    seats      integer NOT NULL,
    expires    double precision NOT NULL,
    token      bytea NOT NULL,
    chain      bytea NOT NULL,
    renewed    double precision NOT NULL,
    revoked    integer NOT NULL DEFAULT 0
);

CREATE TABLE forwarded (
    secret     text PRIMARY KEY,
    handle     text NOT NULL,
    licence_id text NOT NULL,
    host       text NOT NULL,
    hostid     text NOT NULL,
    "user"     text NOT NULL,
    pid        bigint NOT NULL,
    ip         text,
    seats      integer NOT NULL,
    created    double precision NOT NULL,
    expires    double precision NOT NULL
);

CREATE TABLE counter (
    licence_id   text NOT NULL,
    name         text NOT NULL,
    used         bigint NOT NULL,
    period_start double precision NOT NULL,
    PRIMARY KEY (licence_id, name)
);

CREATE TABLE wall_mark (
    id   integer PRIMARY KEY CHECK (id = 1),
    wall double precision NOT NULL
);

CREATE TABLE entitlement (
    licence_id text PRIMARY KEY,
    sequence   bigint NOT NULL CHECK (sequence >= 1),
    statement  bytea NOT NULL,
    imported   double precision NOT NULL,
    removed    integer NOT NULL DEFAULT 0 CHECK (removed IN (0, 1))
);

-- Leadership (licd/core/cluster.py): one row. `epoch` grows by one at every takeover;
-- `node` is '' when nobody leads (a leader that stopped cleanly). `renewed_at` is on
-- the database's clock, the only clock the nodes share.
CREATE TABLE leader (
    id         integer PRIMARY KEY CHECK (id = 1),
    epoch      bigint NOT NULL,
    node       text NOT NULL,
    address    text NOT NULL,
    renewed_at timestamptz NOT NULL
);

INSERT INTO leader (id, epoch, node, address, renewed_at) VALUES (1, 0, '', '', 'epoch');

-- The seat guard: seats in use per licence, kept by the database itself in the same
-- transaction as the lease rows, and checked against the most the licence can ever
-- grant (seats + overdraft + every add-on's seats). A unit (count_by) holds as many
-- seats as its largest lease. A licence without a row here (a relayed licence, whose
-- terms come from upstream) is not checked.
CREATE TABLE seat_guard (
    licence_id text PRIMARY KEY,
    ceiling    integer NOT NULL,
    in_use     integer NOT NULL DEFAULT 0,
    CONSTRAINT seats_within_licence CHECK (in_use <= ceiling)
);

CREATE FUNCTION licd_licence_ceiling() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    p jsonb := NEW.policy::jsonb;
BEGIN
    INSERT INTO seat_guard (licence_id, ceiling, in_use)
    VALUES (NEW.id, NEW.seats + coalesce((p ->> 'overdraft')::integer, 0)
            + coalesce((SELECT sum((a ->> 'seats')::integer)
                        FROM jsonb_array_elements(coalesce(p -> 'addon', '[]'::jsonb)) a), 0),
            (SELECT coalesce(sum(m), 0) FROM (  -- the leases already there, if any
                SELECT max(seats) AS m FROM lease WHERE licence_id = NEW.id GROUP BY unit
            ) units))
    ON CONFLICT (licence_id) DO UPDATE SET ceiling = excluded.ceiling;
    RETURN NULL;
END $$;

CREATE TRIGGER licence_ceiling AFTER INSERT OR UPDATE ON licence
    FOR EACH ROW EXECUTE FUNCTION licd_licence_ceiling();

CREATE FUNCTION licd_licence_gone() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM seat_guard WHERE licence_id = OLD.id;
    RETURN NULL;
END $$;

CREATE TRIGGER licence_gone AFTER DELETE ON licence
    FOR EACH ROW EXECUTE FUNCTION licd_licence_gone();

-- Kept row by row, in O(the unit's leases) (the index lease_by_unit): a lease that
-- comes raises its unit's seats to its own when it holds more; one that goes lowers them
-- to the largest left. BEFORE triggers see the table as it was before the row, so rows
-- of one statement count one after the other.
CREATE FUNCTION licd_lease_added() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    held integer;
BEGIN
    SELECT coalesce(max(seats), 0) INTO held FROM lease
    WHERE licence_id = NEW.licence_id AND unit = NEW.unit;
    IF NEW.seats > held THEN
        UPDATE seat_guard SET in_use = in_use + NEW.seats - held
        WHERE licence_id = NEW.licence_id;
    END IF;
    RETURN NEW;
END $$;

CREATE FUNCTION licd_lease_removed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    left_ integer;
BEGIN
    SELECT coalesce(max(seats), 0) INTO left_ FROM lease
    WHERE licence_id = OLD.licence_id AND unit = OLD.unit AND secret <> OLD.secret;
    IF OLD.seats > left_ THEN
        UPDATE seat_guard SET in_use = in_use - (OLD.seats - left_)
        WHERE licence_id = OLD.licence_id;
    END IF;
    RETURN OLD;
END $$;

CREATE TRIGGER lease_added BEFORE INSERT ON lease
    FOR EACH ROW EXECUTE FUNCTION licd_lease_added();

CREATE TRIGGER lease_removed BEFORE DELETE ON lease
    FOR EACH ROW EXECUTE FUNCTION licd_lease_removed();

-- The site key every node of the cluster signs with (clients pin it): the first node
-- records it; a node with another key, or none, is refused at start (docs/ha.md).
CREATE TABLE cluster_key (
    id     integer PRIMARY KEY CHECK (id = 1),
    public bytea NOT NULL CHECK (length(public) = 32)
);
