//! The back-office over a test [`Env`]: three members of staff (support, accountant, admin, and
//! a second accountant), requests made with Basic auth or a signed-in cookie session.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine;
use billing_tasks::backoffice::{Backoffice, BackofficeArgs};
use tower::ServiceExt;

use super::Env;

pub const PASSWORD: &str = "correct horse battery staple";

/// `(name, role)` of the test's staff; every one's password is [`PASSWORD`].
pub const STAFF: &[(&str, &str)] = &[
    ("sveta", "support"),
    ("anna", "accountant"),
    ("oleg", "accountant"),
    ("root", "admin"),
];

/// The settings: the staff above, refunds above `approval_above_roubles` need approval.
pub fn args(approval_above_roubles: i64) -> BackofficeArgs {
    let hash = staff_auth::hash_password(PASSWORD).unwrap();
    let users = STAFF
        .iter()
        .map(|(n, r)| format!("{n} {r} {hash}"))
        .collect::<Vec<_>>()
        .join("\n");
    BackofficeArgs {
        users: Some(users),
        session_key: Some("ab".repeat(32)),
        secure_cookies: Some(false),
        approval_above: approval_above_roubles * 100,
        monitor_url: Some("http://127.0.0.1:5555".into()),
        ..BackofficeArgs::default()
    }
}

/// The back-office's router over `env`.
pub fn app(env: &Env, args: &BackofficeArgs) -> Router {
    let guard = args.guard(true).unwrap().expect("users are configured");
    Backoffice::new(env.billing.clone(), args, guard).router()
}

pub fn basic(user: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{PASSWORD}"))
    )
}

/// A response's status and body.
pub async fn send(app: &Router, req: Request<Body>) -> (StatusCode, String, axum::http::HeaderMap) {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = axum::body::to_bytes(res.into_body(), 1 << 26)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned(), headers)
}

/// `GET path` as `user` (Basic auth).
pub async fn get(app: &Router, path: &str, user: &str) -> (StatusCode, String) {
    let (s, b, _) = send(
        app,
        Request::get(path)
            .header(header::AUTHORIZATION, basic(user))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    (s, b)
}

/// `POST path` with a form, as `user` (Basic auth: no CSRF token needed).
pub async fn post(
    app: &Router,
    path: &str,
    user: &str,
    form: &[(&str, &str)],
) -> (StatusCode, String) {
    let (s, b, _) = send(
        app,
        Request::post(path)
            .header(header::AUTHORIZATION, basic(user))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(serde_urlencoded::to_string(form).unwrap()))
            .unwrap(),
    )
    .await;
    (s, b)
}

/// Signs `user` in through the form; the session cookie.
pub async fn sign_in(app: &Router, user: &str) -> String {
    let (status, _, headers) = send(
        app,
        Request::post("/admin/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(
                serde_urlencoded::to_string([
                    ("user", user),
                    ("password", PASSWORD),
                    ("next", "/admin"),
                ])
                .unwrap(),
            ))
            .unwrap(),
    )
    .await;
    assert!(status.is_redirection(), "sign-in of {user}: {status}");
    let cookie = headers
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .expect("a session cookie");
    cookie.split(';').next().unwrap().to_owned()
}

/// The value of the first `name="<field>" value="..."` in a page.
pub fn field(page: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = page.find(&marker)? + marker.len();
    Some(page[start..].split('"').next()?.to_owned())
}

/// A fresh form key.
pub fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}
