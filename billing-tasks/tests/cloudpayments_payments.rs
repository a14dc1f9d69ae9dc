//! The client against the fake over loopback HTTP: every endpoint and outcome.

mod cloudpayments_support;

use std::time::Duration;

use billing_tasks::cloudpayments::fake::{self, BAD_CRYPTOGRAM_MESSAGE, FakeConfig, NOT_FOUND};
use billing_tasks::cloudpayments::{
    ChargeOutcome, Client, Config, DeclineClass, GatewayError, ReasonCode, TransactionStatus,
};
use billing_tasks::secret::Secret;
use cloudpayments_support::*;
use serde_json::{Value, json};

fn approved(outcome: ChargeOutcome) -> billing_tasks::cloudpayments::Transaction {
    match outcome {
        ChargeOutcome::Approved(t) => t,
        other => panic!("expected an approval, got {other:?}"),
    }
}

fn declined(outcome: ChargeOutcome) -> billing_tasks::cloudpayments::Transaction {
    match outcome {
        ChargeOutcome::Declined(t) => t,
        other => panic!("expected a decline, got {other:?}"),
    }
}

/// Posts a raw body to the fake with the default credentials; returns (HTTP status, JSON).
async fn raw(fake: &fake::FakeGateway, path: &str, content_type: &str, body: &str) -> (u16, Value) {
    let config = fake.client_config();
    let response = reqwest::Client::new()
        .post(format!("{}{path}", fake.url()))
        .basic_auth(&config.public_id, Some(config.api_secret.expose()))
        .header("Content-Type", content_type)
        .body(body.to_owned())
        .send()
        .await
        .expect("the fake answers");
    let status = response.status().as_u16();
    let text = response.text().await.expect("a body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn raw_json(fake: &fake::FakeGateway, path: &str, body: Value) -> Value {
    let (status, value) = raw(fake, path, "application/json", &body.to_string()).await;
    assert_eq!(status, 200, "{path}: request errors are HTTP 200");
    value
}

#[tokio::test]
async fn test_method_and_basic_auth() {
    let (fake, client) = start().await;
    let guid = client.test().await.expect("/test succeeds");
    assert_eq!(guid.len(), 36, "a GUID: {guid}");

    let mut wrong = fake.client_config();
    wrong.api_secret = Secret::new("wrong-secret".into());
    let err = Client::new(wrong).unwrap().test().await.unwrap_err();
    assert_eq!(err, GatewayError::Unauthorized);
    assert!(!err.outcome_unknown());
    assert!(!err.is_retryable());

    // POST only.
    let status = reqwest::Client::new()
        .get(format!("{}/test", fake.url()))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 405);

    // A wrong base path is a configuration error, not an unknown outcome.
    let mut lost = fake.client_config();
    lost.base_url = format!("{}/nowhere", fake.url()).parse().unwrap();
    let err = Client::new(lost).unwrap().test().await.unwrap_err();
    assert_eq!(err, GatewayError::UnexpectedStatus { status: 404 });
    assert!(!err.outcome_unknown());
}

#[tokio::test]
async fn cryptogram_charge_is_approved_with_a_token() {
    let (fake, client) = start().await;
    let invoice = id("inv");
    let account = id("acc");
    let t = approved(
        client
            .charge_cryptogram(&card_charge(CARD_OK, &invoice, &account), &id("req"))
            .await
            .unwrap(),
    );
    assert!(t.transaction_id > i64::from(i32::MAX), "ids exceed 32 bits");
    assert_eq!(t.status, TransactionStatus::Completed);
    assert_eq!(t.amount, rub(29_900));
    assert_eq!(t.reason_code, ReasonCode::APPROVED);
    assert_eq!(t.reason.as_deref(), Some("Approved"));
    assert_eq!(t.invoice_id.as_deref(), Some(invoice.as_str()));
    assert_eq!(t.account_id.as_deref(), Some(account.as_str()));
    assert_eq!(t.card.mask().as_deref(), Some("400000******3055"));
    assert_eq!(t.card.card_type.as_deref(), Some("Visa"));
    assert_eq!(t.card.exp_date.as_deref(), Some(EXP));
    assert!(t.test_mode);
    assert!(t.created_at.is_some());
    assert_eq!(t.decline_class(), None);
    let token = t.token.expect("a token is issued");
    assert!(token.expose().starts_with("tk_"));
    assert_eq!(fake.charges_for_invoice(&invoice), 1);
    assert_eq!(fake.total_charged(&invoice), Some(rub(29_900)));

    // Not asking to save the card issues no token.
    let mut no_save = card_charge(CARD_OK, &id("inv"), &account);
    no_save.save_card = false;
    let t = approved(
        client
            .charge_cryptogram(&no_save, &id("req"))
            .await
            .unwrap(),
    );
    assert!(t.token.is_none());
}

