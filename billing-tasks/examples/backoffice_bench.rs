//! How the back-office's reads answer over a large ledger: creates a scratch database, loads
//! `--payments` payments (1,000,000 by default) with everything around them (payers, cards,
//! subscriptions, one invoice per payment, refunds, the status history, the gateway's
//! notifications, the outbox), then times the search, the lists, the home page's counts and the
//! payer's page through the same `backoffice::data` functions the pages call. The goal is under
//! 100 ms for each (median and p95).
//!
//! ```sh
//! cargo run --release -p billing-tasks --example backoffice_bench                # 1,000,000
//! cargo run --release -p billing-tasks --example backoffice_bench -- --payments 100000 --runs 50
//! cargo run --release -p billing-tasks --example backoffice_bench -- --payments 20000 --checked
//! ```
//!
//! The load is set-based SQL, one `INSERT … SELECT` per table. It runs with
//! `session_replication_role = replica` (the superuser's switch that skips triggers and foreign
//! key checks) unless `--checked`: the data is consistent by construction (`--checked` proves it
//! at a smaller size: every foreign key, the refund-within-payment trigger, the outbox sequence
//! trigger and the uniqueness rules hold). Then `VACUUM ANALYZE`, as autovacuum would leave a
//! table in steady state. The database is dropped at the end unless `--keep`.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context;
use billing_tasks::backoffice::data::{
    self, InvoiceFilter, PAGE, PaymentFilter, RefundFilter, SubscriptionFilter,
};
use chrono::{DateTime, Duration as Days, NaiveDate, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// The back-office bench: the search, lists, counts and payer page over a large ledger.
#[derive(Debug, clap::Parser)]
#[command(name = "backoffice_bench")]
struct Settings {
    /// Payments to load (one invoice each, spread over the last 365 days).
    #[arg(long, default_value_t = 1_000_000)]
    payments: i64,
    /// Payers, each with one card and one subscription [default: payments / 4].
    #[arg(long)]
    payers: Option<i64>,
    /// Timed runs of each query (after the warm-up runs).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Untimed runs of each query first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Pages of the payments list walked with the keyset cursor before the deep page is timed.
    #[arg(long, default_value_t = 200)]
    deep_pages: usize,
    /// The goal per query, in milliseconds (median and p95).
    #[arg(long, default_value_t = 100.0)]
    budget_ms: f64,
    /// The PostgreSQL server (a database name or query in it is ignored, but `sslmode` is
    /// kept); the bench creates its own database there.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    database_url: String,
    /// Keep the database at the end (its name is printed).
    #[arg(long)]
    keep: bool,
    /// Load with triggers and foreign-key checks on (slower; proves the data satisfies them).
    #[arg(long)]
    checked: bool,
}

/// The load, one statement per table. `$1` payments, `$2` payers, `$3` now.
const LOAD: &[(&str, &str)] = &[
    (
        "payer",
        "INSERT INTO payer (id, email, created_at, updated_at)
         SELECT md5('payer' || i)::uuid, CASE WHEN i % 10 <> 0 THEN 'user' || i || '@example.com' END, c, c
         FROM (SELECT i, $3 - interval '400 days' + random() * interval '30 days' AS c
               FROM generate_series(1, $2) AS i) x",
    ),
    (
        "payment_method",
        "INSERT INTO payment_method (id, payer_id, token, card_mask, card_type, card_exp, created_at)
         SELECT md5('pm' || i)::uuid, md5('payer' || i)::uuid, 'tk_bench_' || i,
                '400000******' || lpad(floor(random() * 10000)::int::text, 4, '0'), 'Visa',
                lpad((1 + floor(random() * 12))::int::text, 2, '0') || '/' || (27 + floor(random() * 4))::int,
                $3 - interval '369 days' + random() * interval '1 day'
         FROM generate_series(1, $2) AS i",
    ),
    (
        // 70 % monthly, 20 % yearly, 10 % weekly; 70 % active, 5 % past due, 13 % expired,
        // 5 % abandoned, 7 % pending.
        "subscription",
        "INSERT INTO subscription (id, payer_id, tariff_id, status, auto_renew, current_period_start, current_period_end,
                                   grace_until, canceled_at, cancel_reason, payment_method_id, created_at, updated_at)
         SELECT md5('sub' || i)::uuid, md5('payer' || i)::uuid, t.id, st, st NOT IN ('expired', 'abandoned'),
                ps, ps + per, CASE WHEN st = 'past_due' THEN ps + per + interval '7 days' END,
                CASE WHEN st = 'expired' THEN ps + per END, CASE WHEN st = 'expired' THEN 'not renewed' END,
                md5('pm' || i)::uuid, c, c
         FROM (SELECT i, u, v, $3 - interval '366 days' + v * interval '1 day' AS c,
                      CASE WHEN r < 0.70 THEN 'active' WHEN r < 0.75 THEN 'past_due' WHEN r < 0.88 THEN 'expired'
                           WHEN r < 0.93 THEN 'abandoned' ELSE 'pending' END AS st
               FROM (SELECT i, random() AS u, random() AS r, random() AS v FROM generate_series(1, $2) AS i) y) x
         JOIN tariff t ON t.code = CASE WHEN x.u < 0.70 THEN 'monthly' WHEN x.u < 0.90 THEN 'yearly' ELSE 'weekly-trial' END
         CROSS JOIN LATERAL (SELECT CASE t.period_unit WHEN 'day' THEN make_interval(days => t.period_count)
                                         WHEN 'month' THEN make_interval(months => t.period_count)
                                         ELSE make_interval(years => t.period_count) END AS per) p
         CROSS JOIN LATERAL (SELECT CASE x.st WHEN 'active' THEN $3 - x.v * interval '6 days'
                                         WHEN 'past_due' THEN $3 - p.per - x.v * interval '3 days'
                                         WHEN 'expired' THEN $3 - p.per - interval '30 days' - x.v * interval '60 days'
                                         END AS ps) q",
    ),
    (
        // Invoice j is payer ((j - 1) % payers + 1)'s number (j - 1) / payers: each payer's
        // invoices fall in disjoint slices of the year, so (subscription, period_start) is
        // unique. 90 % paid, 9.95 % failed, 0.05 % paying (a payment in flight).
        "invoice",
        "INSERT INTO invoice (id, subscription_id, payer_id, kind, period_start, period_end, amount_minor, currency, status,
                              attempt_count, paid_at, created_at, updated_at)
         SELECT md5('inv' || x.j)::uuid, s.id, s.payer_id, CASE WHEN x.k = 0 THEN 'initial' ELSE 'renewal' END,
                x.c, x.c + CASE t.period_unit WHEN 'day' THEN make_interval(days => t.period_count)
                               WHEN 'month' THEN make_interval(months => t.period_count)
                               ELSE make_interval(years => t.period_count) END,
                t.price_minor, t.currency, x.st, 1, CASE WHEN x.st = 'paid' THEN x.c + interval '4 seconds' END,
                x.c, x.c + interval '4 seconds'
         FROM (SELECT j, i, k,
                      $3 - interval '365 days' + (k + u * 0.98) * (interval '365 days' / (($1 + $2 - 1) / $2)) AS c,
                      CASE WHEN r < 0.90 THEN 'paid' WHEN r < 0.9995 THEN 'failed' ELSE 'paying' END AS st
               FROM (SELECT j, (j - 1) % $2 + 1 AS i, (j - 1) / $2 AS k, random() AS u, random() AS r
                     FROM generate_series(1, $1) AS j) y) x
         JOIN subscription s ON s.id = md5('sub' || x.i)::uuid
         JOIN tariff t ON t.id = s.tariff_id",
    ),
    (
        // One attempt per invoice: paid → succeeded, paying → processing (stuck), failed →
        // 85 % declined (with a reason code), 10 % failed, 5 % expired.
        "payment",
        "INSERT INTO payment (id, invoice_id, attempt, method, status, amount_minor, currency, idempotency_key,
                              gateway_transaction_id, ip_address, reason_code, reason, card_holder_message, payment_method_id,
                              sent_at, completed_at, created_at, updated_at)
         SELECT id, invoice_id, 1, CASE WHEN kind = 'initial' THEN 'cryptogram' ELSE 'token' END, st, amount_minor, currency,
                'bench:' || id, CASE WHEN st IN ('succeeded', 'declined') THEN 1000000000 + rn END, '10.0.0.' || (rn % 250),
                CASE WHEN st = 'declined' THEN (ARRAY[5051, 5051, 5051, 5005, 5054, 5057, 5065, 5082, 5091, 5006])[ix] END,
                CASE WHEN st = 'declined' THEN (ARRAY['InsufficientFunds', 'InsufficientFunds', 'InsufficientFunds',
                     'DoNotHonor', 'ExpiredCard', 'TransactionNotPermitted', 'ExceedWithdrawalFrequency', 'WrongCVV',
                     'IssuerNotFound', 'HonorWithId'])[ix] END,
                CASE WHEN st = 'declined' THEN 'Операция отклонена' END,
                payment_method_id, c + interval '1 second',
                CASE WHEN st <> 'processing' THEN c + interval '3 seconds' END, c, c + interval '3 seconds'
         FROM (SELECT gen_random_uuid() AS id, i.id AS invoice_id, i.kind, i.amount_minor, i.currency, s.payment_method_id,
                      i.created_at + interval '1 second' AS c, rn, 1 + floor(q * 10)::int AS ix,
                      CASE i.status WHEN 'paid' THEN 'succeeded' WHEN 'paying' THEN 'processing'
                           ELSE CASE WHEN r < 0.85 THEN 'declined' WHEN r < 0.95 THEN 'failed' ELSE 'expired' END END AS st
               FROM (SELECT *, row_number() OVER () AS rn, random() AS r, random() AS q FROM invoice) i
               JOIN subscription s ON s.id = i.subscription_id) x",
    ),
    (
        // 2 % of the successes, at most one refund each: 70 % full, 30 % half.
        "refund",
        "INSERT INTO refund (id, payment_id, amount_minor, currency, reason, requested_by, status, idempotency_key,
                             gateway_transaction_id, failure, sent_at, created_at, updated_at)
         SELECT id, payment_id, CASE WHEN a < 0.7 THEN amount_minor ELSE amount_minor / 2 END, currency,
                CASE WHEN a < 0.5 THEN 'customer request' ELSE 'double charge' END,
                CASE WHEN b < 0.6 THEN 'user' WHEN b < 0.95 THEN 'staff:support' ELSE 'system' END, st,
                'bench-refund:' || id, CASE WHEN st = 'succeeded' THEN 3000000000 + rn END,
                CASE WHEN st = 'failed' THEN 'gateway refused' END,
                CASE WHEN st <> 'requested' THEN c + interval '1 second' END, c, c + interval '5 seconds'
         FROM (SELECT gen_random_uuid() AS id, p.id AS payment_id, p.amount_minor, p.currency, a, b, rn,
                      least(p.created_at + b * interval '20 days', $3 - interval '1 minute') AS c,
                      CASE WHEN r < 0.90 THEN 'succeeded' WHEN r < 0.95 THEN 'failed' WHEN r < 0.98 THEN 'processing'
                           ELSE 'requested' END AS st
               FROM (SELECT *, row_number() OVER () AS rn, random() AS a, random() AS b, random() AS r
                     FROM payment WHERE status = 'succeeded' AND random() < 0.02) p) x",
    ),
    (
        // Every move of every state machine, as the ledger records them.
        "status_history",
        "INSERT INTO status_history (entity, entity_id, from_status, to_status, actor, reason, at)
         SELECT 'subscription', id, NULL, 'pending', 'user', NULL, created_at FROM subscription
         UNION ALL SELECT 'subscription', id, 'pending', status, 'worker', NULL, created_at + interval '5 seconds'
                   FROM subscription WHERE status <> 'pending'
         UNION ALL SELECT 'invoice', id, NULL, 'open', 'worker', NULL, created_at FROM invoice
         UNION ALL SELECT 'invoice', id, 'open', 'paying', 'worker', NULL, created_at + interval '1 second' FROM invoice
         UNION ALL SELECT 'invoice', id, 'paying', status, 'worker', NULL, updated_at FROM invoice WHERE status <> 'paying'
         UNION ALL SELECT 'payment', id, NULL, 'created', 'worker', NULL, created_at FROM payment
         UNION ALL SELECT 'payment', id, 'created', 'processing', 'worker', NULL, sent_at FROM payment
         UNION ALL SELECT 'payment', id, 'processing', status, 'worker', reason, completed_at FROM payment
                   WHERE status <> 'processing'
         UNION ALL SELECT 'refund', id, NULL, 'requested', requested_by, reason, created_at FROM refund
         UNION ALL SELECT 'refund', id, 'requested', 'processing', 'worker', NULL, sent_at FROM refund
                   WHERE status <> 'requested'
         UNION ALL SELECT 'refund', id, 'processing', status, 'worker', failure, updated_at FROM refund
                   WHERE status IN ('succeeded', 'failed')",
    ),
    (
        // A Pay or Fail notification per success and decline, and one unmatched notification
        // per 10,000 payments (an InvoiceId the ledger does not know).
        "gateway_event",
        "INSERT INTO gateway_event (kind, gateway_transaction_id, invoice_id, payload, received_at, processed_at, outcome)
         SELECT CASE WHEN p.status = 'succeeded' THEN 'pay' ELSE 'fail' END, p.gateway_transaction_id, p.invoice_id::text,
                jsonb_build_object('TransactionId', p.gateway_transaction_id,
                                   'Amount', (p.amount_minor / 100.0)::numeric(12, 2)::text, 'Currency', p.currency,
                                   'InvoiceId', p.invoice_id::text, 'AccountId', i.payer_id::text,
                                   'Status', CASE WHEN p.status = 'succeeded' THEN 'Completed' ELSE 'Declined' END,
                                   'ReasonCode', coalesce(p.reason_code, 0), 'CardFirstSix', '400000',
                                   'CardLastFour', right(pm.card_mask, 4), 'CardExpDate', pm.card_exp,
                                   'DateTime', to_char(p.completed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')),
                p.completed_at + interval '1 second', p.completed_at + interval '1100 milliseconds',
                CASE WHEN p.status = 'succeeded' THEN 'already succeeded' ELSE 'already declined' END
         FROM payment p JOIN invoice i ON i.id = p.invoice_id JOIN payment_method pm ON pm.id = p.payment_method_id
         WHERE p.status IN ('succeeded', 'declined')
         UNION ALL
         SELECT 'pay', 2000000000 + g, md5('unmatched' || g)::uuid::text,
                jsonb_build_object('TransactionId', 2000000000 + g, 'Amount', '299.00', 'Currency', 'RUB',
                                   'InvoiceId', md5('unmatched' || g)::uuid::text, 'AccountId', gen_random_uuid()::text,
                                   'Status', 'Completed'),
                $3 - g * interval '1 hour', $3 - g * interval '1 hour', 'unmatched'
         FROM generate_series(1, greatest($1 / 10000, 1)) AS g",
    ),
    (
        // A success sends auth.grant and notify.payment_succeeded, a decline
        // notify.payment_failed; delivered, a few dead. user_id and user_seq as the 0003
        // trigger numbers them (it is skipped in replica mode; when it runs, it numbers them).
        "outbox",
        "INSERT INTO outbox (id, topic, dedupe_key, payload, status, attempts, next_attempt_at, last_error, created_at,
                             delivered_at, user_id, user_seq)
         SELECT gen_random_uuid(), topic, key, payload, st, CASE WHEN st = 'dead' THEN 10 ELSE 1 END, at,
                CASE WHEN st = 'dead' THEN 'auth service: unavailable' END, at,
                CASE WHEN st = 'delivered' THEN at + interval '1 second' END,
                CASE WHEN topic LIKE 'auth.%' THEN payer_id END,
                CASE WHEN topic LIKE 'auth.%' THEN row_number() OVER (PARTITION BY topic LIKE 'auth.%', payer_id ORDER BY at) END
         FROM (SELECT m.topic, m.key, m.payload, i.payer_id, p.completed_at AS at,
                      CASE WHEN random() < 0.0005 THEN 'dead' ELSE 'delivered' END AS st
               FROM payment p JOIN invoice i ON i.id = p.invoice_id
               CROSS JOIN LATERAL (VALUES
                   ('auth.grant', 'auth.grant:' || i.subscription_id || ':' || extract(epoch FROM i.period_end)::bigint,
                    jsonb_build_object('user_id', i.payer_id, 'role', 'subscriber', 'until', i.period_end,
                                       'subscription_id', i.subscription_id)),
                   ('notify.payment_succeeded', 'notify.payment_succeeded:' || p.id,
                    jsonb_build_object('user_id', i.payer_id, 'payment_id', p.id, 'amount_minor', p.amount_minor,
                                       'currency', p.currency, 'paid_until', i.period_end))) AS m(topic, key, payload)
               WHERE p.status = 'succeeded'
               UNION ALL
               SELECT 'notify.payment_failed', 'notify.payment_failed:' || p.id,
                      jsonb_build_object('user_id', i.payer_id, 'payment_id', p.id, 'reason_code', p.reason_code),
                      i.payer_id, p.completed_at, 'delivered'
               FROM payment p JOIN invoice i ON i.id = p.invoice_id WHERE p.status = 'declined') x",
    ),
    (
        // What the 0003 trigger keeps (in --checked mode it has already: nothing to add).
        "outbox_stream",
        "INSERT INTO outbox_stream (user_id, last_seq)
         SELECT user_id, max(user_seq) FROM outbox WHERE user_id IS NOT NULL GROUP BY user_id
         ON CONFLICT (user_id) DO NOTHING",
    ),
];

