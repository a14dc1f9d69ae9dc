-- Retention deletes by state and age (`timestamp`, the last event's time).
CREATE INDEX tasks_state_timestamp ON tasks (state, "timestamp");
