//! Who may call what, and bad input: calls without a token, with an expired one, with one signed
//! by another key, and a user reaching for another user's objects each get the right code and
//! change nothing; 1,000 malformed requests (fuzzed fields, oversize messages) get clear errors
//! and leave the ledger exactly as it was.

mod billing_support;
mod grpc_support;

use billing_support::*;
use billing_tasks::cloudpayments::fake;
use billing_tasks::grpc::proto::billing::v1 as pb;
use grpc_support::{GrpcFront, SERVICE_TOKEN, SigningKey};
use pb::billing_client::BillingClient;
use tonic::transport::Channel;
use tonic::{Code, Request};
use tonic_types::StatusExt;
use uuid::Uuid;

fn req<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(message);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

/// A digest of every ledger table, to show a run of calls changed nothing.
async fn ledger_digest(env: &Env) -> String {
    let mut out = String::new();
    for table in [
        "payer",
        "subscription",
        "invoice",
        "payment",
        "payment_method",
        "refund",
        "outbox",
        "status_history",
    ] {
        let d: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {table} t"
        )))
        .fetch_one(&env.db)
        .await
        .unwrap();
        out.push_str(&format!("{table}={} ", d.unwrap_or_default()));
    }
    out
}

async fn client(front: &GrpcFront) -> BillingClient<Channel> {
    BillingClient::connect(format!("http://{}", front.addr))
        .await
        .unwrap()
}

