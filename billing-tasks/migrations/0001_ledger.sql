-- The billing ledger. Money is integer minor units with its currency. The constraints refuse what the
-- code must never write: unknown states, negative or absurd amounts, a second live subscription per
-- payer, a second invoice per subscription and period, two attempts in flight or two successes per
-- invoice, a card cryptogram kept after its payment left the `created` state.

CREATE TABLE payer (
    id          uuid PRIMARY KEY,            -- the auth service's user id
    email       text CHECK (email IS NULL OR length(email) BETWEEN 3 AND 254),
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);

CREATE TABLE tariff (
    id            uuid PRIMARY KEY,
    code          text NOT NULL UNIQUE CHECK (code ~ '^[a-z0-9][a-z0-9_-]{0,63}$'),
    name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description   text,
    role          text NOT NULL CHECK (length(role) BETWEEN 1 AND 100),  -- auth role granted while active
    price_minor   bigint NOT NULL CHECK (price_minor > 0 AND price_minor <= 1000000000),
    currency      char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    period_unit   text NOT NULL CHECK (period_unit IN ('day', 'month', 'year')),
    period_count  integer NOT NULL CHECK (period_count BETWEEN 1 AND 36),
    is_active     boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);

CREATE TABLE payment_method (
    id          uuid PRIMARY KEY,
    payer_id    uuid NOT NULL REFERENCES payer (id),
    token       text NOT NULL UNIQUE CHECK (length(token) BETWEEN 1 AND 512),  -- the gateway's card token
    card_mask   text CHECK (card_mask IS NULL OR card_mask ~ '^[0-9]{0,6}\*+[0-9]{0,4}$'),
    card_type   text,
    card_exp    text CHECK (card_exp IS NULL OR card_exp ~ '^[0-9]{2}/[0-9]{2}$'),
    revoked_at  timestamptz,
    created_at  timestamptz NOT NULL
);
CREATE INDEX payment_method_payer ON payment_method (payer_id);

CREATE TABLE subscription (
    id                    uuid PRIMARY KEY,
    payer_id              uuid NOT NULL REFERENCES payer (id),
    tariff_id             uuid NOT NULL REFERENCES tariff (id),
    status                text NOT NULL CHECK (status IN ('pending', 'active', 'past_due', 'expired', 'abandoned')),
    auto_renew            boolean NOT NULL DEFAULT true,
    current_period_start  timestamptz,
    current_period_end    timestamptz,
    grace_until           timestamptz,
    canceled_at           timestamptz,
    cancel_reason         text,
    payment_method_id     uuid REFERENCES payment_method (id),
    created_at            timestamptz NOT NULL,
    updated_at            timestamptz NOT NULL,
    -- Anything that was ever paid for has a period; a pending one has none yet.
    CHECK (status IN ('pending', 'abandoned') OR (current_period_start IS NOT NULL AND current_period_end > current_period_start)),
    CHECK (status <> 'past_due' OR grace_until IS NOT NULL)
);
-- One live subscription per payer.
CREATE UNIQUE INDEX subscription_one_live_per_payer ON subscription (payer_id)
    WHERE status IN ('pending', 'active', 'past_due');
CREATE INDEX subscription_renewal_due ON subscription (current_period_end)
    WHERE status IN ('active', 'past_due');

CREATE TABLE invoice (
    id               uuid PRIMARY KEY,
    subscription_id  uuid NOT NULL REFERENCES subscription (id),
    payer_id         uuid NOT NULL REFERENCES payer (id),
    kind             text NOT NULL CHECK (kind IN ('initial', 'renewal')),
    period_start     timestamptz NOT NULL,
    period_end       timestamptz NOT NULL CHECK (period_end > period_start),
    amount_minor     bigint NOT NULL CHECK (amount_minor > 0 AND amount_minor <= 1000000000),
    currency         char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    status           text NOT NULL CHECK (status IN ('open', 'paying', 'paid', 'failed', 'void')),
    attempt_count    integer NOT NULL DEFAULT 0 CHECK (attempt_count BETWEEN 0 AND 100),
    next_attempt_at  timestamptz,
    paid_at          timestamptz,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    -- One invoice per subscription and period.
    UNIQUE (subscription_id, period_start),
    CHECK ((status = 'paid') = (paid_at IS NOT NULL))
);
CREATE INDEX invoice_due ON invoice (next_attempt_at) WHERE status = 'open' AND kind = 'renewal';

