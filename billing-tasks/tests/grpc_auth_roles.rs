//! The role reaches the auth service over `auth.v1` (the `fake-auth` service, in process here):
//! granted after a successful payment, revoked after a refund and after expiry, in order, also
//! when a delivery run dies half-way; a stale sequence number is refused by the auth service and
//! the message counted as obsolete.

mod billing_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use billing_support::*;
use billing_tasks::fake_auth::FakeAuth;
use billing_tasks::grpc::auth_target::AuthGrpcTarget;
use billing_tasks::grpc::proto::auth::v1 as pb;
use billing_tasks::outbox::{self, OutboxMessage, OutboxTarget};
use billing_tasks::refunds::{RefundRequest, Requester};
use billing_tasks::secret::Secret;
use billing_tasks::tasks::ExpireSubscriptions;
use futures_util::future::BoxFuture;
use uuid::Uuid;

const TOKEN: &str = "billing-to-auth-token-0123456789";

/// Accepts every message and records its topic (notifications in these tests).
#[derive(Default)]
struct Sink(Mutex<Vec<String>>);

impl OutboxTarget for Sink {
    fn deliver<'a>(&'a self, m: &'a OutboxMessage) -> BoxFuture<'a, Result<(), String>> {
        self.0.lock().unwrap().push(m.topic.clone());
        Box::pin(async { Ok(()) })
    }
}

/// A delivery that never finishes: the run is killed while it waits.
struct Hang;

impl OutboxTarget for Hang {
    fn deliver<'a>(&'a self, _: &'a OutboxMessage) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(futures_util::future::pending())
    }
}

async fn start_fake_auth() -> (FakeAuth, String) {
    let fake = FakeAuth::new(Secret::new(TOKEN.to_owned()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        fake.clone()
            .serve(listener, futures_util::future::pending()),
    );
    (fake, url)
}

fn ops(fake: &FakeAuth) -> Vec<(&'static str, i64)> {
    fake.log().iter().map(|a| (a.op, a.user_seq)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_reach_the_auth_service_in_order_and_stale_changes_are_refused() {
    let env = Env::start().await;
    let (fake, url) = start_fake_auth().await;
    let target = AuthGrpcTarget::new(
        &url,
        Secret::new(TOKEN.to_owned()),
        Some(Arc::new(Sink::default())),
    )
    .unwrap();
    let user = Uuid::new_v4();
    let paid = env.subscribe(user, CARD_OK).await;

    // A delivery run dies while its calls are in flight: nothing reached the auth service, and the
    // claimed messages come back after the claim lease.
    let killed = tokio::time::timeout(
        Duration::from_millis(300),
        outbox::deliver_due(&env.billing, &Hang, 100),
    )
    .await;
    assert!(killed.is_err(), "the run was killed mid-delivery");
    assert!(fake.log().is_empty());
    let r = outbox::deliver_due(&env.billing, &target, 100)
        .await
        .unwrap();
    assert_eq!(r.delivered, 0, "claimed messages wait for the lease");
    env.clock.advance(chrono::Duration::minutes(16));
    let r = outbox::deliver_due(&env.billing, &target, 100)
        .await
        .unwrap();
    assert_eq!((r.delivered, r.retrying, r.dead), (2, 0, 0), "{r:?}");
    assert_eq!(ops(&fake), vec![("grant", 1)]);
    assert_eq!(fake.roles(&user.to_string()), vec!["subscriber"]);

    // A refund ends the subscription: the role is revoked.
    env.service
        .request_refund(RefundRequest {
            payment_id: paid.id,
            reason: "changed my mind".into(),
            requested_by: Requester::User(user),
            idempotency_key: Uuid::new_v4().to_string(),
        })
        .await
        .unwrap();
    eventually(
        "the refunded subscription to end",
        Duration::from_secs(30),
        || async { (env.subscription_of(user).await.0 == "expired").then_some(()) },
    )
    .await;
    outbox::deliver_due(&env.billing, &target, 100)
        .await
        .unwrap();
    assert_eq!(ops(&fake), vec![("grant", 1), ("revoke", 2)]);
    assert!(fake.roles(&user.to_string()).is_empty());

    // Subscribed again, then cancelled: at the period's end the role is revoked.
    env.subscribe(user, CARD_OK).await;
    env.service.cancel(user, None).await.unwrap();
    let (_, _, end) = env.subscription_of(user).await;
    env.clock.set(end.unwrap() + chrono::Duration::minutes(1));
    let report = env.run::<ExpireSubscriptions>(()).await;
    assert_eq!(report.expired, 1);
    // The grant is delivered first; the revoke waits for it (it goes in the next run).
    for _ in 0..2 {
        let r = outbox::deliver_due(&env.billing, &target, 100)
            .await
            .unwrap();
        assert_eq!(r.retrying + r.dead, 0, "{r:?}");
    }
    let log = ops(&fake);
    assert_eq!(
        log.iter().map(|(op, _)| *op).collect::<Vec<_>>(),
        ["grant", "revoke", "grant", "revoke"]
    );
    assert!(
        log.windows(2).all(|w| w[0].1 < w[1].1),
        "increasing sequence numbers: {log:?}"
    );
    assert!(fake.roles(&user.to_string()).is_empty());

    // A late copy of the first grant (a stale sequence number) is refused by the auth service and
    // taken as obsolete; a redelivery of a message already applied answers as a replay.
    let stale = OutboxMessage {
        id: Uuid::new_v4(),
        topic: "auth.grant".into(),
        payload: serde_json::json!({"user_id": user, "role": "subscriber", "until": end}),
        created_at: env.clock.now(),
        attempts: 0,
        user_seq: Some(1),
    };
    target.deliver(&stale).await.unwrap();
    assert_eq!(fake.refused_stale(), 1);
    assert!(
        fake.roles(&user.to_string()).is_empty(),
        "the stale grant changed nothing"
    );
    assert_eq!(fake.log().len(), 4);

    // CheckUser answers what the fake holds; a wrong token is refused.
    let mut client = pb::auth_client::AuthClient::connect(url.clone())
        .await
        .unwrap();
    let mut req = tonic::Request::new(pb::CheckUserRequest {
        user_id: user.to_string(),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let u = client.check_user(req).await.unwrap().into_inner();
    assert!(u.exists && u.roles.is_empty());
    let e = client
        .check_user(pb::CheckUserRequest {
            user_id: user.to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    env.stop().await;
}
