//! The axum side: a middleware ([`check`]) that signs each request in (session cookie, else an
//! `Authorization: Basic` header), refuses it below the role it needs and, for a state-changing
//! request made with a cookie, without the session's CSRF token; and the `/login` and `/logout`
//! routes ([`Guard::routes`]).
//!
//! Handlers find the [`Session`] and its [`CsrfToken`] in the request's extensions.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Form, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::Deserialize;

use crate::{Auth, Role, Session};

/// Largest form body read to find its CSRF token.
const MAX_FORM: usize = 1 << 20;

/// Where a failed sign-in waits before answering, to slow guessing.
const FAILED_SIGN_IN_DELAY: Duration = Duration::from_millis(400);

/// The CSRF token of the request's session, for the forms a page renders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrfToken(pub String);

/// The words of the sign-in page.
#[derive(Debug, Clone)]
pub struct LoginText {
    pub lang: &'static str,
    pub title: String,
    pub heading: &'static str,
    pub user: &'static str,
    pub password: &'static str,
    pub submit: &'static str,
    pub failed: &'static str,
    /// Before the identity provider's name on its button ("Sign in with").
    pub with: &'static str,
}

impl LoginText {
    /// English, under `title` (the application's name).
    pub fn english(title: &str) -> Self {
        LoginText {
            lang: "en",
            title: title.to_owned(),
            heading: "Sign in",
            user: "User",
            password: "Password",
            submit: "Sign in",
            failed: "Wrong user name or password.",
            with: "Sign in with",
        }
    }

    /// Russian, under `title`.
    pub fn russian(title: &str) -> Self {
        LoginText {
            lang: "ru",
            title: title.to_owned(),
            heading: "Вход",
            user: "Пользователь",
            password: "Пароль",
            submit: "Войти",
            failed: "Неверное имя пользователя или пароль.",
            with: "Войти через",
        }
    }
}

/// What [`check`] enforces: the users and sessions, the role each request needs, the paths
/// anyone may reach.
pub struct Guard<R: Role> {
    auth: Arc<Auth<R>>,
    rule: fn(&Method, &str) -> R,
    public: Vec<&'static str>,
    text: LoginText,
    oidc: Option<Arc<crate::Oidc<R>>>,
    base: &'static str,
}

