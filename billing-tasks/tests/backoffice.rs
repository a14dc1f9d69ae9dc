//! The back-office's routes against a real ledger, gateway fake, broker and worker: every route
//! for every role, CSRF, the actions and their audit entries, bad input that changes nothing,
//! the search and the CSV exports.

mod billing_support;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use billing_support::backoffice::{self as bo, STAFF};
use billing_support::*;
use uuid::Uuid;

/// Everything an action could change: equal before and after means nothing was written.
async fn snapshot(env: &Env) -> Vec<String> {
    let mut v = Vec::new();
    for sql in [
        "SELECT count(*)::text FROM refund",
        "SELECT count(*)::text FROM refund_approval",
        "SELECT count(*)::text FROM audit_log",
        "SELECT count(*)::text FROM resolution",
        "SELECT count(*)::text FROM outbox",
        "SELECT count(*)::text FROM status_history",
        "SELECT coalesce(string_agg(status || auto_renew::text || coalesce(current_period_end::text, ''), ','), '') FROM subscription",
        "SELECT coalesce(string_agg(status || coalesce(next_attempt_at::text, ''), ','), '') FROM invoice",
        "SELECT coalesce(string_agg(status || attempts::text, ','), '') FROM outbox",
    ] {
        v.push(
            sqlx::query_scalar::<_, String>(sql)
                .fetch_one(&env.db)
                .await
                .unwrap(),
        );
    }
    v
}

/// A subscribed payer: (payer, payment, subscription).
async fn subscribed(env: &Env) -> (Uuid, Uuid, Uuid) {
    let user = Uuid::new_v4();
    let p = env.subscribe(user, CARD_OK).await;
    (user, p.id, p.subscription_id)
}

