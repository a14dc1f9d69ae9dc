-- Bulk actions by filter: a job retries or revokes every task a task-list filter matched when
-- it was started (the items, fixed then), one at a time, with progress and abort.
CREATE TABLE jobs (
    id              bigserial PRIMARY KEY,
    kind            text NOT NULL CHECK (kind IN ('retry', 'revoke')),
    -- The task list's filter (search, state, taskname, workername), as the operator gave it.
    filter          jsonb NOT NULL,
    total           integer NOT NULL CHECK (total >= 0),
    actor           text NOT NULL,
    reason          text NOT NULL,
    state           text NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'done', 'aborted')),
    abort_requested boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    -- The form's id: the same form twice starts one job.
    request_id      text UNIQUE
);

CREATE TABLE job_items (
    job_id  bigint NOT NULL REFERENCES jobs (id),
    seq     integer NOT NULL,
    task_id text NOT NULL,
    status  text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'skipped', 'failed')),
    message text,
    PRIMARY KEY (job_id, seq)
);

CREATE INDEX job_items_pending ON job_items (job_id, seq) WHERE status = 'pending';
CREATE INDEX jobs_created ON jobs (created_at DESC, id DESC);
