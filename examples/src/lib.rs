//! Pieces the examples, the benchmarks and their tests share: where the built binaries are, and
//! the billing chaos run ([`billing_chaos`]), which the `billing_chaos` example runs at full size
//! and a test runs small.

pub mod billing_chaos;

use std::path::PathBuf;

use anyhow::{Context, bail};
use billing_tasks::cloudpayments::fake::FakeGateway;
use chrono::Utc;
use sqlx::PgPool;
use uuid::Uuid;

/// The seeded monthly tariff (migrations).
pub const MONTHLY_TARIFF: &str = "0b4b6f0e-2d3c-4c55-9b51-6c1c7c000001";

/// The `worker` binary of the build this program belongs to: next to the directory holding it
/// (`target/release/examples/bench` → `target/release/worker`; a test in `target/debug/deps`
/// → `target/debug/worker`).
pub fn worker_binary() -> anyhow::Result<PathBuf> {
    built_binary("worker")
}

/// A binary of the workspace (`worker`, `scheduler`, `monitor`, `billing-api`) from the build
/// this program belongs to, found as [`worker_binary`] finds the worker.
pub fn built_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(|p| p.parent())
        .context("program location")?
        .join(name);
    if !path.exists() {
        bail!(
            "{} not found: run `cargo build --workspace` (with --release for a release program) first",
            path.display()
        );
    }
    Ok(path)
}

/// N payers with saved cards (tokens the fake issued on `public_id`'s terminal) and active
/// monthly subscriptions ending in an hour, so their renewals fall due at once; the seeded
/// periods are recorded in `status_history` as payments made before the run.
pub async fn seed_renewals(
    db: &PgPool,
    fake: &FakeGateway,
    public_id: &str,
    n: usize,
) -> anyhow::Result<()> {
    let now = Utc::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        let (mut payers, mut methods, mut tokens, mut subs) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in chunk {
            let payer = Uuid::new_v4();
            tokens.push(
                fake.issue_token(public_id, &payer.to_string(), "4000000000003055", "12/30")
                    .context("seed token")?,
            );
            payers.push(payer);
            methods.push(Uuid::now_v7());
            subs.push(Uuid::now_v7());
        }
        let mut tx = db.begin().await?;
        sqlx::query("INSERT INTO payer (id, created_at, updated_at) SELECT id, $2, $2 FROM UNNEST($1::uuid[]) AS u(id)")
            .bind(&payers)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO payment_method (id, payer_id, token, card_mask, card_type, card_exp, created_at)
             SELECT id, payer, token, '400000******3055', 'Visa', '12/30', $4 FROM UNNEST($1::uuid[], $2::uuid[], $3::text[]) AS u(id, payer, token)",
        )
        .bind(&methods)
        .bind(&payers)
        .bind(&tokens)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO subscription (id, payer_id, tariff_id, status, auto_renew, current_period_start, current_period_end,
                                       payment_method_id, created_at, updated_at)
             SELECT id, payer, $4, 'active', true, $5, $6, method, $5, $5 FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[]) AS u(id, payer, method)",
        )
        .bind(&subs)
        .bind(&payers)
        .bind(&methods)
        .bind(Uuid::parse_str(MONTHLY_TARIFF)?)
        .bind(now - chrono::Duration::days(30))
        .bind(now + chrono::Duration::hours(1))
        .execute(&mut *tx)
        .await?;
        // The seeded periods stand for payments made before the run.
        sqlx::query(
            "INSERT INTO status_history (entity, entity_id, from_status, to_status, actor, at)
             SELECT 'subscription', id, NULL, 'active', 'staff:chaos-seed', $2 FROM UNNEST($1::uuid[]) AS u(id)",
        )
        .bind(&subs)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    Ok(())
}