/// One query's timings.
#[derive(Debug)]
struct Figure {
    what: String,
    rows: usize,
    median: Duration,
    p95: Duration,
    max: Duration,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `f` `warmup` times, then `runs` times timed; `f` answers how many rows it read.
async fn time<F, Fut>(what: &str, warmup: usize, runs: usize, mut f: F) -> anyhow::Result<Figure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<usize>>,
{
    for _ in 0..warmup {
        f().await.with_context(|| what.to_owned())?;
    }
    let mut times = Vec::with_capacity(runs);
    let mut rows = 0;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        rows = f().await.with_context(|| what.to_owned())?;
        times.push(t.elapsed());
    }
    times.sort();
    let n = times.len();
    let figure = Figure {
        what: what.to_owned(),
        rows,
        median: times[n / 2],
        p95: times[(n * 95).div_ceil(100).max(1) - 1],
        max: times[n - 1],
    };
    eprintln!(
        "  {what}: median {:.2} ms, p95 {:.2} ms",
        ms(figure.median),
        ms(figure.p95)
    );
    Ok(figure)
}

/// The server's URL without a database or query, and the query to use (`sslmode` only;
/// `sslmode=disable` on loopback unless told otherwise: TLS costs both sides CPU here).
fn server(url: &str) -> (String, String) {
    let (url, query) = url.split_once('?').unwrap_or((url, ""));
    let base = match url.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", rest.split('/').next().unwrap_or(rest)),
        None => url.to_owned(),
    };
    let ssl = query.split('&').find(|kv| kv.starts_with("sslmode="));
    let host = base.rsplit('@').next().unwrap_or(&base);
    let query = match ssl {
        Some(kv) => format!("?{kv}"),
        None if host.starts_with("127.")
            || host.starts_with("localhost")
            || host.starts_with("[::1]") =>
        {
            "?sslmode=disable".to_owned()
        }
        None => String::new(),
    };
    (base, query)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let s = <Settings as clap::Parser>::parse();
    anyhow::ensure!(s.payments >= 1, "--payments must be at least 1");
    let payers = s.payers.unwrap_or((s.payments / 4).max(1));
    anyhow::ensure!(payers >= 1, "--payers must be at least 1");
    let (base, query) = server(&s.database_url);
    let name = format!(
        "backoffice_bench_{}",
        &Uuid::new_v4().simple().to_string()[..12]
    );
    let admin = PgPool::connect(&format!("{base}/postgres{query}"))
        .await
        .with_context(|| format!("PostgreSQL at {}", task_core::redact_url(&base)))?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await?;
    eprintln!("database {name}");
    let outcome = bench(&s, payers, &format!("{base}/{name}{query}")).await;
    if s.keep {
        println!("kept the database {name}");
    } else {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await?;
    }
    admin.close().await;
    outcome
}

