//! How the task list answers over a large store: fills a fresh database with synthetic task rows
//! (1,000,000 by default) and times the first page, a deep keyset page, a deep offset page (for
//! contrast) and searches by name and state, through the same `Store::tasks` the API and the pages
//! use. The goal (issue 10) is under 100 ms for each.
//!
//! ```sh
//! cargo run -p monitor --example scale            # 1,000,000 rows
//! cargo run -p monitor --example scale -- 200000  # fewer
//! ```
//! `DATABASE_ADMIN_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) names the server;
//! the database is created and dropped by the program.

use std::time::{Duration, Instant};

use monitor::Store;
use monitor::store::TaskQuery;

async fn time<F, Fut, T>(what: &str, runs: usize, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        last = Some(f().await);
        times.push(t.elapsed());
    }
    times.sort();
    let median = times[times.len() / 2];
    let max = *times.last().unwrap_or(&Duration::ZERO);
    println!("{what:<58} median {median:>9.2?}  max {max:>9.2?}");
    last.expect("at least one run")
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows: i64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let admin = std::env::var("DATABASE_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = format!("monitor_scale_{}", uuid::Uuid::new_v4().simple());
    let url = format!(
        "{}/{name}",
        admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b)
    );
    let store = Store::connect(&url, 4).await?;

    let t = Instant::now();
    // 20 task names, 50 workers; 90 % SUCCESS, 5 % FAILURE, the rest spread over other states;
    // one task received every 10 ms, newest last.
    sqlx::query(
        "INSERT INTO tasks (uuid, name, state, args, kwargs, root_id, retries, received, started, \
                            succeeded, failed, \"timestamp\", runtime, result, exception, worker) \
         SELECT md5(i::text)::uuid::text, \
                (ARRAY['diag.add','diag.echo','diag.sleep','billing.charge_invoice', \
                       'billing.charge_invoices','billing.enqueue_renewals','billing.refund', \
                       'billing.deliver_outbox','billing.reconcile','billing.expire', \
                       'report.daily','report.hourly','mail.send','mail.digest','sync.users', \
                       'sync.plans','media.transcode','media.thumbnail','search.index', \
                       'search.reindex'])[1 + i % 20], \
                CASE WHEN i % 20 = 7 THEN 'FAILURE' WHEN i % 100 = 3 THEN 'RETRY' \
                     WHEN i % 100 = 5 THEN 'REVOKED' WHEN i % 100 = 9 THEN 'STARTED' \
                     WHEN i % 100 = 11 THEN 'RECEIVED' ELSE 'SUCCESS' END, \
                '(' || i || ', 1)', '{}', md5(i::text)::uuid::text, 0, \
                1764000000 + i * 0.01, 1764000000 + i * 0.01 + 0.002, \
                CASE WHEN i % 20 <> 7 THEN 1764000000 + i * 0.01 + 0.05 END, \
                CASE WHEN i % 20 = 7 THEN 1764000000 + i * 0.01 + 0.05 END, \
                1764000000 + i * 0.01 + 0.05, 0.048, \
                CASE WHEN i % 20 <> 7 THEN (i + 1)::text END, \
                CASE WHEN i % 20 = 7 THEN 'ValueError(''card declined'')' END, \
                'celery-' || (i % 50) || '@worker' \
         FROM generate_series(1, $1) AS i",
    )
    .bind(rows)
    .execute(store.pool())
    .await?;
    sqlx::query("ANALYZE tasks").execute(store.pool()).await?;
    println!(
        "{rows} task rows written and analysed in {:.1?}",
        t.elapsed()
    );

    let page = |q: TaskQuery| {
        let store = store.clone();
        async move { store.tasks(&q).await.expect("a page") }
    };
    let first = time("first page (50 newest)", 7, || {
        page(TaskQuery {
            limit: Some(50),
            ..TaskQuery::default()
        })
    })
    .await;
    assert_eq!(first.len(), 50);
    // The cursor of a page 90 % of the way down, as a reader following "older" links gets it.
    let deep_offset = (rows * 9 / 10) as u64;
    let deep = time(
        &format!("deep page by OFFSET {deep_offset} (contrast)"),
        3,
        || {
            page(TaskQuery {
                limit: Some(50),
                offset: deep_offset,
                ..TaskQuery::default()
            })
        },
    )
    .await;
    let cursor = deep
        .first()
        .map(|t| (t.received.expect("received"), t.uuid.clone()));
    let keyset = time("deep page by keyset cursor (same rows)", 7, || {
        page(TaskQuery {
            limit: Some(50),
            before: cursor.clone(),
            ..TaskQuery::default()
        })
    })
    .await;
    assert_eq!(keyset.len(), 50);
    assert_eq!(
        keyset[0].uuid, deep[1].uuid,
        "the keyset page continues the offset page"
    );
    time(
        "taskname=billing.refund&state=FAILURE (first page)",
        7,
        || {
            page(TaskQuery {
                name: Some("billing.refund".into()),
                state: Some("FAILURE".into()),
                limit: Some(50),
                ..TaskQuery::default()
            })
        },
    )
    .await;
    time("state=FAILURE (first page)", 7, || {
        page(TaskQuery {
            state: Some("FAILURE".into()),
            limit: Some(50),
            ..TaskQuery::default()
        })
    })
    .await;
    time("workername=celery-7@worker (first page)", 7, || {
        page(TaskQuery {
            worker: Some("celery-7@worker".into()),
            limit: Some(50),
            ..TaskQuery::default()
        })
    })
    .await;
    let search = monitor::search::parse("name:billing.* state:FAILURE")?;
    time(
        "search=name:billing.* state:FAILURE (first page)",
        7,
        || {
            page(TaskQuery {
                search: search.clone(),
                limit: Some(50),
                ..TaskQuery::default()
            })
        },
    )
    .await;
    let search = monitor::search::parse("declined -state:SUCCESS")?;
    time("search=declined -state:SUCCESS (first page)", 7, || {
        page(TaskQuery {
            search: search.clone(),
            limit: Some(50),
            ..TaskQuery::default()
        })
    })
    .await;

    store.close().await;
    let admin = sqlx::PgPool::connect(&admin).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await?;
    Ok(())
}