impl<R: Role> std::fmt::Debug for Guard<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("auth", &self.auth)
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl<R: Role> Guard<R> {
    /// `rule` says which role a request (method, path) needs; `public` lists paths anyone may
    /// reach (exact, or a prefix when it ends with `/`), besides `/login`.
    pub fn new(
        auth: Auth<R>,
        rule: fn(&Method, &str) -> R,
        public: &[&'static str],
        text: LoginText,
    ) -> Arc<Self> {
        Self::with_oidc(auth, rule, public, text, None)
    }

    /// [`Guard::new`], with sign-in through an OpenID Connect provider as well (or only, when
    /// `auth` has no users).
    pub fn with_oidc(
        auth: Auth<R>,
        rule: fn(&Method, &str) -> R,
        public: &[&'static str],
        text: LoginText,
        oidc: Option<crate::Oidc<R>>,
    ) -> Arc<Self> {
        Self::mounted(auth, rule, public, text, oidc, "")
    }

    /// [`Guard::with_oidc`] for an application whose routes all start with `base` (such as
    /// `/admin`): `rule` and `public` see the paths with `base` taken off, and the sign-in
    /// routes are `base/login`, `base/logout`, `base/login/oidc`.
    pub fn mounted(
        auth: Auth<R>,
        rule: fn(&Method, &str) -> R,
        public: &[&'static str],
        text: LoginText,
        oidc: Option<crate::Oidc<R>>,
        base: &'static str,
    ) -> Arc<Self> {
        Arc::new(Guard {
            base,
            auth: Arc::new(auth),
            rule,
            public: public.to_vec(),
            text,
            oidc: oidc.map(Arc::new),
        })
    }

    /// Where the application is mounted (empty at the root).
    pub fn base(&self) -> &'static str {
        self.base
    }

    /// The application's front page.
    fn home(&self) -> &'static str {
        if self.base.is_empty() { "/" } else { self.base }
    }

    /// The users and sessions.
    pub fn auth(&self) -> &Auth<R> {
        &self.auth
    }

    fn is_public(&self, path: &str) -> bool {
        path == "/login"
            || path == "/login/oidc"
            || path == "/login/oidc/callback"
            || self.public.iter().any(|p| {
                if p.ends_with('/') {
                    path.starts_with(p)
                } else {
                    path == *p
                }
            })
    }

    /// `GET`/`POST /login` and `POST /logout`.
    pub fn routes<S: Clone + Send + Sync + 'static>(self: &Arc<Self>) -> Router<S> {
        let at = |p: &str| format!("{}{p}", self.base);
        Router::new()
            .route(&at("/login"), get(login_page::<R>).post(login::<R>))
            .route(&at("/login/oidc"), get(oidc_start::<R>))
            .route(&at("/login/oidc/callback"), get(oidc_callback::<R>))
            .route(&at("/logout"), post(logout::<R>))
            .with_state(self.clone())
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn text_response(status: StatusCode, message: String) -> Response {
    (status, message).into_response()
}

/// The middleware: see the module docs. Mount it with
/// `axum::middleware::from_fn_with_state(guard, staff_auth::guard::check::<Role>)`.
pub async fn check<R: Role>(
    State(g): State<Arc<Guard<R>>>,
    request: Request,
    next: Next,
) -> Response {
    let full = request.uri().path();
    let path = match full.strip_prefix(g.base) {
        Some("") => "/".to_owned(),
        Some(rest) if rest.starts_with('/') => rest.to_owned(),
        _ => full.to_owned(),
    };
    if g.is_public(&path) {
        return next.run(request).await;
    }
    let headers = request.headers();
    let cookies = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join("; ");
    let (session, by_cookie) = match g.auth.from_cookies(&cookies, now()) {
        Some(s) => (s, true),
        None => match basic(&g, headers).await {
            Some(s) => (s, false),
            None => return unauthenticated(&g, &request),
        },
    };
    let method = request.method().clone();
    let needed = if path == "/logout" {
        R::ALL[0]
    } else {
        (g.rule)(&method, &path)
    };
    if session.role < needed {
        tracing::warn!(user = %session.user, role = session.role.name(), needed = needed.name(), %method, path, "refused: role too low");
        return text_response(
            StatusCode::FORBIDDEN,
            format!(
                "{method} {path} needs the {} role; {} is {}",
                needed.name(),
                session.user,
                session.role.name()
            ),
        );
    }
    let mut request = request;
    if by_cookie && !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS) {
        let (parts, body) = request.into_parts();
        let mut token = parts
            .headers
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let is_form = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
        let body = if token.is_none() && is_form {
            let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM).await else {
                return text_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "the form is too large".into(),
                );
            };
            token = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes)
                .ok()
                .and_then(|pairs| pairs.into_iter().find(|(k, _)| k == "csrf").map(|(_, v)| v));
            Body::from(bytes)
        } else {
            body
        };
        if !token.is_some_and(|t| g.auth.csrf_ok(&session, &t)) {
            tracing::warn!(user = %session.user, %method, path, "refused: CSRF token missing or wrong");
            return text_response(
                StatusCode::FORBIDDEN,
                "the form's CSRF token is missing or wrong: reload the page and try again".into(),
            );
        }
        request = Request::from_parts(parts, body);
    }
    let token = CsrfToken(g.auth.csrf_token(&session));
    request.extensions_mut().insert(session);
    request.extensions_mut().insert(token);
    next.run(request).await
}

/// A session from an `Authorization: Basic` header (Argon2 on the blocking pool).
async fn basic<R: Role>(g: &Arc<Guard<R>>, headers: &HeaderMap) -> Option<Session<R>> {
    let value = headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .to_owned();
    if !value.starts_with("Basic ") {
        return None;
    }
    let auth = g.auth.clone();
    let session = tokio::task::spawn_blocking(move || auth.basic(&value, now()))
        .await
        .ok()
        .flatten();
    if session.is_none() {
        tokio::time::sleep(FAILED_SIGN_IN_DELAY).await;
    }
    session
}

/// No session: a page asked for by a browser goes to the sign-in page, anything else is 401.
fn unauthenticated<R: Role>(g: &Guard<R>, request: &Request) -> Response {
    let html = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if request.method() == Method::GET && html {
        let next = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let query = serde_urlencoded::to_string([("next", next)]).unwrap_or_default();
        return Redirect::to(&format!("{}/login?{query}", g.base)).into_response();
    }
    text_response(
        StatusCode::UNAUTHORIZED,
        "sign in first (a session cookie from /login, or an Authorization: Basic header)".into(),
    )
}

