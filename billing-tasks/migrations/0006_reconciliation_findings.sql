-- What the daily reconciliation of the gateway's books with the ledger found, for accounting:
-- money taken that the ledger does not show as paid, ledger successes the gateway does not have,
-- amounts that differ; the same for refunds. Running a day again records nothing twice.
CREATE TABLE reconciliation_finding (
    id                      bigserial PRIMARY KEY,
    day                     date NOT NULL,
    kind                    text NOT NULL CHECK (kind IN ('payment_unknown_to_ledger', 'payment_missing_at_gateway',
                                                          'payment_amount_differs', 'refund_unknown_to_ledger',
                                                          'refund_missing_at_gateway', 'refund_amount_differs')),
    gateway_transaction_id  bigint,
    ledger_id               uuid,      -- the payment or refund in the ledger, when there is one
    amount_minor            bigint,
    currency                char(3),
    detail                  text NOT NULL,
    found_at                timestamptz NOT NULL,
    UNIQUE NULLS NOT DISTINCT (day, kind, gateway_transaction_id, ledger_id)
);
CREATE INDEX reconciliation_finding_day ON reconciliation_finding (day);
