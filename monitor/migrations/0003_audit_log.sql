-- Every action taken through the monitor (retry, revoke, worker controls, sending a task): who,
-- when, what, on what, how many, and why. Rows are only ever added.
CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    -- The signed-in user, or what an authenticating proxy said, or 'anonymous'.
    actor       text NOT NULL,
    -- `task.retry`, `task.revoke`, `task.send`, `worker.shutdown`, `worker.pool_grow`, ...
    action      text NOT NULL,
    -- A task id, a worker node name, a task name.
    target      text NOT NULL,
    count       integer NOT NULL DEFAULT 1 CHECK (count >= 0),
    reason      text,
    -- Action-specific facts (the new task id of a retry, the arguments of a control command).
    detail      jsonb NOT NULL DEFAULT '{}',
    -- The form's or caller's id for this request: the same request twice is done once.
    request_id  text UNIQUE
);

CREATE INDEX audit_log_at ON audit_log (at DESC, id DESC);
CREATE INDEX audit_log_target ON audit_log (target, at DESC);

-- The log is append-only: no update or delete, whoever connects.
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
