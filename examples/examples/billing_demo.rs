//! A walk through billing against a running stack (`scripts/demo` starts one): subscribe with a
//! card that needs no 3-D Secure, subscribe another user through 3-D Secure, look at the results,
//! cancel, refund. It calls the billing service library the way the frontend's gRPC calls will,
//! and the worker does the gateway work.
//!
//! ```sh
//! scripts/demo                                  # starts everything and runs this
//! cargo run -p examples --example billing_demo  # against a stack already running
//! ```
//! Settings are the billing ones (`DATABASE_URL`, `CLOUDPAYMENTS_*`, `BROKER_URL`, …).

use std::time::Duration;

use billing_tasks::BillingService;
use billing_tasks::cloudpayments::fake;
use billing_tasks::config::BillingArgs;
use billing_tasks::domain::PaymentStatus;
use billing_tasks::refunds::{RefundRequest, Requester};
use billing_tasks::secret::Secret;
use billing_tasks::service::{PaymentView, StartSubscription};
use clap::Parser;
use task_core::cli::{ConnectionArgs, parse_or_exit};
use uuid::Uuid;

/// Runs the billing walk-through against a running stack.
#[derive(Debug, Parser)]
#[command(name = "billing_demo")]
struct Cli {
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(flatten)]
    billing: BillingArgs,
}

async fn wait(
    service: &BillingService,
    user: Uuid,
    payment: Uuid,
    until: impl Fn(&PaymentView) -> bool,
) -> anyhow::Result<PaymentView> {
    for _ in 0..300 {
        let p = service.get_payment(user, payment).await?;
        if until(&p) {
            return Ok(p);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("payment {payment} did not settle in 30 s: is the worker running?")
}

fn request(user: Uuid, pan: &str) -> StartSubscription {
    StartSubscription {
        user_id: user,
        tariff: "monthly".into(),
        cryptogram: Secret::new(fake::test_cryptogram(pan, "12/30")),
        cardholder_name: Some("DEMO USER".into()),
        ip_address: "203.0.113.10".into(),
        email: Some("demo@example.com".into()),
        idempotency_key: Uuid::new_v4().to_string(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli: Cli = parse_or_exit();
    let tasks =
        task_core::Client::connect(&cli.connection.broker_url, &cli.connection.result_backend)
            .await?;
    let service = BillingService::new(cli.billing.connect(tasks).await?);

    println!("tariffs:");
    for t in service.list_tariffs().await? {
        println!(
            "  {:<13} {:<22} {} per {} {}",
            t.code, t.name, t.price, t.period_count, t.period_unit
        );
    }

    let alice = Uuid::new_v4();
    println!("\n1. {alice} subscribes with 4000 0000 0000 3055 (no 3-D Secure)");
    let p = service
        .start_subscription(request(alice, "4000000000003055"))
        .await?;
    println!("   payment {} {}", p.id, p.status);
    let p = wait(&service, alice, p.id, |p| {
        !matches!(p.status, PaymentStatus::Created | PaymentStatus::Processing)
    })
    .await?;
    println!("   payment {} {}", p.id, p.status);
    let s = service.get_subscription(alice).await?;
    println!(
        "   subscription {} {} until {}, card {}",
        s.id,
        s.status,
        s.current_period_end
            .map_or_else(|| "-".into(), |t| t.to_rfc3339()),
        s.card_mask.as_deref().unwrap_or("-")
    );

    let bob = Uuid::new_v4();
    println!("\n2. {bob} subscribes with 4242 4242 4242 4242 (3-D Secure)");
    let p = service
        .start_subscription(request(bob, "4242424242424242"))
        .await?;
    let p = wait(&service, bob, p.id, |p| {
        p.status == PaymentStatus::AwaitingThreeDs
    })
    .await?;
    let challenge = p
        .challenge
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no 3-D Secure challenge"))?;
    println!(
        "   the frontend posts PaReq to {} (MD = {})",
        challenge.acs_url, challenge.transaction_id
    );
    service
        .complete_3ds(
            bob,
            p.id,
            challenge.transaction_id,
            Secret::new(fake::PA_RES_OK.into()),
        )
        .await?;
    let p = wait(&service, bob, p.id, |p| p.status.is_final()).await?;
    println!("   payment {} {}", p.id, p.status);
    let s = service.get_subscription(bob).await?;
    println!("   subscription {} {}", s.id, s.status);

    let carol = Uuid::new_v4();
    println!("\n3. {carol} tries 4000 0566 5566 5556 (insufficient funds)");
    let p = service
        .start_subscription(request(carol, "4000056655665556"))
        .await?;
    let p = wait(&service, carol, p.id, |p| p.status.is_final()).await?;
    println!(
        "   payment {} {} (reason {}: {})",
        p.id,
        p.status,
        p.reason_code.map_or_else(|| "-".into(), |c| c.to_string()),
        p.card_holder_message.as_deref().unwrap_or("-")
    );

    println!("\n4. {alice} cancels auto-renewal, then asks for a refund");
    let s = service.cancel(alice, Some("demo".into())).await?;
    println!("   subscription {} auto_renew={}", s.status, s.auto_renew);
    let first = p_id_of(&service, alice).await?;
    let r = service
        .request_refund(RefundRequest {
            payment_id: first,
            reason: "changed my mind".into(),
            requested_by: Requester::User(alice),
            idempotency_key: Uuid::new_v4().to_string(),
        })
        .await?;
    println!("   refund {} of {} {}", r.id, r.amount, r.status);
    for _ in 0..100 {
        if service.get_subscription(alice).await?.status
            == billing_tasks::domain::SubscriptionStatus::Expired
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = service.get_subscription(alice).await?;
    println!(
        "   subscription {} (role revoked through the outbox)",
        s.status
    );
    println!(
        "\nThe ledger is in DATABASE_URL: try `psql {} -c 'select entity, to_status, actor, at from status_history order by at'`",
        task_core::redact_url(&cli.billing.database_url)
    );
    Ok(())
}

/// Alice's first payment, from the ledger.
async fn p_id_of(service: &BillingService, user: Uuid) -> anyhow::Result<Uuid> {
    let id: Uuid = sqlx::query_scalar(
        "SELECT p.id FROM payment p JOIN invoice i ON i.id = p.invoice_id WHERE i.payer_id = $1 AND p.status = 'succeeded' ORDER BY p.created_at LIMIT 1",
    )
    .bind(user)
    .fetch_one(service.billing().db())
    .await?;
    Ok(id)
}