async fn bench(s: &Settings, payers: i64, url: &str) -> anyhow::Result<()> {
    let db = billing_tasks::db::connect(url, 4).await?;
    let (version,): (String,) = sqlx::query_as("SHOW server_version").fetch_one(&db).await?;
    println!(
        "back-office bench: {} payments, {payers} payers, PostgreSQL {version}, {} timed runs per query after {} warm-up",
        s.payments, s.runs, s.warmup
    );

    // The load, on one connection.
    let now = Utc::now();
    let started = Instant::now();
    {
        let mut conn = db.acquire().await?;
        sqlx::query("SET synchronous_commit = off")
            .execute(&mut *conn)
            .await?;
        sqlx::query("SET work_mem = '256MB'")
            .execute(&mut *conn)
            .await?;
        if !s.checked {
            sqlx::query("SET session_replication_role = replica")
                .execute(&mut *conn)
                .await?;
        }
        for (table, sql) in LOAD {
            let t = Instant::now();
            let rows = sqlx::query(sqlx::AssertSqlSafe(*sql))
                .bind(s.payments)
                .bind(payers)
                .bind(now)
                .execute(&mut *conn)
                .await
                .with_context(|| format!("loading {table}"))?
                .rows_affected();
            println!(
                "  {table:<16} {rows:>10} rows in {:>6.1} s",
                t.elapsed().as_secs_f64()
            );
        }
        sqlx::query("RESET session_replication_role")
            .execute(&mut *conn)
            .await?;
    }
    let loaded = started.elapsed();
    let t = Instant::now();
    sqlx::query("VACUUM (ANALYZE)").execute(&db).await?;
    let vacuumed = t.elapsed();
    let (size,): (String,) =
        sqlx::query_as("SELECT pg_size_pretty(pg_database_size(current_database()))")
            .fetch_one(&db)
            .await?;
    println!(
        "loaded in {:.1} s, VACUUM ANALYZE {:.1} s; database {size}",
        loaded.as_secs_f64(),
        vacuumed.as_secs_f64()
    );

    // What to look for: a payer with a refund (and so several payments), one of its payments,
    // a card's last four and expiry.
    let with_refund: Option<(Uuid, Option<String>)> = sqlx::query_as(
        "SELECT py.id, py.email FROM refund r JOIN payment p ON p.id = r.payment_id
         JOIN invoice i ON i.id = p.invoice_id JOIN payer py ON py.id = i.payer_id
         ORDER BY py.email IS NULL, r.created_at LIMIT 1",
    )
    .fetch_optional(&db)
    .await?;
    let (payer, email) = match with_refund {
        Some(p) => p,
        None => {
            sqlx::query_as("SELECT id, email FROM payer ORDER BY email IS NULL LIMIT 1")
                .fetch_one(&db)
                .await?
        }
    };
    let (payment, txn): (Uuid, i64) = sqlx::query_as(
        "SELECT p.id, p.gateway_transaction_id FROM payment p JOIN invoice i ON i.id = p.invoice_id
         WHERE i.payer_id = $1 AND p.gateway_transaction_id IS NOT NULL ORDER BY p.created_at LIMIT 1",
    )
    .bind(payer)
    .fetch_one(&db)
    .await?;
    let (four, exp): (String, String) = sqlx::query_as(
        "SELECT right(card_mask, 4), card_exp FROM payment_method
         ORDER BY right(card_mask, 4) <> '4242' LIMIT 1",
    )
    .fetch_one(&db)
    .await?;
    let payer_payments: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM payment p JOIN invoice i ON i.id = p.invoice_id WHERE i.payer_id = $1",
    )
    .bind(payer)
    .fetch_one(&db)
    .await?;
    let today = now
        .with_timezone(&billing_tasks::backoffice::format::moscow())
        .date_naive();
    let day = |back: i64| -> NaiveDate { today - Days::days(back) };
    let amount_day = format!("299,00 {}", day(100).format("%Y-%m-%d"));
    println!(
        "looking for: payer {payer} ({payer_payments} payments), payment {payment}, TransactionId {txn}, \
         card {four} {exp}, {amount_day:?}"
    );

    let mut figures = Vec::new();
    let (w, n) = (s.warmup, s.runs);
    let db = &db;
    macro_rules! search {
        ($what:expr, $q:expr) => {{
            let q: String = $q;
            let q = q.as_str();
            figures.push(
                time(&format!("{} ({q:?})", $what), w, n, || async move {
                    let f = data::search(db, q).await?;
                    Ok(f.payers.len() + f.payments.len())
                })
                .await?,
            );
        }};
    }
    search!("search: card last four", four.clone());
    search!("search: last four + expiry", format!("{four} {exp}"));
    search!("search: payer UUID", payer.to_string());
    search!("search: payment UUID", payment.to_string());
    search!("search: TransactionId", txn.to_string());
    search!("search: amount + date", amount_day.clone());
    if let Some(email) = &email {
        search!("search: email", email.clone());
    }

    let list = PAGE + 1;
    macro_rules! payments {
        ($what:expr, $f:expr) => {{
            let f: PaymentFilter = $f;
            let f = &f;
            figures.push(
                time($what, w, n, || async move {
                    Ok(data::payments(db, f, list).await?.len())
                })
                .await?,
            );
        }};
    }
    payments!("payments: first page", PaymentFilter::default());
    // The deep page: walk the keyset cursor as a person paging on would.
    let mut after: Option<(DateTime<Utc>, Uuid)> = None;
    for _ in 0..s.deep_pages {
        let page = data::payments(
            db,
            &PaymentFilter {
                after,
                ..PaymentFilter::default()
            },
            list,
        )
        .await?;
        match page.get(PAGE as usize - 1) {
            Some(last) if page.len() > PAGE as usize => after = Some((last.created_at, last.id)),
            _ => break,
        }
    }
    payments!(
        &format!("payments: page {} (keyset cursor)", s.deep_pages + 1),
        PaymentFilter {
            after,
            ..PaymentFilter::default()
        }
    );
    let middle: Option<(DateTime<Utc>, Uuid)> = sqlx::query_as(
        "SELECT created_at, id FROM payment ORDER BY created_at DESC, id DESC OFFSET $1 LIMIT 1",
    )
    .bind(s.payments / 2)
    .fetch_optional(db)
    .await?;
    payments!(
        "payments: page at the middle (cursor)",
        PaymentFilter {
            after: middle,
            ..PaymentFilter::default()
        }
    );
    let declined = PaymentFilter {
        status: Some("declined".into()),
        from: Some(day(120)),
        to: Some(day(30)),
        amount_min: Some(10_000),
        amount_max: Some(100_000),
        reason_code: Some(5051),
        ..PaymentFilter::default()
    };
    payments!(
        "payments: declined, 90 days, 100–1000 ₽, code 5051",
        declined.clone()
    );
    payments!(
        "payments: declined, 90 days (no amount or code)",
        PaymentFilter {
            status: Some("declined".into()),
            from: Some(day(120)),
            to: Some(day(30)),
            ..PaymentFilter::default()
        }
    );
    for tariff in ["yearly", "weekly-trial"] {
        payments!(
            &format!("payments: tariff {tariff}"),
            PaymentFilter {
                tariff: Some(tariff.into()),
                ..PaymentFilter::default()
            }
        );
    }
    payments!(
        "payments: declined + tariff weekly-trial",
        PaymentFilter {
            status: Some("declined".into()),
            tariff: Some("weekly-trial".into()),
            ..PaymentFilter::default()
        }
    );

    figures.push(
        time("invoices: first page", w, n, || async move {
            Ok(data::invoices(db, &InvoiceFilter::default(), list)
                .await?
                .len())
        })
        .await?,
    );
    figures.push(
        time("refunds: first page", w, n, || async move {
            Ok(data::refunds(db, &RefundFilter::default(), list)
                .await?
                .len())
        })
        .await?,
    );
    figures.push(
        time("subscriptions: first page", w, n, || async move {
            Ok(
                data::subscriptions(db, &SubscriptionFilter::default(), list)
                    .await?
                    .len(),
            )
        })
        .await?,
    );
    let stuck_before = now - Days::hours(1);
    figures.push(
        time("counts (home page)", w, n, || async move {
            let c = data::counts(db, stuck_before).await?;
            Ok((c.stuck + c.unmatched + c.mismatches + c.dead_outbox + c.approvals) as usize)
        })
        .await?,
    );
    figures.push(
        time("payer page", w, n, || async move {
            let page = data::payer_page(db, payer)
                .await?
                .context("the payer exists")?;
            Ok(page.timeline.len())
        })
        .await?,
    );

    println!();
    println!(
        "{:<62} {:>6} {:>10} {:>10} {:>10}",
        "query", "rows", "median ms", "p95 ms", "max ms"
    );
    for f in &figures {
        println!(
            "{:<62} {:>6} {:>10.2} {:>10.2} {:>10.2}",
            f.what,
            f.rows,
            ms(f.median),
            ms(f.p95),
            ms(f.max)
        );
    }
    let over: Vec<&str> = figures
        .iter()
        .filter(|f| ms(f.median) >= s.budget_ms || ms(f.p95) >= s.budget_ms)
        .map(|f| f.what.as_str())
        .collect();
    println!(
        "rows: payers + payments found (search), list rows (limit {list}), the counts' sum, the payer's timeline"
    );
    if over.is_empty() {
        println!(
            "every figure is under {} ms (median and p95, {} runs each): yes",
            s.budget_ms, s.runs
        );
    } else {
        println!(
            "every figure is under {} ms (median and p95, {} runs each): NO, over: {}",
            s.budget_ms,
            s.runs,
            over.join("; ")
        );
    }
    Ok(())
}