#[tokio::test]
async fn every_declining_card_declines_with_its_reason() {
    let (fake, client) = start().await;
    let cases: [(&str, &str, i32, DeclineClass); 6] = [
        (CARD_NSF, EXP, 5051, DeclineClass::RetryLater),
        ("5404000000000043", EXP, 5051, DeclineClass::RetryLater),
        ("2203000000000043", EXP, 5051, DeclineClass::RetryLater),
        // Expired card.
        (CARD_OK, "01/20", 5054, DeclineClass::NeedsCustomer),
        // A valid card number outside the test table: the issuer does not honour it.
        ("4000000000000002", EXP, 5005, DeclineClass::NeverRetry),
        (
            "5555555555554444",
            "02/21",
            5054,
            DeclineClass::NeedsCustomer,
        ),
    ];
    for (pan, exp, code, class) in cases {
        let invoice = id("inv");
        let mut charge = card_charge(pan, &invoice, "acc");
        charge.cryptogram = Secret::new(fake::test_cryptogram(pan, exp));
        let t = declined(client.charge_cryptogram(&charge, &id("req")).await.unwrap());
        assert_eq!(t.reason_code, ReasonCode(code), "{pan} {exp}");
        assert_eq!(t.status, TransactionStatus::Declined);
        assert_eq!(t.decline_class(), Some(class), "{pan}");
        assert_eq!(t.reason.as_deref(), ReasonCode(code).name());
        assert!(t.card_holder_message.is_some());
        assert!(t.token.is_none());
        assert_eq!(fake.charges_for_invoice(&invoice), 0);
    }
    let nsf = declined(
        client
            .charge_cryptogram(&card_charge(CARD_NSF, &id("inv"), "acc"), &id("req"))
            .await
            .unwrap(),
    );
    assert_eq!(
        nsf.card_holder_message.as_deref(),
        Some("Недостаточно средств на карте")
    );

    // Our convention for other reason codes: a declining test cryptogram.
    let mut charge = card_charge(CARD_OK, &id("inv"), "acc");
    charge.cryptogram = Secret::new(fake::test_cryptogram_declined(
        CARD_OK,
        EXP,
        ReasonCode(5091),
    ));
    let t = declined(client.charge_cryptogram(&charge, &id("req")).await.unwrap());
    assert_eq!(t.reason_code, ReasonCode(5091));
    assert_eq!(t.decline_class(), Some(DeclineClass::RetryLater));
}