CREATE TABLE payment (
    id                      uuid PRIMARY KEY,  -- also the X-Request-ID of the gateway call
    invoice_id              uuid NOT NULL REFERENCES invoice (id),
    attempt                 integer NOT NULL CHECK (attempt >= 1),
    method                  text NOT NULL CHECK (method IN ('cryptogram', 'token')),
    status                  text NOT NULL CHECK (status IN ('created', 'processing', 'awaiting_3ds', 'succeeded', 'declined', 'expired', 'failed')),
    amount_minor            bigint NOT NULL CHECK (amount_minor > 0 AND amount_minor <= 1000000000),
    currency                char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    idempotency_key         text NOT NULL UNIQUE CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    gateway_transaction_id  bigint UNIQUE,
    ip_address              text,
    cardholder_name         text,
    cryptogram              text,    -- only until the gateway call: see the CHECK below
    pa_res                  text,    -- the bank's 3-D Secure answer, only until it is posted
    acs_url                 text,
    pa_req                  text,
    reason_code             integer,
    reason                  text,
    card_holder_message     text,
    payment_method_id       uuid REFERENCES payment_method (id),
    sent_at                 timestamptz,  -- the gateway call began (X-Request-ID replays last an hour)
    lookup_until            timestamptz,  -- a run is looking up this attempt's unknown outcome until then
    completed_at            timestamptz,
    duplicate               boolean NOT NULL DEFAULT false,  -- a success for something already paid or ended (refunded)
    created_at              timestamptz NOT NULL,
    updated_at              timestamptz NOT NULL,
    UNIQUE (invoice_id, attempt),
    -- A cryptogram is used once: it may exist only before the call.
    CHECK (cryptogram IS NULL OR status = 'created'),
    CHECK (pa_res IS NULL OR status = 'awaiting_3ds'),
    CHECK (method = 'cryptogram' OR cryptogram IS NULL),
    CHECK (status <> 'succeeded' OR gateway_transaction_id IS NOT NULL),
    CHECK (status <> 'awaiting_3ds' OR (gateway_transaction_id IS NOT NULL AND acs_url IS NOT NULL AND pa_req IS NOT NULL)),
    CHECK (status NOT IN ('processing', 'awaiting_3ds') OR sent_at IS NOT NULL)
);
-- At most one attempt in flight, and at most one success, per invoice.
CREATE UNIQUE INDEX payment_one_in_flight_per_invoice ON payment (invoice_id)
    WHERE status IN ('created', 'processing', 'awaiting_3ds');
CREATE UNIQUE INDEX payment_one_success_per_invoice ON payment (invoice_id) WHERE status = 'succeeded' AND NOT duplicate;
CREATE INDEX payment_unsettled ON payment (status, sent_at) WHERE status IN ('created', 'processing', 'awaiting_3ds');

CREATE TABLE refund (
    id                      uuid PRIMARY KEY,  -- also the X-Request-ID of the gateway call
    payment_id              uuid NOT NULL REFERENCES payment (id),
    amount_minor            bigint NOT NULL CHECK (amount_minor > 0 AND amount_minor <= 1000000000),
    currency                char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    reason                  text NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    requested_by            text NOT NULL CHECK (requested_by ~ '^(user|staff:.+|system)$'),
    status                  text NOT NULL CHECK (status IN ('requested', 'processing', 'succeeded', 'failed')),
    idempotency_key         text NOT NULL UNIQUE,
    gateway_transaction_id  bigint UNIQUE,
    failure                 text,
    sent_at                 timestamptz,  -- the first gateway call (X-Request-ID replays last an hour)
    created_at              timestamptz NOT NULL,
    updated_at              timestamptz NOT NULL,
    CHECK (status <> 'succeeded' OR gateway_transaction_id IS NOT NULL)
);
CREATE INDEX refund_payment ON refund (payment_id);

-- Never refund more than was paid: checked under the payment's row lock in code, and again here.
CREATE FUNCTION refund_within_payment() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    paid bigint;
    refunded bigint;
BEGIN
    SELECT amount_minor INTO paid FROM payment WHERE id = NEW.payment_id;
    SELECT coalesce(sum(amount_minor), 0) INTO refunded FROM refund
        WHERE payment_id = NEW.payment_id AND status <> 'failed' AND id <> NEW.id;
    IF NEW.status <> 'failed' AND refunded + NEW.amount_minor > paid THEN
        RAISE EXCEPTION 'refunds of payment % would exceed its amount (% + % > %)', NEW.payment_id, refunded, NEW.amount_minor, paid
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refund_within_payment BEFORE INSERT OR UPDATE ON refund
    FOR EACH ROW EXECUTE FUNCTION refund_within_payment();

CREATE TABLE gateway_event (
    id                      bigserial PRIMARY KEY,
    kind                    text NOT NULL CHECK (kind IN ('check', 'pay', 'fail', 'confirm', 'refund', 'recurrent', 'cancel')),
    gateway_transaction_id  bigint,
    invoice_id              text,
    payload                 jsonb NOT NULL,
    received_at             timestamptz NOT NULL,
    processed_at            timestamptz,
    outcome                 text
);
-- A notification is processed once per transaction (the gateway retries deliveries).
CREATE UNIQUE INDEX gateway_event_once ON gateway_event (kind, gateway_transaction_id)
    WHERE gateway_transaction_id IS NOT NULL AND kind <> 'check';

CREATE TABLE outbox (
    id               uuid PRIMARY KEY,
    topic            text NOT NULL CHECK (topic ~ '^(auth|notify)\.[a-z_.]+$'),
    dedupe_key       text NOT NULL UNIQUE,
    payload          jsonb NOT NULL,
    status           text NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  timestamptz NOT NULL,
    last_error       text,
    created_at       timestamptz NOT NULL,
    delivered_at     timestamptz,
    CHECK ((status = 'delivered') = (delivered_at IS NOT NULL))
);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE status = 'pending';

CREATE TABLE status_history (
    id           bigserial PRIMARY KEY,
    entity       text NOT NULL CHECK (entity IN ('subscription', 'invoice', 'payment', 'refund')),
    entity_id    uuid NOT NULL,
    from_status  text,
    to_status    text NOT NULL,
    actor        text NOT NULL,
    reason       text,
    at           timestamptz NOT NULL
);
CREATE INDEX status_history_entity ON status_history (entity, entity_id, at);
