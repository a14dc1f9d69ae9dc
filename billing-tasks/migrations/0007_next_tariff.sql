-- ChangeTariff: a subscription may switch tariff from its next period. The renewal invoice for
-- that period is created with the new tariff's price and period, and the subscription moves to
-- it, in the same insert (so the renewal code needs no change and no renewal can miss it).

ALTER TABLE subscription ADD COLUMN next_tariff_id uuid REFERENCES tariff (id);

CREATE FUNCTION invoice_apply_next_tariff() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    t tariff%ROWTYPE;
BEGIN
    IF NEW.kind <> 'renewal' THEN
        RETURN NEW;
    END IF;
    -- An insert that will conflict (the period's invoice exists) must not move the tariff.
    IF EXISTS (SELECT 1 FROM invoice WHERE subscription_id = NEW.subscription_id AND period_start = NEW.period_start) THEN
        RETURN NEW;
    END IF;
    SELECT tariff.* INTO t FROM subscription s JOIN tariff ON tariff.id = s.next_tariff_id
        WHERE s.id = NEW.subscription_id;
    IF FOUND THEN
        NEW.amount_minor := t.price_minor;
        NEW.currency := t.currency;
        NEW.period_end := (NEW.period_start AT TIME ZONE 'UTC' + CASE t.period_unit
                WHEN 'day' THEN make_interval(days => t.period_count)
                WHEN 'month' THEN make_interval(months => t.period_count)
                ELSE make_interval(years => t.period_count) END) AT TIME ZONE 'UTC';
        UPDATE subscription SET tariff_id = t.id, next_tariff_id = NULL WHERE id = NEW.subscription_id;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER invoice_apply_next_tariff BEFORE INSERT ON invoice
    FOR EACH ROW EXECUTE FUNCTION invoice_apply_next_tariff();
