//! A walk through billing as the frontend sees it: every step is a `billing.v1` gRPC call to
//! `billing-api` (the generated tonic client), with the user's access token in
//! `authorization: Bearer <JWT>`, exactly what a browser or app sends. Subscribe without 3-D
//! Secure, subscribe another user through 3-D Secure, see a decline, replace a card, read the
//! subscription and receipts, cancel, refund; then ask the auth service (`fake-auth`, `auth.v1`
//! `CheckUser`) whether each user holds the `subscriber` role billing granted or revoked.
//!
//! ```sh
//! scripts/demo                                  # starts everything and runs this
//! cargo run -p examples --example billing_demo  # against a stack already running
//! ```
//!
//! The tokens are signed with the demo's stand-in for the auth service's key
//! (`DEMO_JWT_SIGNING_KEY`; `scripts/demo` makes one and gives billing-api its public half).

use std::path::PathBuf;
use std::time::Duration;

use billing_tasks::cloudpayments::fake;
use billing_tasks::fake_auth::issue_access_token;
use billing_tasks::grpc::proto::auth::v1 as auth_pb;
use billing_tasks::grpc::proto::billing::v1 as pb;
use billing_tasks::grpc::tonic;
use clap::Parser;
use pb::billing_client::BillingClient;
use tonic::transport::Channel;
use uuid::Uuid;

/// Runs the billing walk-through against a running stack, over gRPC.
#[derive(Debug, Parser)]
#[command(name = "billing_demo")]
struct Cli {
    /// billing-api's gRPC address.
    #[arg(
        long,
        env = "BILLING_GRPC_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    billing: String,
    /// The private key access tokens are signed with (P-256, PKCS#8 PEM).
    #[arg(long, env = "DEMO_JWT_SIGNING_KEY")]
    signing_key: PathBuf,
    /// The auth service (fake-auth) the roles are delivered to.
    #[arg(long, env = "AUTH_GRPC_URL", default_value = "http://127.0.0.1:50061")]
    auth: String,
    /// The service token for the auth service.
    #[arg(long, env = "AUTH_GRPC_TOKEN", hide_env_values = true)]
    auth_token: String,
}

/// A demo user: their id and the access token the auth service gave them at login.
struct User {
    name: &'static str,
    id: Uuid,
    token: String,
}

impl User {
    /// A request carrying this user's token, as the frontend sends it.
    fn call<T>(&self, message: T) -> anyhow::Result<tonic::Request<T>> {
        let mut r = tonic::Request::new(message);
        r.metadata_mut()
            .insert("authorization", format!("Bearer {}", self.token).parse()?);
        r.set_timeout(Duration::from_secs(60));
        Ok(r)
    }
}

fn status(p: &pb::Payment) -> &'static str {
    pb::PaymentStatus::try_from(p.status)
        .map_or("?", |s| s.as_str_name())
        .trim_start_matches("PAYMENT_STATUS_")
}

fn sub_status(s: &pb::Subscription) -> &'static str {
    pb::SubscriptionStatus::try_from(s.status)
        .map_or("?", |s| s.as_str_name())
        .trim_start_matches("SUBSCRIPTION_STATUS_")
}

fn money(m: Option<&pb::Money>) -> String {
    m.map_or_else(
        || "-".into(),
        |m| format!("{}.{:02} {}", m.minor / 100, m.minor % 100, m.currency),
    )
}

/// A protobuf timestamp's seconds as a date.
fn date(seconds: Option<i64>) -> String {
    seconds
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map_or_else(
            || "-".into(),
            |t| t.format("%Y-%m-%d %H:%M UTC").to_string(),
        )
}

/// Follows a payment with WatchPayment until the stream ends (a final state or AWAITING_3DS),
/// printing each state; returns the last.
async fn watch(
    api: &mut BillingClient<Channel>,
    user: &User,
    id: &str,
) -> anyhow::Result<pb::Payment> {
    let mut stream = api
        .watch_payment(user.call(pb::GetPaymentRequest {
            payment_id: id.to_owned(),
        })?)
        .await?
        .into_inner();
    let mut seen = Vec::new();
    let mut last = None;
    while let Some(p) = stream.message().await? {
        seen.push(status(&p));
        last = Some(p);
    }
    println!("   WatchPayment: {}", seen.join(" -> "));
    last.ok_or_else(|| anyhow::anyhow!("WatchPayment sent nothing"))
}