#[tokio::test]
async fn three_ds_challenge_then_post3ds() {
    let (fake, client) = start().await;
    let invoice = id("inv");
    let request = id("req");
    let challenge = match client
        .charge_cryptogram(&card_charge(CARD_3DS_OK, &invoice, "acc"), &request)
        .await
        .unwrap()
    {
        ChargeOutcome::ThreeDs(c) => c,
        other => panic!("expected a challenge, got {other:?}"),
    };
    assert!(challenge.acs_url.ends_with("/acs"), "{}", challenge.acs_url);
    assert!(!challenge.pa_req.is_empty());
    let waiting = client.get(challenge.transaction_id).await.unwrap().unwrap();
    assert_eq!(waiting.status, TransactionStatus::AwaitingAuthentication);
    assert_eq!(fake.charges_for_invoice(&invoice), 0);

    // The emulated ACS page posts MD and a PaRes back to TermUrl.
    let page = reqwest::Client::new()
        .post(&challenge.acs_url)
        .form(&[
            ("PaReq", challenge.pa_req.as_str()),
            ("MD", &challenge.transaction_id.to_string()),
            ("TermUrl", "https://cinema.example/3ds?x=<y>"),
        ])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains(&challenge.transaction_id.to_string()));
    assert!(page.contains(fake::PA_RES_OK));
    assert!(page.contains("x=&lt;y&gt;"), "TermUrl is escaped");

    let t = approved(
        client
            .post3ds(challenge.transaction_id, fake::PA_RES_OK, &id("req"))
            .await
            .unwrap(),
    );
    assert_eq!(t.transaction_id, challenge.transaction_id);
    assert_eq!(t.status, TransactionStatus::Completed);
    assert!(t.token.is_some());
    assert_eq!(fake.charges_for_invoice(&invoice), 1);
    assert_eq!(fake.charges_for_request(&invoice, &request), 1);

    // Once finished, a second post3ds is a request error and charges nothing.
    let err = client
        .post3ds(challenge.transaction_id, fake::PA_RES_OK, &id("req"))
        .await
        .unwrap_err();
    assert!(matches!(err, GatewayError::Rejected { .. }), "{err:?}");
    assert_eq!(fake.charges_for_invoice(&invoice), 1);
}

#[tokio::test]
async fn three_ds_failures_decline() {
    let (fake, client) = start().await;
    for (pan, pa_res, code) in [
        (CARD_3DS_OK, fake::PA_RES_FAIL, 5206),
        (CARD_3DS_OK, "tampered", 5206),
        (CARD_3DS_OK, fake::PA_RES_UNAVAILABLE, 5207),
        (CARD_3DS_NSF, fake::PA_RES_OK, 5051),
        ("2202202202202200", fake::PA_RES_OK, 5051),
    ] {
        let invoice = id("inv");
        let outcome = client
            .charge_cryptogram(&card_charge(pan, &invoice, "acc"), &id("req"))
            .await
            .unwrap();
        let ChargeOutcome::ThreeDs(challenge) = outcome else {
            panic!("{pan} needs 3-D Secure")
        };
        let t = declined(
            client
                .post3ds(challenge.transaction_id, pa_res, &id("req"))
                .await
                .unwrap(),
        );
        assert_eq!(t.reason_code, ReasonCode(code), "{pan} {pa_res}");
        assert_eq!(t.status, TransactionStatus::Declined);
        assert!(t.token.is_none());
        assert_eq!(fake.charges_for_invoice(&invoice), 0);
    }
    let t = declined(
        client
            .post3ds(
                match client
                    .charge_cryptogram(&card_charge(CARD_3DS_OK, &id("inv"), "acc"), &id("req"))
                    .await
                    .unwrap()
                {
                    ChargeOutcome::ThreeDs(c) => c.transaction_id,
                    other => panic!("{other:?}"),
                },
                fake::PA_RES_FAIL,
                &id("req"),
            )
            .await
            .unwrap(),
    );
    assert_eq!(t.decline_class(), Some(DeclineClass::NeedsCustomer));
    let unknown = client
        .post3ds(1, fake::PA_RES_OK, &id("req"))
        .await
        .unwrap_err();
    assert_eq!(
        unknown,
        GatewayError::Rejected {
            message: NOT_FOUND.into()
        }
    );
}

