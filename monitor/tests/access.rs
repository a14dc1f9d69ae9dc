//! Sign-in and roles on the monitor against the real services: with users configured, nothing
//! but the health routes and the sign-in page answers without a session; a viewer reads every
//! page and gets 403 on every action route (cookie or Basic credentials); an operator acts, and
//! the audit log names them whatever X-Forwarded-User says; a cookie's state-changing request
//! without the CSRF token is refused and changes nothing; /metrics takes its bearer token.

mod support;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine;
use monitor::Monitor;
use serde_json::Value;
use tower::ServiceExt;

/// Every state-changing route of the monitor, with the role it needs.
const ACTIONS: &[(&str, &str)] = &[
    ("/api/worker/shutdown/celery@nowhere", "admin"),
    ("/api/worker/pool/grow/celery@nowhere?n=1", "operator"),
    ("/api/worker/pool/shrink/celery@nowhere?n=1", "operator"),
    (
        "/api/worker/queue/add-consumer/celery@nowhere?queue=q",
        "operator",
    ),
    (
        "/api/worker/queue/cancel-consumer/celery@nowhere?queue=q",
        "operator",
    ),
    ("/api/task/async-apply/diag.add", "operator"),
    ("/api/task/send-task/diag.add", "operator"),
    (
        "/api/task/revoke/00000000-0000-0000-0000-000000000001?reason=test",
        "operator",
    ),
    (
        "/api/task/retry/00000000-0000-0000-0000-000000000002?reason=test",
        "operator",
    ),
    (
        "/task/00000000-0000-0000-0000-000000000003/retry",
        "operator",
    ),
    ("/queues/celery/pause", "operator"),
    ("/queues/celery/purge", "admin"),
    ("/api/queues/celery/resume?reason=test", "operator"),
    ("/api/queues/celery/purge?reason=test", "admin"),
    (
        "/api/task/rate-limit/diag.add?workername=w&ratelimit=1/s",
        "operator",
    ),
    ("/api/task/timeout/diag.add?workername=w&soft=1", "operator"),
    ("/jobs", "operator"),
    ("/jobs/1/abort", "operator"),
    ("/api/jobs?action=retry&expected=0&reason=test", "operator"),
    ("/api/jobs/1/abort?reason=test", "operator"),
    ("/beat", "operator"),
    ("/beat/nightly/pause", "operator"),
    ("/beat/nightly/run", "operator"),
    ("/beat/nightly/remove", "admin"),
    ("/api/beat?reason=test", "operator"),
    ("/api/beat/nightly/resume?reason=test", "operator"),
    ("/api/beat/nightly/remove?reason=test", "admin"),
    ("/dead-letters/celery.dlq/replay", "operator"),
    (
        "/api/dead-letters/celery.dlq/replay?oldest=1&reason=test",
        "operator",
    ),
];

const PAGES: &[&str] = &[
    "/",
    "/tasks",
    "/workers",
    "/queues",
    "/audit",
    "/audit.csv",
    "/dead-letters",
    "/api/dead-letters",
    "/beat",
    "/api/beat",
    "/jobs",
    "/jobs/new?action=retry",
    "/api/queues/paused",
    "/api/jobs",
    "/api/jobs/preview?action=retry",
    "/api/workers",
    "/api/tasks",
    "/api/task/types",
    "/api/queues/length",
    "/api/audit",
];

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