fn start(card: &str) -> pb::StartSubscriptionRequest {
    pb::StartSubscriptionRequest {
        tariff: "monthly".into(),
        cryptogram: fake::test_cryptogram(card, "12/30"),
        cardholder_name: "DEMO USER".into(),
        ip_address: "203.0.113.10".into(),
        email: "demo@example.com".into(),
        idempotency_key: Uuid::new_v4().to_string(),
    }
}

async fn show_subscription(
    api: &mut BillingClient<Channel>,
    user: &User,
) -> anyhow::Result<pb::Subscription> {
    let s = api
        .get_subscription(user.call(pb::GetSubscriptionRequest::default())?)
        .await?
        .into_inner();
    println!(
        "   GetSubscription: {} {} until {}, card {}, auto_renew={}",
        s.tariff,
        sub_status(&s),
        date(s.current_period_end.as_ref().map(|t| t.seconds)),
        if s.card_mask.is_empty() {
            "-"
        } else {
            &s.card_mask
        },
        s.auto_renew
    );
    Ok(s)
}

/// Asks the auth service for the user's roles until `holds` matches (delivery is asynchronous),
/// at most 30 s.
async fn check_role(
    auth: &mut auth_pb::auth_client::AuthClient<Channel>,
    token: &str,
    user: &User,
    holds: bool,
) -> anyhow::Result<()> {
    let mut roles = Vec::new();
    for _ in 0..150 {
        let mut r = tonic::Request::new(auth_pb::CheckUserRequest {
            user_id: user.id.to_string(),
        });
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        roles = auth.check_user(r).await?.into_inner().roles;
        if roles.iter().any(|r| r == "subscriber") == holds {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "   CheckUser (fake-auth): {:<5} {} roles [{}]: {}",
        user.name,
        user.id,
        roles.join(", "),
        if roles.iter().any(|r| r == "subscriber") {
            "holds subscriber"
        } else {
            "does not hold subscriber"
        }
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let key = std::fs::read(&cli.signing_key)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", cli.signing_key.display()))?;
    let user = |name| -> anyhow::Result<User> {
        let id = Uuid::new_v4();
        let token = issue_access_token(&key, id, "auth", "billing", Duration::from_secs(3600))?;
        Ok(User { name, id, token })
    };
    let (alice, bob, carol) = (user("alice")?, user("bob")?, user("carol")?);
    let mut api = BillingClient::connect(cli.billing.clone()).await?;
    let mut auth = auth_pb::auth_client::AuthClient::connect(cli.auth.clone()).await?;
    println!(
        "billing.v1 at {}, each call with `authorization: Bearer <the user's JWT>`",
        cli.billing
    );

    println!("\nListTariffs:");
    for t in api
        .list_tariffs(alice.call(pb::ListTariffsRequest {})?)
        .await?
        .into_inner()
        .tariffs
    {
        println!(
            "   {:<10} {:<22} {} per {} {}",
            t.code,
            t.name,
            money(t.price.as_ref()),
            t.period_count,
            t.period_unit
        );
    }

    println!(
        "\n1. alice {} subscribes with 4000 0000 0000 3055 (no 3-D Secure)",
        alice.id
    );
    let p = api
        .start_subscription(alice.call(start("4000000000003055"))?)
        .await?
        .into_inner();
    println!("   StartSubscription: payment {} {}", p.id, status(&p));
    let first = watch(&mut api, &alice, &p.id).await?;
    show_subscription(&mut api, &alice).await?;
    check_role(&mut auth, &cli.auth_token, &alice, true).await?;

    println!(
        "\n2. bob {} subscribes with 4242 4242 4242 4242 (3-D Secure)",
        bob.id
    );
    let p = api
        .start_subscription(bob.call(start("4242424242424242"))?)
        .await?
        .into_inner();
    println!("   StartSubscription: payment {} {}", p.id, status(&p));
    let p = watch(&mut api, &bob, &p.id).await?;
    let challenge = p.three_ds.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "payment {} is {} with no 3-D Secure challenge",
            p.id,
            status(&p)
        )
    })?;
    println!(
        "   the frontend posts PaReq and MD={} to {}; the bank answers PaRes",
        challenge.transaction_id, challenge.acs_url
    );
    let p = api
        .complete3_ds(bob.call(pb::Complete3DsRequest {
            payment_id: p.id.clone(),
            transaction_id: challenge.transaction_id,
            pa_res: fake::PA_RES_OK.into(),
        })?)
        .await?
        .into_inner();
    println!("   Complete3DS: {}", status(&p));
    watch(&mut api, &bob, &p.id).await?;
    show_subscription(&mut api, &bob).await?;

    println!(
        "\n3. carol {} tries 4000 0566 5566 5556 (insufficient funds)",
        carol.id
    );
    let p = api
        .start_subscription(carol.call(start("4000056655665556"))?)
        .await?
        .into_inner();
    let p = watch(&mut api, &carol, &p.id).await?;
    if let Some(d) = &p.decline {
        println!("   declined, reason {}: \"{}\"", d.reason_code, d.message);
    }

    println!(
        "\n4. bob replaces his card with 5205 0000 0000 3055 (UpdatePaymentMethod, nothing due)"
    );
    let u = api
        .update_payment_method(bob.call(pb::UpdatePaymentMethodRequest {
            cryptogram: fake::test_cryptogram("5205000000003055", "12/30"),
            ip_address: "203.0.113.10".into(),
            idempotency_key: Uuid::new_v4().to_string(),
            cardholder_name: "DEMO USER".into(),
        })?)
        .await?
        .into_inner();
    println!(
        "   UpdatePaymentMethod: card check {} of {} (authorised, then voided) {}",
        u.id,
        money(u.amount.as_ref()),
        status(&u)
    );
    watch(&mut api, &bob, &u.id).await?;
    show_subscription(&mut api, &bob).await?;

    println!("\n5. alice's receipts (ListPayments)");
    for p in api
        .list_payments(alice.call(pb::ListPaymentsRequest::default())?)
        .await?
        .into_inner()
        .payments
    {
        println!(
            "   {} {} {} {}",
            date(p.created_at.as_ref().map(|t| t.seconds)),
            p.id,
            money(p.amount.as_ref()),
            status(&p)
        );
    }

    println!(
        "\n6. alice cancels auto-renewal (CancelSubscription at period end), then asks for a refund"
    );
    let s = api
        .cancel_subscription(alice.call(pb::CancelSubscriptionRequest {
            when: pb::cancel_subscription_request::When::PeriodEnd as i32,
            reason: "demo".into(),
        })?)
        .await?
        .into_inner();
    println!(
        "   CancelSubscription: {} auto_renew={}",
        sub_status(&s),
        s.auto_renew
    );
    let r = api
        .request_refund(alice.call(pb::RequestRefundRequest {
            payment_id: first.id.clone(),
            reason: "changed my mind".into(),
            idempotency_key: Uuid::new_v4().to_string(),
        })?)
        .await?
        .into_inner();
    println!(
        "   RequestRefund: refund {} of {} {}",
        r.id,
        money(r.amount.as_ref()),
        pb::RefundStatus::try_from(r.status)
            .map_or("?", |s| s.as_str_name())
            .trim_start_matches("REFUND_STATUS_")
    );
    let mut s = s;
    for _ in 0..150 {
        s = api
            .get_subscription(alice.call(pb::GetSubscriptionRequest::default())?)
            .await?
            .into_inner();
        if s.status == pb::SubscriptionStatus::Expired as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("   GetSubscription: {}", sub_status(&s));

    println!("\n7. the auth service (fake-auth, auth.v1 CheckUser), told by billing's outbox:");
    check_role(&mut auth, &cli.auth_token, &alice, false).await?;
    check_role(&mut auth, &cli.auth_token, &bob, true).await?;
    check_role(&mut auth, &cli.auth_token, &carol, false).await?;

    println!(
        "\nTry a standard client (grpcio) as bob:\n   BILLING_TOKEN={} .venv/bin/python examples/python/grpc_client.py",
        bob.token
    );
    Ok(())
}