#[tokio::test]
async fn every_route_answers_each_role_as_the_rules_say() {
    let env = Env::start().await;
    let app = bo::app(&env, &bo::args(1000));
    let (payer, payment, sub) = subscribed(&env).await;
    let invoice: Uuid = sqlx::query_scalar("SELECT invoice_id FROM payment WHERE id = $1")
        .bind(payment)
        .fetch_one(&env.db)
        .await
        .unwrap();

    // (path, lowest role that may read it)
    let gets: Vec<(String, &str)> = vec![
        ("/admin".into(), "support"),
        ("/admin/search?q=9999".into(), "support"),
        (format!("/admin/payers/{payer}"), "support"),
        ("/admin/payments?status=succeeded".into(), "support"),
        ("/admin/invoices".into(), "support"),
        ("/admin/refunds".into(), "support"),
        ("/admin/subscriptions?past_due=1".into(), "support"),
        ("/admin/attention/stuck".into(), "support"),
        ("/admin/attention/unmatched".into(), "support"),
        ("/admin/attention/mismatches".into(), "support"),
        ("/admin/attention/dead-outbox".into(), "support"),
        ("/admin/approvals".into(), "support"),
        ("/admin/notifications".into(), "support"),
        ("/admin/payments.csv".into(), "accountant"),
        ("/admin/invoices.csv".into(), "accountant"),
        ("/admin/refunds.csv".into(), "accountant"),
        ("/admin/subscriptions.csv".into(), "accountant"),
        ("/admin/reports".into(), "accountant"),
        ("/admin/reports?unit=monthly".into(), "accountant"),
        ("/admin/reports.csv".into(), "accountant"),
        ("/admin/audit".into(), "accountant"),
        ("/admin/audit.csv".into(), "accountant"),
        ("/admin/staff".into(), "admin"),
    ];
    let rank = |r: &str| {
        ["support", "accountant", "admin"]
            .iter()
            .position(|x| *x == r)
            .unwrap()
    };
    let mut checked = 0;
    for (path, lowest) in &gets {
        for (user, role) in STAFF {
            let (status, body) = bo::get(&app, path, user).await;
            let expected = if rank(role) >= rank(lowest) {
                StatusCode::OK
            } else {
                StatusCode::FORBIDDEN
            };
            assert_eq!(status, expected, "GET {path} as {user} ({role}): {body}");
            checked += 1;
        }
    }
    // Nobody signed in: a browser goes to the sign-in page, a script gets 401.
    let (status, _, headers) = bo::send(
        &app,
        Request::get("/admin/payments")
            .header(header::ACCEPT, "text/html")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(status.is_redirection());
    assert_eq!(
        headers[header::LOCATION],
        "/admin/login?next=%2Fadmin%2Fpayments"
    );
    let (status, _, _) = bo::send(
        &app,
        Request::get("/admin/payments").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, page, _) = bo::send(
        &app,
        Request::get("/admin/login").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("action=\"/admin/login\"") && page.contains("Войти"),
        "{page}"
    );

    // Every action route: unknown ids for the roles allowed (404/422, never 5xx), 403 below.
    let approval = Uuid::new_v4();
    let posts: Vec<(String, &str)> = vec![
        (format!("/admin/payments/{payment}/refund"), "support"),
        (format!("/admin/subscriptions/{sub}/cancel"), "support"),
        (format!("/admin/subscriptions/{sub}/extend"), "support"),
        (format!("/admin/subscriptions/{sub}/resend-role"), "support"),
        (format!("/admin/invoices/{invoice}/retry"), "support"),
        (
            format!("/admin/outbox/{}/redeliver", Uuid::new_v4()),
            "support",
        ),
        (format!("/admin/approvals/{approval}/approve"), "accountant"),
        (format!("/admin/approvals/{approval}/reject"), "accountant"),
        ("/admin/findings/1/resolve".into(), "accountant"),
        ("/admin/notifications/1/resolve".into(), "accountant"),
        ("/admin/staff".into(), "admin"),
        ("/admin/staff/nobody/role".into(), "admin"),
        ("/admin/staff/nobody/password".into(), "admin"),
        ("/admin/staff/nobody/disable".into(), "admin"),
        ("/admin/staff/nobody/enable".into(), "admin"),
    ];
    let before = snapshot(&env).await;
    for (path, lowest) in &posts {
        for (user, role) in STAFF {
            // No reason chosen: refused before anything happens, by whoever may act.
            let (status, body) = bo::post(
                &app,
                path,
                user,
                &[("key", &bo::key()), ("amount", "1"), ("currency", "RUB")],
            )
            .await;
            if rank(role) >= rank(lowest) {
                assert!(
                    status == StatusCode::UNPROCESSABLE_ENTITY || status == StatusCode::NOT_FOUND,
                    "POST {path} as {user}: {status} {body}"
                );
            } else {
                assert_eq!(
                    status,
                    StatusCode::FORBIDDEN,
                    "POST {path} as {user}: {body}"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(
        snapshot(&env).await,
        before,
        "refused actions changed something"
    );
    println!("{checked} route × role checks");
    env.stop().await;
}

#[tokio::test]
async fn actions_need_the_sessions_csrf_token_and_change_nothing_without_it() {
    let env = Env::start().await;
    let app = bo::app(&env, &bo::args(1000));
    let (payer, payment, _) = subscribed(&env).await;
    let cookie = bo::sign_in(&app, "sveta").await;
    let page = |path: String| {
        Request::get(path)
            .header(header::COOKIE, cookie.clone())
            .body(Body::empty())
            .unwrap()
    };
    let (status, html, _) = bo::send(&app, page(format!("/admin/payers/{payer}"))).await;
    assert_eq!(status, StatusCode::OK);
    let csrf = bo::field(&html, "csrf").expect("forms carry the CSRF token");
    let key = bo::field(&html, "key").expect("forms carry a one-time key");
    let form = |csrf: Option<&str>| {
        let mut fields = vec![
            ("reason", "request"),
            ("note", "asked by phone"),
            ("key", key.as_str()),
            ("amount", "100"),
            ("currency", "RUB"),
        ];
        if let Some(c) = csrf {
            fields.push(("csrf", c));
        }
        Request::post(format!("/admin/payments/{payment}/refund"))
            .header(header::COOKIE, cookie.clone())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(serde_urlencoded::to_string(&fields).unwrap()))
            .unwrap()
    };
    let before = snapshot(&env).await;
    for bad in [None, Some("forged"), Some(&csrf[..csrf.len() - 1])] {
        let (status, body, _) = bo::send(&app, form(bad)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(body.contains("CSRF"), "{body}");
    }
    assert_eq!(
        snapshot(&env).await,
        before,
        "a refused form changed something"
    );
    // Another session's token does not do either.
    let other = bo::sign_in(&app, "anna").await;
    let (_, other_html, _) = bo::send(
        &app,
        Request::get(format!("/admin/payers/{payer}"))
            .header(header::COOKIE, other)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    let other_csrf = bo::field(&other_html, "csrf").unwrap();
    let (status, _, _) = bo::send(&app, form(Some(&other_csrf))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(snapshot(&env).await, before);

    // Every other action route, with a complete form but no token, from an admin's session.
    let root = bo::sign_in(&app, "root").await;
    let invoice: Uuid = sqlx::query_scalar("SELECT invoice_id FROM payment WHERE id = $1")
        .bind(payment)
        .fetch_one(&env.db)
        .await
        .unwrap();
    let sub: Uuid = sqlx::query_scalar("SELECT subscription_id FROM invoice WHERE id = $1")
        .bind(invoice)
        .fetch_one(&env.db)
        .await
        .unwrap();
    let outbox: Uuid = sqlx::query_scalar("SELECT id FROM outbox LIMIT 1")
        .fetch_one(&env.db)
        .await
        .unwrap();
    let routes = [
        format!("/admin/subscriptions/{sub}/cancel"),
        format!("/admin/subscriptions/{sub}/extend"),
        format!("/admin/subscriptions/{sub}/resend-role"),
        format!("/admin/invoices/{invoice}/retry"),
        format!("/admin/outbox/{outbox}/redeliver"),
        format!("/admin/approvals/{}/approve", Uuid::new_v4()),
        format!("/admin/approvals/{}/reject", Uuid::new_v4()),
        "/admin/findings/1/resolve".to_owned(),
        "/admin/notifications/1/resolve".to_owned(),
        "/admin/staff".to_owned(),
        "/admin/staff/sveta/role".to_owned(),
        "/admin/staff/sveta/password".to_owned(),
        "/admin/staff/sveta/disable".to_owned(),
        "/admin/staff/sveta/enable".to_owned(),
    ];
    for path in &routes {
        let fields = [
            ("reason", "request"),
            ("note", "n"),
            ("key", &bo::key()),
            ("when", "now"),
            ("days", "7"),
            ("name", "newbie"),
            ("role", "support"),
            ("password", "a long enough password"),
        ];
        let (status, body, _) = bo::send(
            &app,
            Request::post(path.as_str())
                .header(header::COOKIE, root.clone())
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(serde_urlencoded::to_string(fields).unwrap()))
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
    }
    assert_eq!(
        snapshot(&env).await,
        before,
        "a form without its token changed something"
    );
    let staff: i64 = sqlx::query_scalar("SELECT count(*) FROM staff_user")
        .fetch_one(&env.db)
        .await
        .unwrap();
    assert_eq!(staff, 0);

    let (status, body, _) = bo::send(&app, form(Some(&csrf))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("Готово"), "{body}");
    let refunds: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM refund WHERE requested_by = 'staff:sveta' AND amount_minor = 10000",
    )
    .fetch_one(&env.db)
    .await
    .unwrap();
    assert_eq!(refunds, 1);
    // The same form again: one refund, the second answer says so.
    let (status, body, _) = bo::send(&app, form(Some(&csrf))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("уже сделано"), "{body}");
    let all: i64 = sqlx::query_scalar("SELECT count(*) FROM refund")
        .fetch_one(&env.db)
        .await
        .unwrap();
    assert_eq!(all, 1);
    // Sign out ends the session.
    let (status, _, _) = bo::send(
        &app,
        Request::post("/admin/logout")
            .header(header::COOKIE, cookie.clone())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("csrf={csrf}")))
            .unwrap(),
    )
    .await;
    assert!(status.is_redirection());
    env.stop().await;
}

#[tokio::test]
async fn a_refund_above_the_threshold_waits_for_a_second_person_then_reaches_the_gateway() {
    let env = Env::start().await;
    // 299 ₽ payments; refunds above 100 ₽ need approval.
    let app = bo::app(&env, &bo::args(100));
    let (payer, payment, _) = subscribed(&env).await;
    let why = |key: &str| {
        vec![
            ("reason", "service".to_owned()),
            ("note", "no picture".to_owned()),
            ("key", key.to_owned()),
        ]
    };
    let refund_form = |key: &str, amount: &str| {
        let mut f = why(key);
        f.push(("amount", amount.to_owned()));
        f.push(("currency", "RUB".to_owned()));
        f
    };
    let as_pairs = |f: &Vec<(&'static str, String)>| {
        f.iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>()
    };
    let post = |path: String, user: &'static str, form: Vec<(&'static str, String)>| {
        let app = app.clone();
        async move {
            let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
            bo::post(&app, &path, user, &pairs).await
        }
    };
    let (status, body) = post(
        format!("/admin/payments/{payment}/refund"),
        "sveta",
        as_pairs(&refund_form(&bo::key(), "299,00")),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let approval: Uuid =
        sqlx::query_scalar("SELECT id FROM refund_approval WHERE status = 'pending'")
            .fetch_one(&env.db)
            .await
            .unwrap();
    let refunds: i64 = sqlx::query_scalar("SELECT count(*) FROM refund")
        .fetch_one(&env.db)
        .await
        .unwrap();
    assert_eq!(refunds, 0, "nothing is refunded before the approval");
    // The waiting request holds its amount: nothing more can be asked for meanwhile.
    let before = snapshot(&env).await;
    let (status, body) = post(
        format!("/admin/payments/{payment}/refund"),
        "sveta",
        as_pairs(&refund_form(&bo::key(), "1")),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body.contains("не больше 0,00"), "{body}");
    // Support cannot approve; nobody approves their own request.
    let (status, _) = post(
        format!("/admin/approvals/{approval}/approve"),
        "sveta",
        as_pairs(&why(&bo::key())),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(snapshot(&env).await, before);
    let (status, body) = post(
        format!("/admin/payments/{payment}/refund"),
        "anna",
        as_pairs(&refund_form(&bo::key(), "299")),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, page) = bo::get(&app, "/admin/approvals", "anna").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(&format!("approve-{approval}")), "{page}");
    assert!(page.contains("299,00"), "{page}");

    let key = bo::key();
    let (status, body) = post(
        format!("/admin/approvals/{approval}/approve"),
        "anna",
        as_pairs(&why(&key)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = post(
        format!("/admin/approvals/{approval}/approve"),
        "anna",
        as_pairs(&why(&key)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("уже сделано"), "{body}");
    let (status, body) = post(
        format!("/admin/approvals/{approval}/approve"),
        "oleg",
        as_pairs(&why(&bo::key())),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "decided once: {body}"
    );

    // The worker moves the money; the gateway has it and the ledger agrees.
    let refund_id: Uuid = eventually("the refund to succeed", Duration::from_secs(60), || async {
        sqlx::query_scalar::<_, Uuid>("SELECT id FROM refund WHERE status = 'succeeded'")
            .fetch_optional(&env.db)
            .await
            .unwrap()
    })
    .await;
    let (by, amount): (String, i64) =
        sqlx::query_as("SELECT requested_by, amount_minor FROM refund WHERE id = $1")
            .bind(refund_id)
            .fetch_one(&env.db)
            .await
            .unwrap();
    assert_eq!((by.as_str(), amount), ("staff:sveta", 29_900));
    env.assert_ledger_matches_gateway().await;
    let actions: Vec<(String, String)> =
        sqlx::query_as("SELECT actor, action FROM audit_log ORDER BY id")
            .fetch_all(&env.db)
            .await
            .unwrap();
    assert_eq!(
        actions,
        vec![
            ("sveta".into(), "refund.request_approval".into()),
            ("anna".into(), "refund.approve".into())
        ]
    );
    let (_, page) = bo::get(&app, &format!("/admin/payers/{payer}"), "sveta").await;
    assert!(
        page.contains("refund.approve") && page.contains("staff:sveta"),
        "the timeline shows it"
    );
    // The audit log refuses changes, whoever asks.
    for sql in ["UPDATE audit_log SET reason = 'x'", "DELETE FROM audit_log"] {
        let e = sqlx::query(sql)
            .execute(&env.db)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("append-only"), "{e}");
    }
    env.stop().await;
}

#[tokio::test]
async fn bad_input_on_every_form_gives_a_clear_message_and_changes_nothing() {
    let env = Env::start().await;
    let app = bo::app(&env, &bo::args(1000));
    let (_, payment, sub) = subscribed(&env).await;
    let ok_why = [("reason", "request"), ("note", "")];
    let refund = format!("/admin/payments/{payment}/refund");
    let extend = format!("/admin/subscriptions/{sub}/extend");
    let cancel = format!("/admin/subscriptions/{sub}/cancel");
    let missing = Uuid::new_v4();
    let cases: Vec<Case> = vec![
        (
            refund.clone(),
            vec![("amount", "-5"), ("currency", "RUB")],
            "больше нуля",
        ),
        (
            refund.clone(),
            vec![("amount", "0"), ("currency", "RUB")],
            "больше нуля",
        ),
        (
            refund.clone(),
            vec![("amount", "0,00"), ("currency", "RUB")],
            "больше нуля",
        ),
        (
            refund.clone(),
            vec![("amount", ""), ("currency", "RUB")],
            "Укажите сумму",
        ),
        (
            refund.clone(),
            vec![("amount", "abc"), ("currency", "RUB")],
            "число",
        ),
        (
            refund.clone(),
            vec![("amount", "1,234"), ("currency", "RUB")],
            "двух знаков",
        ),
        (
            refund.clone(),
            vec![("amount", "299,01"), ("currency", "RUB")],
            "не больше 299,00",
        ),
        (
            refund.clone(),
            vec![("amount", "99999999999"), ("currency", "RUB")],
            "слишком велика",
        ),
        (
            refund.clone(),
            vec![("amount", "10"), ("currency", "USD")],
            "той же валюте",
        ),
        (
            format!("/admin/payments/{missing}/refund"),
            vec![("amount", "10"), ("currency", "RUB")],
            "Нет такого платежа",
        ),
        (extend.clone(), vec![("days", "0")], "1–365"),
        (extend.clone(), vec![("days", "-3")], "1–365"),
        (extend.clone(), vec![("days", "400")], "1–365"),
        (extend.clone(), vec![("days", "seven")], "целое"),
        (
            format!("/admin/subscriptions/{missing}/extend"),
            vec![("days", "7")],
            "Нет такой подписки",
        ),
        (cancel.clone(), vec![("when", "tomorrow")], "when"),
        (
            format!("/admin/subscriptions/{missing}/cancel"),
            vec![("when", "now")],
            "Нет такой подписки",
        ),
        (
            format!("/admin/invoices/{missing}/retry"),
            vec![],
            "Нет такого счёта",
        ),
        (
            format!("/admin/outbox/{missing}/redeliver"),
            vec![],
            "Нет такого сообщения",
        ),
        (
            format!("/admin/approvals/{missing}/approve"),
            vec![],
            "Нет такого запроса",
        ),
        (
            "/admin/findings/999/resolve".into(),
            vec![],
            "Нет такой записи",
        ),
    ];
    let before = snapshot(&env).await;
    for (path, fields, expected) in &cases {
        let key = bo::key();
        let mut form: Vec<(&str, &str)> = ok_why.to_vec();
        form.push(("key", &key));
        form.extend(fields.iter().copied());
        let (status, body) = bo::post(&app, path, "root", &form).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path} {fields:?}: {body}"
        );
        assert!(
            body.contains(expected),
            "{path} {fields:?}: expected {expected:?} in {body}"
        );
        assert_eq!(
            snapshot(&env).await,
            before,
            "{path} {fields:?} changed something"
        );
    }
    // A reason not on the list, a note too long, a stale form.
    let long = "x".repeat(501);
    for (fields, expected) in [
        (vec![("reason", "because"), ("key", "k")], "причину"),
        (
            vec![
                ("reason", "request"),
                ("note", long.as_str()),
                ("key", "00000000-0000-0000-0000-000000000001"),
            ],
            "500",
        ),
        (
            vec![("reason", "request"), ("key", "not-a-key")],
            "устарела",
        ),
    ] {
        let mut form = fields.clone();
        form.extend([("amount", "10"), ("currency", "RUB")]);
        let (status, body) = bo::post(&app, &refund, "root", &form).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(body.contains(expected), "{expected}: {body}");
    }
    // A list filter that does not parse says which field.
    let (status, body) = bo::get(&app, "/admin/payments?amount_min=lots", "root").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("amount_min"), "{body}");
    let (status, _) = bo::get(&app, "/admin/payers/not-an-id", "root").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(snapshot(&env).await, before);
    println!("{} bad forms refused, nothing changed", cases.len() + 3);
    env.stop().await;
}

#[tokio::test]
async fn support_cancels_extends_retries_and_resends_and_each_is_in_the_audit_log() {
    let env = Env::start().await;
    let app = bo::app(&env, &bo::args(1000));
    let (payer, _, sub) = subscribed(&env).await;
    let act = |path: String, extra: Vec<(&'static str, &'static str)>| {
        let app = app.clone();
        async move {
            let key = bo::key();
            let mut form = vec![
                ("reason", "goodwill"),
                ("note", "sorry"),
                ("key", key.as_str()),
            ];
            form.extend(extra);
            bo::post(&app, &path, "sveta", &form).await
        }
    };
    let end = |db: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
            "SELECT current_period_end FROM subscription WHERE id = $1",
        )
        .bind(sub)
        .fetch_one(&db)
        .await
        .unwrap()
    };
    let before = end(env.db.clone()).await;
    let (status, body) = act(
        format!("/admin/subscriptions/{sub}/extend"),
        vec![("days", "7")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        end(env.db.clone()).await - before,
        chrono::Duration::days(7)
    );

    let (status, body) = act(format!("/admin/subscriptions/{sub}/resend-role"), vec![]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let grants = env.outbox("auth.grant").await;
    assert_eq!(
        grants.len(),
        2,
        "the first grant and the resent one: {grants:?}"
    );
    assert_eq!(grants[1]["role"], grants[0]["role"]);
    assert!(
        grants[1]["until"]
            .as_str()
            .is_some_and(|u| u > grants[0]["until"].as_str().unwrap()),
        "the extended end: {grants:?}"
    );

    // A renewal invoice comes due; support charges it now.
    env.clock
        .set(before + chrono::Duration::days(7) - chrono::Duration::hours(12));
    let created = billing_tasks::renewals::create_renewal_invoices(&env.billing)
        .await
        .unwrap();
    assert_eq!(created.len(), 1);
    let (status, body) = act(format!("/admin/invoices/{}/retry", created[0]), vec![]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually(
        "the renewal to be paid",
        Duration::from_secs(60),
        || async { (env.invoice_status(created[0]).await == "paid").then_some(()) },
    )
    .await;

    let (status, body) = act(
        format!("/admin/subscriptions/{sub}/cancel"),
        vec![("when", "period_end")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = act(
        format!("/admin/subscriptions/{sub}/cancel"),
        vec![("when", "period_end")],
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "already off: {body}"
    );
    let (status, body) = act(
        format!("/admin/subscriptions/{sub}/cancel"),
        vec![("when", "now")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (state, _, _) = env.subscription_of(payer).await;
    assert_eq!(state, "expired");
    let actors: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT actor FROM status_history WHERE entity = 'subscription' AND entity_id = $1 AND actor LIKE 'staff:%'",
    )
    .bind(sub)
    .fetch_all(&env.db)
    .await
    .unwrap();
    assert_eq!(actors, vec!["staff:sveta".to_owned()]);
    let actions: Vec<String> =
        sqlx::query_scalar("SELECT action FROM audit_log WHERE target = $1 ORDER BY id")
            .bind(payer.to_string())
            .fetch_all(&env.db)
            .await
            .unwrap();
    assert_eq!(
        actions,
        [
            "subscription.extend",
            "role.resend",
            "invoice.retry_now",
            "subscription.cancel_period_end",
            "subscription.cancel_now"
        ]
    );

    // A dead outbox message goes back to the queue; a finding is resolved once.
    sqlx::query("UPDATE outbox SET status = 'dead', attempts = 9, last_error = 'auth down' WHERE id = (SELECT id FROM outbox LIMIT 1)")
        .execute(&env.db)
        .await
        .unwrap();
    let (_, page) = bo::get(&app, "/admin/attention/dead-outbox", "sveta").await;
    assert!(page.contains("auth down"), "{page}");
    let dead: Uuid = sqlx::query_scalar("SELECT id FROM outbox WHERE status = 'dead'")
        .fetch_one(&env.db)
        .await
        .unwrap();
    let (status, body) = act(format!("/admin/outbox/{dead}/redeliver"), vec![]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let finding: i64 = sqlx::query_scalar(
        "INSERT INTO reconciliation_finding (day, kind, gateway_transaction_id, detail, found_at)
         VALUES ('2026-12-01', 'payment_unknown_to_ledger', 777, 'taken at the gateway only', now()) RETURNING id",
    )
    .fetch_one(&env.db)
    .await
    .unwrap();
    let (_, home) = bo::get(&app, "/admin", "anna").await;
    assert!(
        home.contains("id=\"count-mismatches\" href=\"/admin/attention/mismatches\"><b>1</b>"),
        "{home}"
    );
    let resolve = |user: &'static str| {
        let app = app.clone();
        async move {
            let key = bo::key();
            bo::post(
                &app,
                &format!("/admin/findings/{finding}/resolve"),
                user,
                &[
                    ("reason", "gateway"),
                    ("note", "gateway test op"),
                    ("key", &key),
                ],
            )
            .await
        }
    };
    assert_eq!(resolve("sveta").await.0, StatusCode::FORBIDDEN);
    assert_eq!(resolve("anna").await.0, StatusCode::OK);
    let (status, body) = resolve("oleg").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (_, home) = bo::get(&app, "/admin", "anna").await;
    assert!(
        home.contains("id=\"count-mismatches\" href=\"/admin/attention/mismatches\"><b>0</b>"),
        "{home}"
    );
    env.stop().await;
}

#[tokio::test]
async fn search_finds_payers_by_every_key_and_the_csv_matches_the_list() {
    let env = Env::start().await;
    let app = bo::app(&env, &bo::args(1000));
    let (payer, payment, sub) = subscribed(&env).await;
    let (other, _, _) = subscribed(&env).await;
    let txn: i64 = sqlx::query_scalar("SELECT gateway_transaction_id FROM payment WHERE id = $1")
        .bind(payment)
        .fetch_one(&env.db)
        .await
        .unwrap();
    // One payer found: straight to the page.
    for q in [
        payer.to_string(),
        payment.to_string(),
        sub.to_string(),
        txn.to_string(),
    ] {
        let (status, _, headers) = bo::send(
            &app,
            Request::get(format!("/admin/search?q={q}"))
                .header(header::AUTHORIZATION, bo::basic("sveta"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert!(status.is_redirection(), "{q}: {status}");
        assert_eq!(
            headers[header::LOCATION],
            format!("/admin/payers/{payer}").as_str(),
            "{q}"
        );
    }
    // Both paid with the same card number: last four and expiry find both.
    let today = env
        .clock
        .now()
        .with_timezone(&billing_tasks::backoffice::format::moscow())
        .date_naive();
    for q in [
        "3055".to_owned(),
        "3055 12/30".to_owned(),
        format!("299,00 {today}"),
        "299₽".to_owned(),
    ] {
        let (status, page) =
            bo::get(&app, &format!("/admin/search?q={}", urlencode(&q)), "sveta").await;
        assert_eq!(status, StatusCode::OK, "{q}");
        assert!(
            page.contains(&payer.to_string()) && page.contains(&other.to_string()),
            "{q}: {page}"
        );
        assert!(!page.contains("4000000000003055"), "never the card number");
    }
    let (_, page) = bo::get(&app, "/admin/search?q=9999", "sveta").await;
    assert!(page.contains("Ничего не найдено"), "{page}");
    let (_, page) = bo::get(&app, "/admin/search?q=3055&lang=en", "sveta").await;
    assert!(
        page.contains("Payers") && page.contains("299.00"),
        "English on ?lang=en"
    );

    // The list and its export show the same payments.
    let (_, list) = bo::get(
        &app,
        "/admin/payments?status=succeeded&amount_min=299&amount_max=299,00",
        "anna",
    )
    .await;
    let shown = list.matches("<tr data-id=").count();
    assert_eq!(shown, 2, "{list}");
    let (status, csv) = bo::get(
        &app,
        "/admin/payments.csv?status=succeeded&amount_min=299&amount_max=299,00",
        "anna",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let lines: Vec<&str> = csv.lines().collect();
    assert!(
        lines[0].starts_with("id,created_msk,created_utc,payer_id"),
        "{csv}"
    );
    assert_eq!(lines.len() - 1, shown, "{csv}");
    for line in &lines[1..] {
        let id = line.split(',').next().unwrap();
        assert!(
            list.contains(&format!("data-id=\"{id}\"")),
            "{id} is on the page"
        );
        assert!(line.contains(",29900,299.00,RUB,"), "{line}");
    }
    env.stop().await;
}

/// A form: its path, its fields, what the refusal must say.
type Case = (String, Vec<(&'static str, &'static str)>, &'static str);

fn urlencode(s: &str) -> String {
    serde_urlencoded::to_string([("q", s)]).unwrap()[2..].to_owned()
}

#[tokio::test]
async fn an_admin_manages_staff_and_changes_take_effect_at_once() {
    let env = Env::start().await;
    let app = bo::app(&env, &bo::args(1000));
    let new_password = "a long enough password";
    let admin = |path: &'static str, extra: Vec<(&'static str, &'static str)>| {
        let app = app.clone();
        async move {
            let key = bo::key();
            let mut form = vec![
                ("reason", "request"),
                ("note", "new hire"),
                ("key", key.as_str()),
            ];
            form.extend(extra);
            bo::post(&app, path, "root", &form).await
        }
    };
    let masha = |password: &'static str| {
        format!(
            "Basic {}",
            base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                format!("masha:{password}")
            )
        )
    };
    let get_as = |auth: String| {
        let app = app.clone();
        async move {
            bo::send(
                &app,
                Request::get("/admin")
                    .header(header::AUTHORIZATION, auth)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .0
        }
    };
    // Refused: bad name, unknown role, short password, a configured name; only an admin may.
    let before = snapshot(&env).await;
    for (extra, expected) in [
        (
            vec![
                ("name", "Masha!"),
                ("role", "support"),
                ("password", new_password),
            ],
            "Имя",
        ),
        (
            vec![
                ("name", "masha"),
                ("role", "boss"),
                ("password", new_password),
            ],
            "роль",
        ),
        (
            vec![
                ("name", "masha"),
                ("role", "support"),
                ("password", "short"),
            ],
            "12",
        ),
        (
            vec![
                ("name", "anna"),
                ("role", "support"),
                ("password", new_password),
            ],
            "BACKOFFICE_USERS",
        ),
    ] {
        let (status, body) = admin("/admin/staff", extra).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(body.contains(expected), "{expected}: {body}");
    }
    let (status, _) = bo::post(
        &app,
        "/admin/staff",
        "anna",
        &[
            ("name", "masha"),
            ("role", "admin"),
            ("password", new_password),
            ("reason", "request"),
            ("key", &bo::key()),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(snapshot(&env).await, before);
    assert_eq!(get_as(masha(new_password)).await, StatusCode::UNAUTHORIZED);

    let (status, body) = admin(
        "/admin/staff",
        vec![
            ("name", "masha"),
            ("role", "support"),
            ("password", new_password),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        get_as(masha(new_password)).await,
        StatusCode::OK,
        "signs in at once"
    );
    let cookie = {
        let (status, _, headers) = bo::send(
            &app,
            Request::post("/admin/login")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(
                    serde_urlencoded::to_string([("user", "masha"), ("password", new_password)])
                        .unwrap(),
                ))
                .unwrap(),
        )
        .await;
        assert!(status.is_redirection());
        headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned()
    };
    let with_cookie = |path: &'static str| {
        let (app, cookie) = (app.clone(), cookie.clone());
        async move {
            bo::send(
                &app,
                Request::get(path)
                    .header(header::COOKIE, cookie)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .0
        }
    };
    assert_eq!(with_cookie("/admin").await, StatusCode::OK);
    assert_eq!(
        with_cookie("/admin/reports").await,
        StatusCode::FORBIDDEN,
        "support"
    );
    let (_, page) = bo::get(&app, "/admin/staff", "root").await;
    assert!(
        page.contains("data-name=\"masha\"") && page.contains("anna"),
        "{page}"
    );

    // A new role ends the old session; a new password replaces the old one; disabled is out.
    let (status, body) = admin("/admin/staff/masha/role", vec![("role", "accountant")]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        with_cookie("/admin").await,
        StatusCode::UNAUTHORIZED,
        "the support session ended"
    );
    let (status, _) = admin(
        "/admin/staff/masha/password",
        vec![("password", "another long password")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(get_as(masha(new_password)).await, StatusCode::UNAUTHORIZED);
    assert_eq!(get_as(masha("another long password")).await, StatusCode::OK);
    let (status, _) = admin("/admin/staff/masha/disable", vec![]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        get_as(masha("another long password")).await,
        StatusCode::UNAUTHORIZED
    );
    let (status, _) = admin("/admin/staff/masha/enable", vec![]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(get_as(masha("another long password")).await, StatusCode::OK);
    // Nobody locks themselves out; configured users are not changed here.
    let (status, body) = admin("/admin/staff/root/disable", vec![]).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = admin("/admin/staff/anna/disable", vec![]).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let actions: Vec<String> =
        sqlx::query_scalar("SELECT action FROM audit_log WHERE target = 'staff:masha' ORDER BY id")
            .fetch_all(&env.db)
            .await
            .unwrap();
    assert_eq!(
        actions,
        [
            "staff.add",
            "staff.role",
            "staff.password",
            "staff.disable",
            "staff.enable"
        ]
    );
    let hash: String = sqlx::query_scalar("SELECT hash FROM staff_user WHERE name = 'masha'")
        .fetch_one(&env.db)
        .await
        .unwrap();
    assert!(
        hash.starts_with("$argon2id$") && !hash.contains("another"),
        "only the hash is kept"
    );
    env.stop().await;
}