fn start_request(pan: &str) -> pb::StartSubscriptionRequest {
    pb::StartSubscriptionRequest {
        tariff: "monthly".into(),
        cryptogram: fake::test_cryptogram(pan, EXP),
        cardholder_name: "IVAN IVANOV".into(),
        ip_address: "203.0.113.7".into(),
        email: "ivan@example.com".into(),
        idempotency_key: Uuid::new_v4().to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_and_other_users_objects_get_the_right_code_and_change_nothing() {
    let env = Env::start().await;
    let front = GrpcFront::start(&env).await;
    let mut api = client(&front).await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let paid = env.subscribe(alice, CARD_OK).await;
    let sub = env.service.get_subscription(alice).await.unwrap();
    let before = ledger_digest(&env).await;

    let expired = front.key.token_for(bob, -3600);
    let other_key = SigningKey::generate().token_for(bob, 3600);
    let wrong_audience = front
        .key
        .token_with(bob, 3600, grpc_support::ISSUER, "not-billing");
    let wrong_issuer = front
        .key
        .token_with(bob, 3600, "evil", grpc_support::AUDIENCE);
    for (what, token, expect) in [
        ("no token", None, "authorization"),
        ("an expired token", Some(expired.as_str()), "expired"),
        ("another key's token", Some(other_key.as_str()), "signature"),
        (
            "a token for another audience",
            Some(wrong_audience.as_str()),
            "not for billing",
        ),
        (
            "a token from another issuer",
            Some(wrong_issuer.as_str()),
            "not from the auth service",
        ),
        ("garbage", Some("not.a.jwt"), "not a JWT"),
    ] {
        let e = api
            .start_subscription(req(start_request(CARD_OK), token))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
        assert!(e.message().contains(expect), "{what}: {}", e.message());
        let e = api
            .get_subscription(req(pb::GetSubscriptionRequest::default(), token))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
        println!("{what}: {:?} {}", e.code(), e.message());
    }

    // Bob, with a good token, cannot see or touch Alice's things.
    let bob_token = front.key.token_for(bob, 3600);
    let bob_t = Some(bob_token.as_str());
    let e = api
        .get_subscription(req(
            pb::GetSubscriptionRequest {
                subscription_id: sub.id.to_string(),
            },
            bob_t,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    for e in [
        api.get_payment(req(
            pb::GetPaymentRequest {
                payment_id: paid.id.to_string(),
            },
            bob_t,
        ))
        .await
        .unwrap_err(),
        api.watch_payment(req(
            pb::GetPaymentRequest {
                payment_id: paid.id.to_string(),
            },
            bob_t,
        ))
        .await
        .map(|_| ())
        .unwrap_err(),
        api.request_refund(req(
            pb::RequestRefundRequest {
                payment_id: paid.id.to_string(),
                reason: "mine now".into(),
                idempotency_key: Uuid::new_v4().to_string(),
            },
            bob_t,
        ))
        .await
        .unwrap_err(),
        api.abandon_payment(req(
            pb::AbandonPaymentRequest {
                payment_id: paid.id.to_string(),
            },
            bob_t,
        ))
        .await
        .unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
    }
    let e = api
        .cancel_subscription(req(
            pb::CancelSubscriptionRequest {
                when: pb::cancel_subscription_request::When::Now as i32,
                reason: String::new(),
            },
            bob_t,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.get_details_precondition_failure().is_some());
    let list = api
        .list_subscriptions(req(pb::ListSubscriptionsRequest {}, bob_t))
        .await
        .unwrap()
        .into_inner();
    assert!(list.subscriptions.is_empty(), "Bob sees none of Alice's");
    let payments = api
        .list_payments(req(pb::ListPaymentsRequest::default(), bob_t))
        .await
        .unwrap()
        .into_inner();
    assert!(payments.payments.is_empty());

    // Service callers: scope and the named user are checked.
    let reader = Some("reader-token-0123456789");
    let mut r = req(start_request(CARD_OK), reader);
    r.metadata_mut()
        .insert("x-on-behalf-of", bob.to_string().parse().unwrap());
    let e = api.start_subscription(r).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = api
        .get_subscription(req(
            pb::GetSubscriptionRequest::default(),
            Some(SERVICE_TOKEN),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        e.get_details_bad_request().unwrap().field_violations[0].field,
        "x-on-behalf-of"
    );
    assert_eq!(ledger_digest(&env).await, before, "nothing changed");

    let mut r = req(pb::GetSubscriptionRequest::default(), Some(SERVICE_TOKEN));
    r.metadata_mut()
        .insert("x-on-behalf-of", alice.to_string().parse().unwrap());
    let s = api.get_subscription(r).await.unwrap().into_inner();
    assert_eq!(
        s.id,
        sub.id.to_string(),
        "a service acting for Alice sees hers"
    );
    front.stop().await;
    env.stop().await;
}

fn junk(rng: &mut fastrand::Rng, max: usize) -> String {
    let len = rng.usize(0..=max);
    (0..len)
        .map(|_| match rng.u8(0..6) {
            0 => rng.char('\0'..'\u{1f}'),
            1 => rng.char('\u{80}'..'\u{7ff}'),
            2 => ' ',
            3 => rng.char('!'..'/'),
            _ => rng.alphanumeric(),
        })
        .collect()
}

/// A string that is surely not a valid value: empty, oversize, or with characters no field takes.
fn bad(rng: &mut fastrand::Rng) -> String {
    match rng.u8(0..4) {
        0 => String::new(),
        1 => "x".repeat(rng.usize(5_000..20_000)),
        2 => format!("{}\u{7}{}", junk(rng, 20), junk(rng, 20)),
        _ => format!("{} {}", junk(rng, 30), "!"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_malformed_requests_get_clear_errors_and_leave_the_ledger_unchanged() {
    let env = Env::start().await;
    let front = GrpcFront::start(&env).await;
    let mut api = client(&front).await;
    let alice = Uuid::new_v4();
    let paid = env.subscribe(alice, CARD_OK).await;
    let token = front.key.token_for(alice, 3600);
    let fresh = front.key.token_for(Uuid::new_v4(), 3600);
    let t = Some(token.as_str());
    let before = ledger_digest(&env).await;
    let mut rng = fastrand::Rng::with_seed(11);
    let mut codes = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..1000 {
        let kind = i % 10;
        let result: Result<(), tonic::Status> = match kind {
            // StartSubscription for a new user with one bad field (the others valid).
            0..=2 => {
                let mut m = start_request(CARD_OK);
                match rng.u8(0..6) {
                    0 => m.cryptogram = bad(&mut rng),
                    1 => m.ip_address = bad(&mut rng),
                    2 => {
                        m.idempotency_key = match rng.u8(0..3) {
                            0 => String::new(),
                            1 => "k".repeat(201),
                            _ => format!("key\u{0}{i}"),
                        }
                    }
                    3 => {
                        m.tariff = if rng.bool() {
                            bad(&mut rng)
                        } else {
                            format!("no-such-{i}")
                        }
                    }
                    4 => {
                        m.email =
                            format!("{}@{}", junk(&mut rng, 3), junk(&mut rng, 3)).replace('@', " ")
                    }
                    _ => m.cardholder_name = "N".repeat(101 + rng.usize(0..1000)),
                }
                api.start_subscription(req(m, Some(fresh.as_str())))
                    .await
                    .map(|_| ())
            }
            3 => api
                .complete3_ds(req(
                    pb::Complete3DsRequest {
                        payment_id: if rng.bool() {
                            bad(&mut rng)
                        } else {
                            paid.id.to_string()
                        },
                        transaction_id: rng.i64(..),
                        pa_res: if rng.bool() {
                            String::new()
                        } else {
                            "p".repeat(20_000)
                        },
                    },
                    t,
                ))
                .await
                .map(|_| ()),
            4 => api
                .request_refund(req(
                    pb::RequestRefundRequest {
                        payment_id: if rng.bool() {
                            bad(&mut rng)
                        } else {
                            Uuid::new_v4().to_string()
                        },
                        reason: match rng.u8(0..3) {
                            0 => String::new(),
                            1 => "r".repeat(501),
                            _ => "nul\u{0}".into(),
                        },
                        idempotency_key: Uuid::new_v4().to_string(),
                    },
                    t,
                ))
                .await
                .map(|_| ()),
            5 => api
                .list_payments(req(
                    pb::ListPaymentsRequest {
                        page_size: if rng.bool() {
                            rng.i32(101..)
                        } else {
                            rng.i32(..0)
                        },
                        page_token: junk(&mut rng, 40),
                    },
                    t,
                ))
                .await
                .map(|_| ()),
            6 => api
                .cancel_subscription(req(
                    pb::CancelSubscriptionRequest {
                        when: if rng.bool() { rng.i32(3..) } else { 1 },
                        reason: if rng.bool() {
                            "r".repeat(501)
                        } else {
                            "\u{0}".into()
                        },
                    },
                    t,
                ))
                .await
                .map(|_| ()),
            7 => {
                let mut m = pb::UpdatePaymentMethodRequest {
                    cryptogram: fake::test_cryptogram(CARD_OK, EXP),
                    ip_address: "203.0.113.7".into(),
                    idempotency_key: Uuid::new_v4().to_string(),
                    cardholder_name: String::new(),
                };
                match rng.u8(0..3) {
                    0 => m.cryptogram = bad(&mut rng),
                    1 => m.ip_address = bad(&mut rng),
                    _ => m.idempotency_key = String::new(),
                }
                api.update_payment_method(req(m, t)).await.map(|_| ())
            }
            8 => api
                .change_tariff(req(
                    pb::ChangeTariffRequest {
                        tariff: bad(&mut rng),
                    },
                    t,
                ))
                .await
                .map(|_| ()),
            // Oversize messages: refused before they are decoded.
            _ => {
                let mut m = start_request(CARD_OK);
                m.cryptogram = "A".repeat(70_000 + rng.usize(0..200_000));
                api.start_subscription(req(m, t)).await.map(|_| ())
            }
        };
        let e = result.expect_err("a malformed request must be refused");
        assert!(
            matches!(
                e.code(),
                Code::InvalidArgument
                    | Code::NotFound
                    | Code::FailedPrecondition
                    | Code::OutOfRange
                    | Code::ResourceExhausted
            ),
            "request {i} (kind {kind}): {e:?}"
        );
        assert!(!e.message().is_empty(), "request {i}: an error says why");
        if e.code() == Code::InvalidArgument {
            let v = e
                .get_details_bad_request()
                .unwrap_or_else(|| panic!("request {i}: field violations: {e:?}"));
            assert!(!v.field_violations[0].field.is_empty());
        }
        *codes.entry(format!("{:?}", e.code())).or_default() += 1;
    }
    println!("1000 malformed requests answered: {codes:?}");
    assert_eq!(ledger_digest(&env).await, before, "the ledger is unchanged");
    // The server still answers well-formed calls.
    let s = api
        .get_subscription(req(pb::GetSubscriptionRequest::default(), t))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.status, pb::SubscriptionStatus::Active as i32);
    front.stop().await;
    env.stop().await;
}

/// Sends raw bytes as the request message, whatever they are.
#[derive(Debug, Clone, Default)]
struct RawCodec;

#[derive(Debug)]
struct RawEncoder;

#[derive(Debug)]
struct RawDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_not_protobuf_are_refused_and_change_nothing() {
    let env = Env::start().await;
    let front = GrpcFront::start(&env).await;
    let user = Uuid::new_v4();
    env.subscribe(user, CARD_OK).await;
    let token = front.key.token_for(Uuid::new_v4(), 3600);
    let before = ledger_digest(&env).await;
    let channel = Channel::from_shared(format!("http://{}", front.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    let mut rng = fastrand::Rng::with_seed(7);
    let mut codes = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..100 {
        let len = rng.usize(1..2000);
        let mut body: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        // Start with a field tag whose wire type (7) does not exist, so it never parses.
        body[0] = 0x0f;
        grpc.ready().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/billing.v1.Billing/StartSubscription",
        );
        let e = grpc
            .unary(req(body, Some(token.as_str())), path, RawCodec)
            .await
            .expect_err("garbage is refused");
        assert!(
            matches!(e.code(), Code::Internal | Code::InvalidArgument),
            "request {i}: {e:?}"
        );
        assert!(
            e.message().contains("decode"),
            "request {i}: {}",
            e.message()
        );
        *codes.entry(format!("{:?}", e.code())).or_default() += 1;
    }
    println!("100 garbage bodies answered: {codes:?}");
    assert_eq!(ledger_digest(&env).await, before, "the ledger is unchanged");
    front.stop().await;
    env.stop().await;
}
