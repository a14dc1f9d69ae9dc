-- A terminal whose calls the gateway refuses because of our own setup (rotated API secret, wrong
-- URL): charging is paused for it until a probe gets through. While a pause stands nobody is
-- charged, and nobody's grace period runs out (see renewals.rs).
CREATE TABLE gateway_pause (
    public_id      text PRIMARY KEY CHECK (length(public_id) BETWEEN 1 AND 200),
    reason         text NOT NULL CHECK (length(reason) BETWEEN 1 AND 1000),
    since          timestamptz NOT NULL,
    next_probe_at  timestamptz NOT NULL
);
