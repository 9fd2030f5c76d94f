-- The event store's tables in PostgreSQL; the same shape as the embedded store's format 3.
-- Streams and event types are small integer keys; `at` (when what an event records happened) is
-- indexed per stream for lookups by time.

CREATE TABLE streams (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- "C": stream ids sort by their bytes, as in the embedded store, whatever the database's locale.
    name    TEXT COLLATE "C" NOT NULL UNIQUE,
    version BIGINT NOT NULL,
    -- Readings taken before this were removed by retention; NULL: none were.
    readings_removed_before TIMESTAMPTZ,
    -- When the stream's aggregate next needs time to pass; NULL: nothing is due.
    wake_at TIMESTAMPTZ
);
CREATE INDEX streams_waking ON streams (wake_at) WHERE wake_at IS NOT NULL;

CREATE TABLE event_types (
    id   INT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);

CREATE TABLE events (
    position    BIGINT PRIMARY KEY,
    stream      BIGINT NOT NULL,
    version     BIGINT NOT NULL,
    type        INT NOT NULL,
    schema      INT NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL,
    at          TIMESTAMPTZ,
    payload     BYTEA NOT NULL
);
CREATE UNIQUE INDEX events_by_stream ON events (stream, version);
CREATE INDEX events_by_time ON events (stream, at);

CREATE TABLE snapshots (
    stream  BIGINT PRIMARY KEY,
    version BIGINT NOT NULL,
    schema  INT NOT NULL,
    payload BYTEA NOT NULL
);

-- The global position: one row, locked by every writing transaction from before it assigns
-- positions until it commits, so that positions become visible in the order they are assigned
-- (docs/design.md, "The global position in PostgreSQL").
CREATE TABLE global_position (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    head      BIGINT NOT NULL
);
INSERT INTO global_position (head) VALUES (0);
