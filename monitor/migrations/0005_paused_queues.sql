-- Queues whose consumption the monitor paused: the workers it told to stop consuming each, so
-- resuming tells the same ones to start again.
CREATE TABLE paused_queues (
    queue     text PRIMARY KEY,
    workers   text[] NOT NULL,
    actor     text NOT NULL,
    reason    text NOT NULL,
    paused_at timestamptz NOT NULL DEFAULT now()
);
