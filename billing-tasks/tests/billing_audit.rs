//! The audit trail: every status change of a subscription, invoice, payment or refund is
//! recorded, and the database itself refuses moves the state machines do not have.

mod billing_support;

use billing_support::*;
use billing_tasks::cloudpayments::ReasonCode;
use billing_tasks::cloudpayments::fake::Fault;
use billing_tasks::domain::{
    InvoiceStatus, PaymentStatus, RefundStatus, SubscriptionStatus, Transition,
};
use billing_tasks::refunds::{RefundRequest, Requester};
use billing_tasks::tasks::{EnqueueRenewals, ExpireSubscriptions};
use chrono::Duration;
use uuid::Uuid;

/// For every money object, its history read in order is an unbroken chain of moves ending at
/// its current status.
async fn assert_history_complete(env: &Env) {
    for (entity, table) in [
        ("subscription", "subscription"),
        ("invoice", "invoice"),
        ("payment", "payment"),
        ("refund", "refund"),
        ("card_check", "card_check"),
        ("card_hold", "card_hold"),
    ] {
        let rows = sqlx::query_as::<_, (Uuid, String)>(sqlx::AssertSqlSafe(format!(
            "SELECT id, status FROM {table}"
        )))
        .fetch_all(&env.db)
        .await
        .unwrap();
        for (id, status) in rows {
            let history = sqlx::query_as::<_, (Option<String>, String)>(
                "SELECT from_status, to_status FROM status_history WHERE entity = $1 AND entity_id = $2 ORDER BY id",
            )
            .bind(entity)
            .bind(id)
            .fetch_all(&env.db)
            .await
            .unwrap();
            let mut at: Option<String> = None;
            for (from, to) in &history {
                if let Some(prev) = &at {
                    assert_eq!(
                        from.as_deref(),
                        Some(prev.as_str()),
                        "{entity} {id}: history {history:?} skips a change"
                    );
                }
                at = Some(to.clone());
            }
            if at.is_some() {
                assert_eq!(
                    at.as_deref(),
                    Some(status.as_str()),
                    "{entity} {id}: history {history:?} does not end at its status"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_change_is_recorded() {
    let env = Env::start().await;
    // A declined then paid first payment, a declined and then paid renewal, a cancelled pending
    // subscription, an expiry, and a refund.
    let user = Uuid::new_v4();
    let declined = env
        .service
        .start_subscription(env.start_request(user, CARD_NSF))
        .await
        .unwrap();
    env.settled(user, declined.id).await;
    let paid = env.subscribe(user, CARD_OK).await;
    env.fake
        .push_fault_for("/payments/tokens/charge", Fault::Decline(ReasonCode(5051)));
    let (_, _, end) = env.subscription_of(user).await;
    env.clock.set(end.unwrap() - Duration::hours(12));
    env.run::<EnqueueRenewals>(()).await;
    eventually(
        "the declined renewal",
        std::time::Duration::from_secs(20),
        || async {
            (env.scalar_i64("SELECT count(*) FROM payment WHERE status = 'declined'")
                .await
                == 2)
                .then_some(())
        },
    )
    .await;
    env.service.cancel(user, None).await.unwrap();
    env.clock.set(end.unwrap() + Duration::minutes(1));
    env.run::<ExpireSubscriptions>(()).await;

    let other = Uuid::new_v4();
    let pending = env
        .service
        .start_subscription(env.start_request(other, CARD_NSF))
        .await
        .unwrap();
    env.settled(other, pending.id).await;
    env.service.cancel(other, None).await.unwrap();

    let third = Uuid::new_v4();
    let p = env.subscribe(third, CARD_OK).await;
    let r = env
        .service
        .request_refund(RefundRequest {
            payment_id: p.id,
            reason: "not for me".into(),
            requested_by: Requester::User(third),
            idempotency_key: Uuid::new_v4().to_string(),
        })
        .await
        .unwrap();
    eventually("the refund", std::time::Duration::from_secs(20), || async {
        let s = sqlx::query_scalar::<_, String>("SELECT status FROM refund WHERE id = $1")
            .bind(r.id)
            .fetch_one(&env.db)
            .await
            .unwrap();
        (s == "succeeded").then_some(())
    })
    .await;
    let _ = paid;
    assert_history_complete(&env).await;
    env.stop().await;
}

/// The SQLSTATE and constraint of a refused statement or commit.
fn refusal(e: sqlx::Error) -> (String, Option<String>) {
    match e {
        sqlx::Error::Database(d) => (
            d.code().map(|c| c.into_owned()).unwrap_or_default(),
            d.constraint().map(str::to_owned),
        ),
        other => panic!("expected a database refusal, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_refuses_moves_not_allowed_and_moves_not_recorded() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    env.subscribe(user, CARD_OK).await;
    let invoice = env.invoice_ids(user, "initial").await[0];

    // paid → open is no move of the invoice machine.
    let err = sqlx::query("UPDATE invoice SET status = 'open', paid_at = NULL WHERE id = $1")
        .bind(invoice)
        .execute(&env.db)
        .await
        .unwrap_err();
    assert_eq!(
        refusal(err),
        ("23514".into(), Some("invoice_status_transition".into()))
    );

    // active → past_due is a move, but one without its history row is refused at commit.
    let mut tx = env.db.begin().await.unwrap();
    sqlx::query(
        "UPDATE subscription SET status = 'past_due', grace_until = now() WHERE payer_id = $1",
    )
    .bind(user)
    .execute(&mut *tx)
    .await
    .unwrap();
    assert_eq!(
        refusal(tx.commit().await.unwrap_err()),
        ("23514".into(), Some("subscription_status_history".into()))
    );
    // With its history row, the same move commits.
    let mut tx = env.db.begin().await.unwrap();
    sqlx::query(
        "WITH s AS (UPDATE subscription SET status = 'past_due', grace_until = now() WHERE payer_id = $1 RETURNING id)
         INSERT INTO status_history (entity, entity_id, from_status, to_status, actor, at)
         SELECT 'subscription', id, 'active', 'past_due', 'staff:test', now() FROM s",
    )
    .bind(user)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    env.stop().await;
}

/// Every status pair, asked of the code and of the database's `status_transition`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_machines_in_code_and_in_the_database_agree() {
    let env = Env::start_with(Options {
        run_worker: false,
        ..Options::default()
    })
    .await;
    async fn check<S: Transition>(env: &Env, entity: &str, all: &[&str], parse: fn(&str) -> S) {
        for from in all {
            for to in all {
                let in_db = sqlx::query_scalar::<_, bool>(
                    "SELECT EXISTS (SELECT 1 FROM status_transition WHERE entity = $1 AND from_status = $2 AND to_status = $3)",
                )
                .bind(entity)
                .bind(from)
                .bind(to)
                .fetch_one(&env.db)
                .await
                .unwrap();
                assert_eq!(
                    in_db,
                    parse(from).allows(parse(to)),
                    "{entity}: {from} -> {to}"
                );
            }
        }
    }
    check(
        &env,
        "subscription",
        &["pending", "active", "past_due", "expired", "abandoned"],
        |s| SubscriptionStatus::parse(s).unwrap(),
    )
    .await;
    check(
        &env,
        "invoice",
        &["open", "paying", "paid", "failed", "void"],
        |s| InvoiceStatus::parse(s).unwrap(),
    )
    .await;
    check(
        &env,
        "payment",
        &[
            "created",
            "processing",
            "awaiting_3ds",
            "succeeded",
            "declined",
            "expired",
            "failed",
        ],
        |s| PaymentStatus::parse(s).unwrap(),
    )
    .await;
    check(
        &env,
        "refund",
        &["requested", "processing", "succeeded", "failed"],
        |s| RefundStatus::parse(s).unwrap(),
    )
    .await;
    env.stop().await;
}