/// Only a path on this site: `/x`, not `//host` or `/\host`, and not a URL.
fn local_path<'a>(next: Option<&'a str>, home: &'a str) -> &'a str {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n,
        _ => home,
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn page<R: Role>(g: &Guard<R>, next: &str, user: &str, failed: bool) -> Html<String> {
    let t = &g.text;
    Html(format!(
        r#"<!doctype html>
<html lang="{lang}"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{heading} · {title}</title>
<style>body{{font:15px/1.4 system-ui,sans-serif;background:#f5f6f8;margin:0}}main{{max-width:22rem;margin:12vh auto;background:#fff;padding:1.5rem 2rem;border-radius:8px;box-shadow:0 1px 4px #0002}}label{{display:block;margin:.8rem 0 .2rem}}input{{width:100%;box-sizing:border-box;padding:.45rem;font:inherit}}button{{margin-top:1.2rem;padding:.5rem 1.2rem;font:inherit}}.error{{color:#b00020}}</style>
</head><body><main>
<h1>{title}</h1><h2>{heading}</h2>
{error}{oidc}{form}</main></body></html>"#,
        lang = t.lang,
        title = escape(&t.title),
        heading = t.heading,
        error = if failed {
            format!("<p class=\"error\" role=\"alert\">{}</p>", t.failed)
        } else {
            String::new()
        },
        oidc = match &g.oidc {
            Some(o) => format!(
                "<p><a class=\"oidc\" id=\"oidc\" href=\"{}/login/oidc?{}\">{} {}</a></p>",
                g.base,
                escape(&serde_urlencoded::to_string([("next", next)]).unwrap_or_default()),
                t.with,
                escape(o.name())
            ),
            None => String::new(),
        },
        form = if g.auth.users() == 0 {
            String::new()
        } else {
            format!(
                r#"<form method="post" action="{base}/login" id="login">
<input type="hidden" name="next" value="{next}">
<label for="user">{user_label}</label><input id="user" name="user" value="{user}" autocomplete="username" required autofocus>
<label for="password">{password_label}</label><input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit">{submit}</button>
</form>"#,
                base = g.base,
                next = escape(next),
                user_label = t.user,
                user = escape(user),
                password_label = t.password,
                submit = t.submit,
            )
        },
    ))
}

/// The pending sign-in's cookie: `SameSite=Lax`, since the provider's redirect back is a
/// cross-site navigation that a `Strict` cookie would not come with.
fn pending_cookie_name<R: Role>(g: &Guard<R>) -> String {
    format!("{}_oidc", g.auth.cookie_name())
}

async fn oidc_start<R: Role>(
    State(g): State<Arc<Guard<R>>>,
    Query(q): Query<NextPath>,
) -> Response {
    let Some(oidc) = &g.oidc else {
        return text_response(
            StatusCode::NOT_FOUND,
            "no identity provider is configured".into(),
        );
    };
    let next = local_path(q.next.as_deref(), g.home());
    match oidc.start(next).await {
        Ok((url, pending)) => {
            let value = g.auth.sign(
                "oidc",
                &B64.encode(serde_json::to_vec(&pending).unwrap_or_default()),
            );
            let cookie = format!(
                "{}={value}; Path={}/login/oidc; HttpOnly; SameSite=Lax; Max-Age=600{}",
                pending_cookie_name(&g),
                g.base,
                if g.auth.secure() { "; Secure" } else { "" }
            );
            let mut response = Redirect::to(&url).into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, v);
            }
            response
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot start an OIDC sign-in");
            text_response(
                StatusCode::BAD_GATEWAY,
                format!("the identity provider cannot be reached: {e}"),
            )
        }
    }
}

#[derive(Deserialize)]
struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

async fn oidc_callback<R: Role>(
    State(g): State<Arc<Guard<R>>>,
    Query(c): Query<Callback>,
    headers: HeaderMap,
) -> Response {
    let Some(oidc) = &g.oidc else {
        return text_response(
            StatusCode::NOT_FOUND,
            "no identity provider is configured".into(),
        );
    };
    if let Some(e) = c.error {
        return text_response(
            StatusCode::UNAUTHORIZED,
            format!(
                "the identity provider said no: {e} {}",
                c.error_description.unwrap_or_default()
            ),
        );
    }
    let name = pending_cookie_name(&g);
    let pending = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (n, v) = c.trim().split_once('=')?;
            (n == name).then(|| v.to_owned())
        })
        .and_then(|v| g.auth.unsign("oidc", &v))
        .and_then(|v| B64.decode(v).ok())
        .and_then(|b| serde_json::from_slice::<crate::oidc::Pending>(&b).ok());
    let (Some(pending), Some(code), Some(state)) = (pending, c.code, c.state) else {
        return text_response(
            StatusCode::BAD_REQUEST,
            "this sign-in was not started here, or took over ten minutes: start again from /login"
                .into(),
        );
    };
    if state != pending.state {
        return text_response(
            StatusCode::BAD_REQUEST,
            "the sign-in's state does not match: start again".into(),
        );
    }
    match oidc.finish(&code, &pending).await {
        Ok((user, role)) => {
            let s = g.auth.new_session(&user, role, true, now());
            tracing::info!(user = %s.user, role = s.role.name(), "signed in through OIDC");
            // A page, not a redirect: the navigation that follows is this site's own, so the
            // `SameSite=Strict` session cookie comes with it.
            let next = escape(local_path(Some(&pending.next), g.home()));
            let mut response = Html(format!(
                "<!doctype html><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"0;url={next}\"><a href=\"{next}\">continue</a>"
            ))
            .into_response();
            for cookie in [
                g.auth.set_cookie(&s),
                format!(
                    "{name}=; Path={}/login/oidc; HttpOnly; SameSite=Lax; Max-Age=0",
                    g.base
                ),
            ] {
                if let Ok(v) = HeaderValue::from_str(&cookie) {
                    response.headers_mut().append(header::SET_COOKIE, v);
                }
            }
            response
        }
        Err(e) => {
            tracing::warn!(error = %e, "OIDC sign-in refused");
            text_response(StatusCode::FORBIDDEN, format!("sign-in refused: {e}"))
        }
    }
}