#[tokio::test]
async fn token_charges() {
    let config = FakeConfig::default().with_terminal(other_terminal());
    let (fake, client) = start_with(config).await;
    let account = id("acc");
    let token = paid(&client, CARD_OK, &account).await.token.unwrap();

    let invoice = id("inv");
    let t = approved(
        client
            .charge_token(&token_charge(&token, &account, &invoice), &id("req"))
            .await
            .unwrap(),
    );
    assert_eq!(t.status, TransactionStatus::Completed);
    assert_eq!(t.card.last_four.as_deref(), Some("3055"));
    assert_eq!(fake.charges_for_invoice(&invoice), 1);

    // The card whose token payments have insufficient funds.
    let nsf_token = paid(&client, CARD_TOKEN_NSF, &account).await.token.unwrap();
    let t = declined(
        client
            .charge_token(&token_charge(&nsf_token, &account, &id("inv")), &id("req"))
            .await
            .unwrap(),
    );
    assert_eq!(t.reason_code, ReasonCode::INSUFFICIENT_FUNDS);

    // Another payer's token, an unknown token: request errors, nothing happens.
    let err = client
        .charge_token(
            &token_charge(&token, "someone-else", &id("inv")),
            &id("req"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, GatewayError::Rejected { message } if message.contains("AccountId")),
        "{err:?}"
    );
    assert!(!err.outcome_unknown());
    let err = client
        .charge_token(
            &token_charge(&Secret::new("tk_unknown".into()), &account, &id("inv")),
            &id("req"),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, GatewayError::Rejected { .. }));

    // A token works only on its terminal.
    let other = Client::new(fake.client_config_for(&other_terminal().public_id).unwrap()).unwrap();
    let t = declined(
        other
            .charge_token(&token_charge(&token, &account, &id("inv")), &id("req"))
            .await
            .unwrap(),
    );
    assert_eq!(t.reason_code, ReasonCode::CROSS_TERMINAL_TOKEN);
    assert_eq!(t.decline_class(), Some(DeclineClass::NeverRetry));

    // TrInitiatorCode is required by the gateway; the client always sends it.
    let body = raw_json(
        &fake,
        "/payments/tokens/charge",
        json!({"Amount": 1, "AccountId": account, "Token": token.expose()}),
    )
    .await;
    assert_eq!(
        body,
        json!({"Success": false, "Message": "TrInitiatorCode is required"})
    );
}

#[tokio::test]
async fn refunds_full_partial_and_too_much() {
    let (fake, client) = start().await;
    let payment = paid(&client, CARD_OK, "acc").await;
    let half = client
        .refund(payment.transaction_id, rub(10_000), &id("req"))
        .await
        .unwrap();
    assert_ne!(half, payment.transaction_id);
    let rest = client
        .refund(payment.transaction_id, rub(19_900), &id("req"))
        .await
        .unwrap();
    assert_ne!(rest, half, "each partial refund is its own transaction");
    let too_much = client
        .refund(payment.transaction_id, rub(1), &id("req"))
        .await
        .unwrap_err();
    assert!(
        matches!(&too_much, GatewayError::Rejected { message } if message.contains("exceeds")),
        "{too_much:?}"
    );
    assert!(!too_much.outcome_unknown());

    let after = client.get(payment.transaction_id).await.unwrap().unwrap();
    assert!(after.refunded);
    assert_eq!(
        fake.transaction(payment.transaction_id).unwrap().refunded,
        rub(29_900)
    );
    let refund = client.get(rest).await.unwrap().unwrap();
    assert_eq!(refund.original_transaction_id, Some(payment.transaction_id));
    assert_eq!(refund.amount, rub(19_900));

    // One refund of everything.
    let other = paid(&client, CARD_OK, "acc").await;
    client
        .refund(other.transaction_id, rub(29_900), &id("req"))
        .await
        .unwrap();
    assert!(
        client
            .get(other.transaction_id)
            .await
            .unwrap()
            .unwrap()
            .refunded
    );

    // A declined payment cannot be refunded; an unknown one is not found.
    let nsf = declined(
        client
            .charge_cryptogram(&card_charge(CARD_NSF, &id("inv"), "acc"), &id("req"))
            .await
            .unwrap(),
    );
    assert!(matches!(
        client
            .refund(nsf.transaction_id, rub(100), &id("req"))
            .await,
        Err(GatewayError::Rejected { .. })
    ));
    assert_eq!(
        client.refund(42, rub(100), &id("req")).await,
        Err(GatewayError::Rejected {
            message: NOT_FOUND.into()
        })
    );
}

