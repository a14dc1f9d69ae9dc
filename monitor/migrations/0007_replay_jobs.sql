-- A bulk dead-letter replay is a tracked job too: its filter names the dead-letter queue, its
-- total is the count the operator was shown, and its items are the messages as it replays them.
ALTER TABLE jobs DROP CONSTRAINT jobs_kind_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_kind_check CHECK (kind IN ('retry', 'revoke', 'replay'));
