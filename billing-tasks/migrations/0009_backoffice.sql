-- The back-office (backoffice/): what accounting and support do and see.
--
-- audit_log: every staff action, who, when, on what, how many, why. Append-only: a trigger
-- refuses updates and deletes, whoever connects (the shape staff_auth::audit reads and writes,
-- the same as the task monitor's).
CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,          -- the signed-in member of staff
    action      text NOT NULL,          -- refund.request, refund.approve, subscription.extend, ...
    target      text NOT NULL,          -- the payer the action was about
    count       integer NOT NULL DEFAULT 1 CHECK (count >= 0),
    reason      text,                   -- the reason code and the note
    detail      jsonb NOT NULL DEFAULT '{}',
    request_id  text UNIQUE             -- the form's id: a double submit is one action
);
CREATE INDEX audit_log_at ON audit_log (at DESC, id DESC);
CREATE INDEX audit_log_target ON audit_log (target, at DESC);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();

-- A refund asked for by staff above the approval threshold waits here for a second person.
-- Its amount is held against the payment while it waits (checked in code under the payment's
-- row lock), so two waiting requests never add up to more than is refundable.
CREATE TABLE refund_approval (
    id            uuid PRIMARY KEY,
    payment_id    uuid NOT NULL REFERENCES payment (id),
    payer_id      uuid NOT NULL REFERENCES payer (id),
    amount_minor  bigint NOT NULL CHECK (amount_minor > 0 AND amount_minor <= 1000000000),
    currency      char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    reason        text NOT NULL CHECK (length(reason) BETWEEN 1 AND 600),
    requested_by  text NOT NULL,
    requested_at  timestamptz NOT NULL,
    status        text NOT NULL CHECK (status IN ('pending', 'approved', 'rejected')),
    decided_by    text,
    decided_at    timestamptz,
    decision_note text,
    refund_id     uuid REFERENCES refund (id),
    request_key   text NOT NULL UNIQUE,   -- the form's id
    CHECK ((status = 'pending') = (decided_at IS NULL)),
    CHECK (status <> 'approved' OR refund_id IS NOT NULL),
    -- The second person is never the first.
    CHECK (decided_by IS NULL OR decided_by <> requested_by)
);
CREATE INDEX refund_approval_pending ON refund_approval (requested_at) WHERE status = 'pending';
CREATE INDEX refund_approval_payment ON refund_approval (payment_id);
CREATE INDEX refund_approval_payer ON refund_approval (payer_id, requested_at DESC);

-- A reconciliation finding or an unmatched gateway notification is a fact; staff mark it
-- resolved here, once, with what they did.
CREATE TABLE resolution (
    kind         text NOT NULL CHECK (kind IN ('finding', 'notification')),
    item_id      bigint NOT NULL,       -- reconciliation_finding.id or gateway_event.id
    resolved_by  text NOT NULL,
    resolved_at  timestamptz NOT NULL,
    note         text NOT NULL CHECK (length(note) BETWEEN 1 AND 600),
    PRIMARY KEY (kind, item_id)
);

-- Every webhook delivery received, whether or not its signature held: the HMAC result, our
-- answer, and the gateway_event it was recorded as (whose outcome is the ledger change).
CREATE TABLE webhook_receipt (
    id           bigserial PRIMARY KEY,
    received_at  timestamptz NOT NULL,
    kind         text NOT NULL CHECK (length(kind) BETWEEN 1 AND 40),
    hmac_ok      boolean NOT NULL,
    http_status  integer NOT NULL,
    answer       text NOT NULL,
    gateway_transaction_id bigint,
    event_id     bigint REFERENCES gateway_event (id) ON DELETE SET NULL,
    body_bytes   integer NOT NULL
);
CREATE INDEX webhook_receipt_at ON webhook_receipt (received_at DESC, id DESC);
CREATE INDEX webhook_receipt_txn ON webhook_receipt (gateway_transaction_id);

-- Search and lists over millions of rows.
CREATE INDEX payment_created ON payment (created_at DESC, id DESC);
CREATE INDEX payment_status_created ON payment (status, created_at DESC, id DESC);
CREATE INDEX payment_amount ON payment (amount_minor, created_at DESC);
CREATE INDEX payment_method_id ON payment (payment_method_id);
CREATE INDEX payment_method_last_four ON payment_method ((right(card_mask, 4)), card_exp);
CREATE INDEX invoice_payer ON invoice (payer_id, created_at DESC);
CREATE INDEX invoice_created ON invoice (created_at DESC, id DESC);
CREATE INDEX subscription_payer ON subscription (payer_id);
CREATE INDEX subscription_created ON subscription (created_at DESC, id DESC);
CREATE INDEX refund_created ON refund (created_at DESC, id DESC);
CREATE INDEX gateway_event_txn ON gateway_event (gateway_transaction_id);
CREATE INDEX gateway_event_invoice ON gateway_event (invoice_id);
CREATE INDEX gateway_event_received ON gateway_event (received_at DESC, id DESC);
CREATE INDEX outbox_user ON outbox ((payload ->> 'user_id'), created_at);
CREATE INDEX outbox_dead ON outbox (created_at) WHERE status = 'dead';
-- The search by email (lower(email) = $1) without reading every payer.
CREATE INDEX payer_email ON payer (lower(email));
-- The payer's page: its timeline (status_history WHERE entity_id = ANY($1), every entity at
-- once, which status_history_entity, leading with the entity, cannot serve) and its
-- notifications (... OR payload ->> 'AccountId' = $3: without this index the OR reads every
-- notification).
CREATE INDEX status_history_entity_id ON status_history (entity_id);
CREATE INDEX gateway_event_account ON gateway_event ((payload ->> 'AccountId'));
-- The unmatched notifications: the home page's count and their queue.
CREATE INDEX gateway_event_unmatched ON gateway_event (received_at) WHERE outcome IN ('unmatched', 'unmatched refund');

-- Staff an admin manages in the back-office, beside the ones configured in BACKOFFICE_USERS
-- (a configured name wins). Passwords are Argon2id PHC hashes; a disabled user cannot sign in
-- and their sessions end. Rows are never deleted, so the audit log's names stay meaningful.
CREATE TABLE staff_user (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9._-]{1,63}$'),
    role        text NOT NULL CHECK (role IN ('support', 'accountant', 'admin')),
    hash        text NOT NULL CHECK (hash LIKE '$argon2%'),
    disabled    boolean NOT NULL DEFAULT false,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);
