-- The tariffs the cinema sells at launch.
INSERT INTO tariff (id, code, name, description, role, price_minor, currency, period_unit, period_count, created_at, updated_at) VALUES
    ('0b4b6f0e-2d3c-4c55-9b51-6c1c7c000001', 'monthly', 'Subscriber, monthly', 'All films and series, billed every month', 'subscriber', 29900, 'RUB', 'month', 1, '2026-11-01T00:00:00Z', '2026-11-01T00:00:00Z'),
    ('0b4b6f0e-2d3c-4c55-9b51-6c1c7c000002', 'yearly', 'Subscriber, yearly', 'All films and series, billed every year', 'subscriber', 299000, 'RUB', 'year', 1, '2026-11-01T00:00:00Z', '2026-11-01T00:00:00Z'),
    ('0b4b6f0e-2d3c-4c55-9b51-6c1c7c000003', 'weekly-trial', 'Subscriber, weekly', 'All films and series, billed every week', 'subscriber', 9900, 'RUB', 'day', 7, '2026-11-01T00:00:00Z', '2026-11-01T00:00:00Z');