#[derive(Deserialize)]
struct NextPath {
    next: Option<String>,
}

async fn login_page<R: Role>(
    State(g): State<Arc<Guard<R>>>,
    Query(q): Query<NextPath>,
    headers: HeaderMap,
) -> Response {
    let next = local_path(q.next.as_deref(), g.home());
    let cookies = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if g.auth.from_cookies(cookies, now()).is_some() {
        return Redirect::to(next).into_response();
    }
    page(&g, next, "", false).into_response()
}

#[derive(Deserialize)]
struct Credentials {
    user: String,
    password: String,
    next: Option<String>,
}

async fn login<R: Role>(State(g): State<Arc<Guard<R>>>, Form(c): Form<Credentials>) -> Response {
    let next = local_path(c.next.as_deref(), g.home()).to_owned();
    let auth = g.auth.clone();
    let (user, password) = (c.user.clone(), c.password);
    let session = tokio::task::spawn_blocking(move || auth.sign_in(&user, &password, now()))
        .await
        .ok()
        .flatten();
    match session {
        Some(s) => {
            tracing::info!(user = %s.user, role = s.role.name(), "signed in");
            let mut response = Redirect::to(&next).into_response();
            if let Ok(v) = HeaderValue::from_str(&g.auth.set_cookie(&s)) {
                response.headers_mut().insert(header::SET_COOKIE, v);
            }
            response
        }
        None => {
            tracing::warn!(user = %c.user, "sign-in failed");
            tokio::time::sleep(FAILED_SIGN_IN_DELAY).await;
            (StatusCode::UNAUTHORIZED, page(&g, &next, &c.user, true)).into_response()
        }
    }
}

async fn logout<R: Role>(State(g): State<Arc<Guard<R>>>) -> Response {
    let mut response = Redirect::to(&format!("{}/login", g.base)).into_response();
    if let Ok(v) = HeaderValue::from_str(&g.auth.clear_cookie()) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_followed_after_sign_in() {
        assert_eq!(
            local_path(Some("/tasks?state=FAILURE"), "/"),
            "/tasks?state=FAILURE"
        );
        assert_eq!(local_path(Some("//evil.example"), "/"), "/");
        assert_eq!(local_path(Some("/\\evil.example"), "/"), "/");
        assert_eq!(local_path(Some("https://evil.example"), "/"), "/");
        assert_eq!(local_path(None, "/"), "/");
    }
}