#[tokio::test]
async fn two_stage_confirm_and_void_rules() {
    let (_fake, client) = start().await;
    let auth = approved(
        client
            .auth_cryptogram(&card_charge(CARD_OK, &id("inv"), "acc"), &id("req"))
            .await
            .unwrap(),
    );
    assert_eq!(auth.status, TransactionStatus::Authorized);
    client.void(auth.transaction_id, &id("req")).await.unwrap();
    assert_eq!(
        client
            .get(auth.transaction_id)
            .await
            .unwrap()
            .unwrap()
            .status,
        TransactionStatus::Cancelled
    );
    // Void only what is authorized: not twice, not a completed charge.
    assert!(matches!(
        client.void(auth.transaction_id, &id("req")).await,
        Err(GatewayError::Rejected { .. })
    ));
    let charged = paid(&client, CARD_OK, "acc").await;
    assert!(matches!(
        client.void(charged.transaction_id, &id("req")).await,
        Err(GatewayError::Rejected { .. })
    ));

    let auth = approved(
        client
            .auth_cryptogram(&card_charge(CARD_OK, &id("inv"), "acc"), &id("req"))
            .await
            .unwrap(),
    );
    assert!(matches!(
        client
            .confirm(auth.transaction_id, rub(30_000), &id("req"))
            .await,
        Err(GatewayError::Rejected { .. })
    ));
    client
        .confirm(auth.transaction_id, rub(20_000), &id("req"))
        .await
        .unwrap();
    let t = client.get(auth.transaction_id).await.unwrap().unwrap();
    assert_eq!(
        (t.status, t.amount),
        (TransactionStatus::Completed, rub(20_000))
    );
}

#[tokio::test]
async fn get_and_find() {
    let (fake, client) = start().await;
    assert_eq!(client.get(12_345).await, Ok(None));
    assert_eq!(client.find("no-such-invoice").await, Ok(None));

    let invoice = id("inv");
    let nsf = declined(
        client
            .charge_cryptogram(&card_charge(CARD_NSF, &invoice, "acc"), &id("req"))
            .await
            .unwrap(),
    );
    let found = client.find(&invoice).await.unwrap().unwrap();
    assert_eq!(
        (found.transaction_id, found.status),
        (nsf.transaction_id, TransactionStatus::Declined)
    );
    assert_eq!(
        client
            .get(nsf.transaction_id)
            .await
            .unwrap()
            .unwrap()
            .reason_code,
        ReasonCode(5051)
    );

    // The latest payment wins; v2 also sees the refund.
    let ok = approved(
        client
            .charge_cryptogram(&card_charge(CARD_OK, &invoice, "acc"), &id("req"))
            .await
            .unwrap(),
    );
    assert_eq!(
        client.find(&invoice).await.unwrap().unwrap().transaction_id,
        ok.transaction_id
    );
    let refund = client
        .refund(ok.transaction_id, rub(100), &id("req"))
        .await
        .unwrap();
    assert_eq!(
        client.find(&invoice).await.unwrap().unwrap().transaction_id,
        ok.transaction_id
    );
    let v2 = raw_json(&fake, "/v2/payments/find", json!({"InvoiceId": invoice})).await;
    assert_eq!(v2["Model"]["TransactionId"], json!(refund));
    assert_eq!(v2["Model"]["Type"], json!(1));
}

