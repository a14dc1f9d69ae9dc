-- Every status change of a money object is an allowed one, and is recorded.
--
-- status_transition lists the moves of each state machine (the same as the Transition impls in
-- domain.rs; billing_audit tests that the two agree). A change that is not listed is refused at
-- once (SQLSTATE 23514, constraint <entity>_status_transition). A change that commits without a
-- status_history row for it, written in the same transaction, is refused at commit (SQLSTATE
-- 23514, constraint <entity>_status_history).

CREATE TABLE status_transition (
    entity       text NOT NULL CHECK (entity IN ('subscription', 'invoice', 'payment', 'refund')),
    from_status  text NOT NULL,
    to_status    text NOT NULL,
    PRIMARY KEY (entity, from_status, to_status)
);
INSERT INTO status_transition (entity, from_status, to_status) VALUES
    ('subscription', 'pending', 'active'),
    ('subscription', 'pending', 'abandoned'),
    ('subscription', 'active', 'past_due'),
    ('subscription', 'active', 'expired'),
    ('subscription', 'past_due', 'active'),
    ('subscription', 'past_due', 'expired'),
    ('invoice', 'open', 'paying'),
    ('invoice', 'open', 'void'),
    ('invoice', 'open', 'failed'),
    ('invoice', 'open', 'paid'),
    ('invoice', 'paying', 'paid'),
    ('invoice', 'paying', 'open'),
    ('invoice', 'paying', 'failed'),
    ('invoice', 'failed', 'paid'),
    ('invoice', 'void', 'open'),
    ('payment', 'created', 'processing'),
    ('payment', 'created', 'expired'),
    ('payment', 'created', 'failed'),
    ('payment', 'processing', 'succeeded'),
    ('payment', 'processing', 'declined'),
    ('payment', 'processing', 'awaiting_3ds'),
    ('payment', 'processing', 'failed'),
    ('payment', 'awaiting_3ds', 'processing'),
    ('payment', 'awaiting_3ds', 'expired'),
    ('payment', 'awaiting_3ds', 'succeeded'),
    ('payment', 'awaiting_3ds', 'declined'),
    ('payment', 'failed', 'succeeded'),
    ('payment', 'expired', 'succeeded'),
    ('payment', 'declined', 'succeeded'),
    ('refund', 'requested', 'processing'),
    ('refund', 'processing', 'succeeded'),
    ('refund', 'processing', 'failed'),
    ('refund', 'requested', 'failed'),
    ('refund', 'failed', 'succeeded');

CREATE FUNCTION refuse_status_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM status_transition
                   WHERE entity = TG_ARGV[0] AND from_status = OLD.status AND to_status = NEW.status) THEN
        RAISE EXCEPTION '% %: % -> % is not an allowed transition', TG_ARGV[0], OLD.id, OLD.status, NEW.status
            USING ERRCODE = 'check_violation', CONSTRAINT = TG_ARGV[0] || '_status_transition';
    END IF;
    RETURN NEW;
END $$;

-- The history row must be this transaction's own: its xmin is this transaction's id.
CREATE FUNCTION require_status_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM status_history h
                   WHERE h.entity = TG_ARGV[0] AND h.entity_id = NEW.id
                     AND h.from_status IS NOT DISTINCT FROM OLD.status AND h.to_status = NEW.status
                     AND h.xmin = pg_current_xact_id()::xid) THEN
        RAISE EXCEPTION '% %: % -> % has no status_history row', TG_ARGV[0], NEW.id, OLD.status, NEW.status
            USING ERRCODE = 'check_violation', CONSTRAINT = TG_ARGV[0] || '_status_history';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER subscription_status_transition BEFORE UPDATE OF status ON subscription
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION refuse_status_transition('subscription');
CREATE TRIGGER invoice_status_transition BEFORE UPDATE OF status ON invoice
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION refuse_status_transition('invoice');
CREATE TRIGGER payment_status_transition BEFORE UPDATE OF status ON payment
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION refuse_status_transition('payment');
CREATE TRIGGER refund_status_transition BEFORE UPDATE OF status ON refund
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION refuse_status_transition('refund');

CREATE CONSTRAINT TRIGGER subscription_status_history AFTER UPDATE OF status ON subscription
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION require_status_history('subscription');
CREATE CONSTRAINT TRIGGER invoice_status_history AFTER UPDATE OF status ON invoice
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION require_status_history('invoice');
CREATE CONSTRAINT TRIGGER payment_status_history AFTER UPDATE OF status ON payment
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION require_status_history('payment');
CREATE CONSTRAINT TRIGGER refund_status_history AFTER UPDATE OF status ON refund
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION require_status_history('refund');
