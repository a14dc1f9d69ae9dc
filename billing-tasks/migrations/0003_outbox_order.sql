-- Role messages reach the auth service per user in the order they were written. Each auth.* row
-- gets the next number of its user's stream (taken under that stream row's lock, so numbers follow
-- commit order); delivery never sends a user's message while an earlier one of theirs is
-- undelivered, and the receiver ignores a number not above the last it applied. Numbers increase
-- but may skip (a row dropped by ON CONFLICT DO NOTHING still used its number).

CREATE TABLE outbox_stream (
    user_id   uuid PRIMARY KEY,
    last_seq  bigint NOT NULL CHECK (last_seq >= 1)
);

ALTER TABLE outbox
    ADD COLUMN user_id uuid,
    ADD COLUMN user_seq bigint,
    ADD CONSTRAINT outbox_user_seq_once UNIQUE (user_id, user_seq),
    ADD CONSTRAINT outbox_user_seq_with_user CHECK ((user_id IS NULL) = (user_seq IS NULL));
CREATE INDEX outbox_user_undelivered ON outbox (user_id, user_seq) WHERE status <> 'delivered';

CREATE FUNCTION outbox_user_sequence() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.topic LIKE 'auth.%' AND NEW.payload ? 'user_id' THEN
        NEW.user_id := (NEW.payload ->> 'user_id')::uuid;
        INSERT INTO outbox_stream (user_id, last_seq) VALUES (NEW.user_id, 1)
            ON CONFLICT (user_id) DO UPDATE SET last_seq = outbox_stream.last_seq + 1
            RETURNING last_seq INTO NEW.user_seq;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER outbox_user_sequence BEFORE INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION outbox_user_sequence();
