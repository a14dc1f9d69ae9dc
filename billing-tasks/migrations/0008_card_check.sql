-- UpdatePaymentMethod on a healthy subscription (no renewal due): the new card is proved by a
-- two-stage authorisation of a small amount (`payments/cards/auth`), and that authorisation is
-- released at once (`payments/void`), so no money stays held. The card's token becomes the
-- subscription's payment method only when the authorisation was approved (card_check.rs).
--
-- card_check is one gateway attempt, like a payment row: its id is the auth call's X-Request-ID
-- and its InvoiceId (what `payments/find` looks up after an unknown outcome). card_hold is the
-- money an approved check holds until the void is confirmed (`held → released`).

CREATE TABLE card_check (
    id                      uuid PRIMARY KEY,
    subscription_id         uuid NOT NULL REFERENCES subscription (id),
    payer_id                uuid NOT NULL REFERENCES payer (id),
    status                  text NOT NULL CHECK (status IN ('created', 'processing', 'awaiting_3ds', 'succeeded', 'declined', 'failed', 'expired')),
    amount_minor            bigint NOT NULL CHECK (amount_minor > 0),
    currency                text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    idempotency_key         text NOT NULL UNIQUE CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    ip_address              text,
    cardholder_name         text,
    cryptogram              text,  -- sealed; only until the call
    pa_res                  text,  -- sealed; only until the call
    acs_url                 text,
    pa_req                  text,
    gateway_transaction_id  bigint,
    payment_method_id       uuid REFERENCES payment_method (id),  -- the new card, on success
    reason_code             integer,
    reason                  text,
    card_holder_message     text,
    sent_at                 timestamptz,
    completed_at            timestamptz,
    created_at              timestamptz NOT NULL,
    updated_at              timestamptz NOT NULL,
    CHECK (cryptogram IS NULL OR status = 'created'),
    CHECK (pa_res IS NULL OR status = 'awaiting_3ds'),
    CHECK (status <> 'succeeded' OR (gateway_transaction_id IS NOT NULL AND payment_method_id IS NOT NULL))
);
-- One check in flight per subscription.
CREATE UNIQUE INDEX card_check_one_in_flight ON card_check (subscription_id)
    WHERE status IN ('created', 'processing', 'awaiting_3ds');
CREATE INDEX card_check_unsettled ON card_check (updated_at)
    WHERE status IN ('created', 'processing', 'awaiting_3ds');

CREATE TABLE card_hold (
    id                      uuid PRIMARY KEY REFERENCES card_check (id),
    gateway_transaction_id  bigint NOT NULL UNIQUE,
    amount_minor            bigint NOT NULL CHECK (amount_minor > 0),
    currency                text NOT NULL,
    status                  text NOT NULL CHECK (status IN ('held', 'released')),
    void_attempts           integer NOT NULL DEFAULT 0,
    last_void_at            timestamptz,
    released_at             timestamptz,
    created_at              timestamptz NOT NULL,
    updated_at              timestamptz NOT NULL,
    CHECK (status <> 'released' OR released_at IS NOT NULL)
);
CREATE INDEX card_hold_held ON card_hold (created_at) WHERE status = 'held';

-- Both are state machines like the others (0005): listed moves only, each with its history row.
ALTER TABLE status_transition DROP CONSTRAINT status_transition_entity_check;
ALTER TABLE status_transition ADD CONSTRAINT status_transition_entity_check
    CHECK (entity IN ('subscription', 'invoice', 'payment', 'refund', 'card_check', 'card_hold'));
ALTER TABLE status_history DROP CONSTRAINT status_history_entity_check;
ALTER TABLE status_history ADD CONSTRAINT status_history_entity_check
    CHECK (entity IN ('subscription', 'invoice', 'payment', 'refund', 'card_check', 'card_hold'));
INSERT INTO status_transition (entity, from_status, to_status) VALUES
    ('card_check', 'created', 'processing'),
    ('card_check', 'created', 'failed'),
    ('card_check', 'created', 'expired'),
    ('card_check', 'processing', 'succeeded'),
    ('card_check', 'processing', 'declined'),
    ('card_check', 'processing', 'awaiting_3ds'),
    ('card_check', 'processing', 'failed'),
    ('card_check', 'awaiting_3ds', 'processing'),
    ('card_check', 'awaiting_3ds', 'expired'),
    ('card_check', 'awaiting_3ds', 'succeeded'),
    ('card_check', 'awaiting_3ds', 'declined'),
    ('card_hold', 'held', 'released');

CREATE TRIGGER card_check_status_transition BEFORE UPDATE OF status ON card_check
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION refuse_status_transition('card_check');
CREATE TRIGGER card_hold_status_transition BEFORE UPDATE OF status ON card_hold
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION refuse_status_transition('card_hold');
CREATE CONSTRAINT TRIGGER card_check_status_history AFTER UPDATE OF status ON card_check
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION require_status_history('card_check');
CREATE CONSTRAINT TRIGGER card_hold_status_history AFTER UPDATE OF status ON card_hold
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION require_status_history('card_hold');
