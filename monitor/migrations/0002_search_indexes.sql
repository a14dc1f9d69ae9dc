-- Searches by name prefix (`name:billing.*` is `name LIKE 'billing.%'`) and by name and state
-- together answer from an index. text_pattern_ops serves both equality and prefix LIKE whatever
-- the database's collation.
DROP INDEX tasks_name;
CREATE INDEX tasks_name ON tasks (name text_pattern_ops, received DESC NULLS LAST, uuid DESC);
CREATE INDEX tasks_name_state ON tasks (name, state, received DESC NULLS LAST, uuid DESC);
CREATE INDEX tasks_worker_pattern ON tasks (worker text_pattern_ops);
