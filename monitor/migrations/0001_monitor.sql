-- The monitor's store, in schema `monitor` (the connection's search_path), so it can share a
-- database with other services without touching their tables or their `_sqlx_migrations`.
--
-- Times are float Unix seconds (UTC), as Celery events and Flower's API carry them.

-- One row per task id, merged from its events with Celery's state precedence.
CREATE TABLE tasks (
    uuid        text PRIMARY KEY,
    name        text,
    state       text NOT NULL,
    -- From task-received (or task-sent): Python reprs, as the events carry them.
    args        text,
    kwargs      text,
    root_id     text,
    parent_id   text,
    retries     integer,
    eta         text,
    expires     text,
    -- When each stage was reported.
    sent        double precision,
    received    double precision,
    started     double precision,
    succeeded   double precision,
    failed      double precision,
    retried     double precision,
    revoked     double precision,
    rejected    double precision,
    -- The event that set the current state.
    "timestamp" double precision,
    runtime     double precision,
    result      text,
    exception   text,
    traceback   text,
    worker      text,
    client      text,
    exchange    text,
    routing_key text,
    queue       text,
    clock       bigint,
    -- Set on every write: retention and reconciliation work from it.
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Keyset pagination, newest first: (received, uuid) is unique and totally ordered.
CREATE INDEX tasks_received ON tasks (received DESC NULLS LAST, uuid DESC);
CREATE INDEX tasks_name ON tasks (name, received DESC NULLS LAST, uuid DESC);
CREATE INDEX tasks_state ON tasks (state, received DESC NULLS LAST, uuid DESC);
CREATE INDEX tasks_worker ON tasks (worker, received DESC NULLS LAST, uuid DESC);
CREATE INDEX tasks_root ON tasks (root_id) WHERE root_id IS NOT NULL;
CREATE INDEX tasks_parent ON tasks (parent_id) WHERE parent_id IS NOT NULL;

-- One row per worker node, from worker-online/heartbeat/offline.
CREATE TABLE workers (
    hostname       text PRIMARY KEY,
    -- Newest worker event (any of the three) and its freq: online while
    -- now < last_heartbeat + 2 * freq, unless a worker-offline came after it.
    last_heartbeat double precision NOT NULL,
    freq           double precision NOT NULL,
    offline_at     double precision,
    first_seen     double precision NOT NULL,
    pid            bigint,
    clock          bigint,
    active         bigint,
    processed      bigint,
    loadavg        double precision[],
    sw_ident       text,
    sw_ver         text,
    sw_sys         text,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