async fn send(
    router: &axum::Router,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut request = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = router
        .clone()
        .oneshot(request.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 64 << 20)
        .await
        .unwrap();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// Signs in through the form: the session cookie (`name=value`).
async fn sign_in(router: &axum::Router, user: &str, password: &str) -> String {
    let r = send(
        router,
        "POST",
        "/login",
        &[("content-type", "application/x-www-form-urlencoded")],
        &format!("user={user}&password={password}&next=%2Ftasks"),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::SEE_OTHER,
        "{user} signs in: {}",
        r.body
    );
    assert_eq!(r.headers[header::LOCATION], "/tasks");
    let cookie = r.headers[header::SET_COOKIE].to_str().unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    cookie.split(';').next().unwrap().to_owned()
}

/// The CSRF token the pages put in their forms for this session.
async fn csrf(router: &axum::Router, cookie: &str) -> String {
    let page = send(router, "GET", "/tasks", &[("cookie", cookie)], "").await;
    assert_eq!(page.status, StatusCode::OK);
    let at = page
        .body
        .find("name=\"csrf\" value=\"")
        .expect("the sign-out form carries the token")
        + 19;
    page.body[at..].split('"').next().unwrap().to_owned()
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

async fn audit_count(router: &axum::Router, cookie: &str) -> usize {
    let r = send(router, "GET", "/api/audit", &[("cookie", cookie)], "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    v.as_array()
        .map(Vec::len)
        .unwrap_or_else(|| v["entries"].as_array().map_or(0, Vec::len))
}

#[tokio::test]
async fn roles_csrf_and_the_signed_in_actor_are_enforced() {
    let (mut config, db) = support::config();
    let users = [("vic", "viewer"), ("ola", "operator"), ("ada", "admin")]
        .iter()
        .map(|(u, r)| {
            format!(
                "{u} {r} {}",
                staff_auth::hash_password(&format!("{u}-pw")).unwrap()
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    config.users = Some(users);
    config.session_key = Some("5f".repeat(32));
    config.metrics_token = Some("scrape-me".into());
    let monitor = Monitor::start(&config).await.expect("monitor starts");
    let router = monitor.router();

    // Without a session: the health routes and the sign-in page only.
    for path in ["/livez", "/login"] {
        assert_eq!(
            send(&router, "GET", path, &[], "").await.status,
            StatusCode::OK,
            "{path}"
        );
    }
    let r = send(
        &router,
        "GET",
        "/tasks?state=FAILURE",
        &[("accept", "text/html")],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(
        r.headers[header::LOCATION],
        "/login?next=%2Ftasks%3Fstate%3DFAILURE"
    );
    for path in PAGES {
        assert_eq!(
            send(&router, "GET", path, &[], "").await.status,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
    }
    for (path, _) in ACTIONS {
        assert_eq!(
            send(&router, "POST", path, &[], "").await.status,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
    }
    let r = send(
        &router,
        "POST",
        "/login",
        &[("content-type", "application/x-www-form-urlencoded")],
        "user=vic&password=wrong",
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        r.body.contains("Wrong user name or password")
            && !r.headers.contains_key(header::SET_COOKIE)
    );

    // /metrics: the bearer token, not a session.
    assert_eq!(
        send(&router, "GET", "/metrics", &[], "").await.status,
        StatusCode::UNAUTHORIZED
    );
    let r = send(
        &router,
        "GET",
        "/metrics",
        &[("authorization", "Bearer scrape-me")],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains("tq_"), "metrics exposition");

    // A viewer reads everything and may do nothing.
    let vic = sign_in(&router, "vic", "vic-pw").await;
    let vic_csrf = csrf(&router, &vic).await;
    for path in PAGES {
        let r = send(&router, "GET", path, &[("cookie", &vic)], "").await;
        assert_eq!(r.status, StatusCode::OK, "viewer GET {path}: {}", r.body);
    }
    let vic_basic = basic("vic", "vic-pw");
    for (path, role) in ACTIONS {
        for auth in [
            ("cookie", vic.as_str()),
            ("authorization", vic_basic.as_str()),
        ] {
            let r = send(
                &router,
                "POST",
                path,
                &[
                    auth,
                    ("x-csrf-token", &vic_csrf),
                    ("content-type", "application/x-www-form-urlencoded"),
                ],
                "reason=test&request_id=r1",
            )
            .await;
            assert_eq!(
                r.status,
                StatusCode::FORBIDDEN,
                "viewer POST {path} with {}: {}",
                auth.0,
                r.body
            );
            assert!(
                r.body
                    .contains(&format!("needs the {role} role; vic is viewer")),
                "{}",
                r.body
            );
        }
    }

    // An operator acts; the audit log names the signed-in user, not a header the client sent.
    let ola = sign_in(&router, "ola", "ola-pw").await;
    let ola_csrf = csrf(&router, &ola).await;
    let before = audit_count(&router, &ola).await;
    let path = "/api/task/revoke/00000000-0000-0000-0000-0000000000aa?reason=duplicate%20charge";
    // Without the token (or with the viewer's): refused, nothing recorded.
    for token in [None, Some(vic_csrf.as_str())] {
        let mut headers = vec![("cookie", ola.as_str())];
        if let Some(t) = token {
            headers.push(("x-csrf-token", t));
        }
        let r = send(&router, "POST", path, &headers, "").await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
        assert!(r.body.contains("CSRF"), "{}", r.body);
    }
    assert_eq!(
        audit_count(&router, &ola).await,
        before,
        "a refused request records nothing"
    );
    let r = send(
        &router,
        "POST",
        path,
        &[
            ("cookie", &ola),
            ("x-csrf-token", &ola_csrf),
            ("x-forwarded-user", "mallory"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let log = send(&router, "GET", "/api/audit", &[("cookie", &ola)], "").await;
    let v: Value = serde_json::from_str(&log.body).unwrap();
    let entries = v
        .as_array()
        .cloned()
        .unwrap_or_else(|| v["entries"].as_array().cloned().unwrap_or_default());
    let entry = entries
        .iter()
        .find(|e| e["target"] == "00000000-0000-0000-0000-0000000000aa")
        .unwrap_or_else(|| panic!("the revoke is in the audit log: {v}"));
    assert_eq!(entry["actor"], "ola", "{entry}");
    assert_eq!(entry["reason"], "duplicate charge", "{entry}");
    // Shutting a worker down is an admin's.
    let r = send(
        &router,
        "POST",
        ACTIONS[0].0,
        &[("cookie", &ola), ("x-csrf-token", &ola_csrf)],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        r.body.contains("needs the admin role; ola is operator"),
        "{}",
        r.body
    );
    let ada = basic("ada", "ada-pw");
    let r = send(
        &router,
        "POST",
        ACTIONS[0].0,
        &[("authorization", &ada)],
        "",
    )
    .await;
    assert_ne!(
        r.status,
        StatusCode::FORBIDDEN,
        "an admin passes the guard: {}",
        r.body
    );
    assert_ne!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);

    // The page shows who is signed in, and signing out ends the cookie.
    let page = send(&router, "GET", "/tasks", &[("cookie", &ola)], "").await;
    assert!(
        page.body.contains("ola · operator"),
        "the header names the user"
    );
    let r = send(
        &router,
        "POST",
        "/logout",
        &[
            ("cookie", &ola),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        &format!("csrf={}", urlencode(&ola_csrf)),
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert!(
        r.headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );

    monitor.stop().await.unwrap();
    support::drop_database(&db).await;
}

fn urlencode(s: &str) -> String {
    serde_urlencoded::to_string([("v", s)]).unwrap()[2..].to_owned()
}