#[tokio::test]
async fn validation_errors_are_http_200_with_a_message() {
    let (fake, client) = start().await;
    let packet = fake::test_cryptogram(CARD_OK, EXP);
    let base = json!({"Amount": 10, "IpAddress": "1.2.3.4", "CardCryptogramPacket": packet});
    let with = |key: &str, value: Value| {
        let mut body = base.clone();
        body[key] = value;
        body
    };
    let without = |key: &str| {
        let mut body = base.clone();
        body.as_object_mut().unwrap().remove(key);
        body
    };
    let cases = [
        (without("Amount"), "Amount is required"),
        (with("Amount", json!("abc")), "Invalid Amount value"),
        (with("Amount", json!(1.005)), "Invalid Amount value"),
        (with("Amount", json!(0)), "Invalid Amount value"),
        (with("Amount", json!(-5)), "Invalid Amount value"),
        (with("Currency", json!("roubles")), "Invalid Currency value"),
        (without("IpAddress"), "IpAddress is required"),
        (
            with("IpAddress", json!("localhost")),
            "Invalid IpAddress value",
        ),
        (
            without("CardCryptogramPacket"),
            "CardCryptogramPacket is required",
        ),
        (
            with("CardCryptogramPacket", json!("garbage")),
            BAD_CRYPTOGRAM_MESSAGE,
        ),
    ];
    for (body, message) in cases {
        let answer = raw_json(&fake, "/payments/cards/charge", body.clone()).await;
        assert_eq!(
            answer,
            json!({"Success": false, "Message": message}),
            "{body}"
        );
    }
    let (status, answer) = raw(&fake, "/payments/cards/charge", "application/json", "{oops").await;
    assert_eq!((status, answer["Success"].clone()), (200, json!(false)));
    assert_eq!(
        raw_json(&fake, "/payments/get", json!({})).await["Message"],
        json!("TransactionId is required")
    );
    assert_eq!(
        raw_json(&fake, "/payments/find", json!({})).await["Message"],
        json!("InvoiceId is required")
    );
    assert_eq!(fake.transaction_count(), 0, "nothing was recorded");

    // Through the client: a request error, certainly without effect.
    let mut charge = card_charge(CARD_OK, &id("inv"), "acc");
    charge.cryptogram = Secret::new("not-a-cryptogram".into());
    let err = client
        .charge_cryptogram(&charge, &id("req"))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        GatewayError::Rejected {
            message: BAD_CRYPTOGRAM_MESSAGE.into()
        }
    );
    assert!(!err.outcome_unknown());

    // Refused before sending: zero amounts and empty request ids.
    let before = fake.requests("/payments/cards/charge");
    let mut zero = card_charge(CARD_OK, &id("inv"), "acc");
    zero.amount = rub(0);
    assert!(matches!(
        client.charge_cryptogram(&zero, &id("req")).await,
        Err(GatewayError::InvalidRequest { .. })
    ));
    assert!(matches!(
        client
            .charge_cryptogram(&card_charge(CARD_OK, &id("inv"), "acc"), " ")
            .await,
        Err(GatewayError::InvalidRequest { .. })
    ));
    assert_eq!(fake.requests("/payments/cards/charge"), before);
}

#[tokio::test]
async fn form_bodies_and_any_key_case() {
    let (fake, _client) = start().await;
    let packet = fake::test_cryptogram(CARD_OK, EXP);
    let invoice = id("inv");
    let form = billing_tasks::cloudpayments::form::encode(&[
        ("amount", "15.50"),
        ("ipaddress", "10.0.0.1"),
        ("cardCryptogramPacket", packet.as_str()),
        ("INVOICEID", invoice.as_str()),
        ("accountId", "acc"),
        ("Unknown", "ignored"),
    ]);
    let (status, answer) = raw(
        &fake,
        "/payments/cards/charge",
        "application/x-www-form-urlencoded",
        &form,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(answer["Success"], json!(true), "{answer}");
    assert_eq!(answer["Model"]["Amount"], json!(15.5));
    assert_eq!(answer["Model"]["InvoiceId"], json!(invoice));
    assert_eq!(fake.charges_for_invoice(&invoice), 1);

    // Lower-case JSON keys and numbers as strings, as some client libraries send.
    let answer = raw_json(
        &fake,
        "/payments/get",
        json!({"transactionId": answer["Model"]["TransactionId"].to_string()}),
    )
    .await;
    assert_eq!(answer["Model"]["Status"], json!("Completed"));
}

#[tokio::test]
async fn config_from_environment_names_the_variable() {
    let err = Config::from_lookup(|_| None).unwrap_err();
    assert_eq!(err.to_string(), "CLOUDPAYMENTS_PUBLIC_ID is not set");
    let (fake, _client) = start().await;
    let cfg = fake.client_config();
    let url = fake.url();
    let public_id = cfg.public_id.clone();
    let secret = cfg.api_secret.expose().clone();
    let config = Config::from_lookup(move |name| match name {
        "CLOUDPAYMENTS_URL" => Some(url.clone()),
        "CLOUDPAYMENTS_PUBLIC_ID" => Some(public_id.clone()),
        "CLOUDPAYMENTS_API_SECRET" => Some(secret.clone()),
        _ => None,
    })
    .unwrap()
    .with_timeouts(Duration::from_secs(1), Duration::from_secs(5));
    Client::new(config).unwrap().test().await.unwrap();
}
