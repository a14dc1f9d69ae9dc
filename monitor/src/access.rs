//! Who may do what: staff sign in ([`staff_auth`], shared with billing's back-office) as a
//! `viewer` (every page and read-only API), an `operator` (also every action: retry, revoke,
//! send, pool and limit changes, consumers, dead-letter replay, pausing, resuming, running and
//! adding schedule entries, pausing and resuming queues) or an `admin` (also shutting workers
//! down, removing schedule entries and purging queues).
//!
//! Staff sign in as configured users, or through an OpenID Connect provider
//! (`MONITOR_OIDC_*`: the role from a claim such as `groups`). With either configured, every route but `/login`, `/livez`,
//! `/readyz` and `/metrics` needs a session cookie or an `Authorization: Basic` header, and a
//! state-changing request made with the cookie needs the session's CSRF token. The signed-in
//! user is then the actor the audit log records: any `X-Forwarded-User`/`X-Forwarded-Email` a
//! client sends is replaced. Without users the monitor trusts those headers (an authenticating
//! proxy in front) and binds to loopback unless told otherwise ([`crate::Config::check_bind`]).
//!
//! `MONITOR_METRICS_TOKEN` makes `/metrics` require `Authorization: Bearer <token>`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hmac::Mac;
use staff_auth::guard::CsrfToken;
use staff_auth::{Auth, Guard, LoginText, Role, Session, SessionKey};

use crate::config::Config;
use crate::error::{Error, Result};

/// The monitor's roles, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MonitorRole {
    Viewer,
    Operator,
    Admin,
}

impl Role for MonitorRole {
    const ALL: &'static [Self] = &[
        MonitorRole::Viewer,
        MonitorRole::Operator,
        MonitorRole::Admin,
    ];

    fn name(self) -> &'static str {
        match self {
            MonitorRole::Viewer => "viewer",
            MonitorRole::Operator => "operator",
            MonitorRole::Admin => "admin",
        }
    }
}

/// The role a request needs: reading is a viewer's, acting an operator's, stopping a worker
/// an admin's.
pub fn required_role(method: &Method, path: &str) -> MonitorRole {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        MonitorRole::Viewer
    } else if path.starts_with("/api/worker/shutdown/")
        || ((path.starts_with("/beat/") || path.starts_with("/api/beat/"))
            && path.ends_with("/remove"))
        || ((path.starts_with("/queues/") || path.starts_with("/api/queues/"))
            && path.ends_with("/purge"))
    {
        MonitorRole::Admin
    } else {
        MonitorRole::Operator
    }
}

/// The sign-in settings in force.
#[derive(Debug, Default)]
pub struct Access {
    guard: Option<Arc<Guard<MonitorRole>>>,
    metrics_token: Option<String>,
}

impl Access {
    /// From the configuration: users, the session key and lifetime, the metrics token.
    pub fn from_config(config: &Config) -> Result<Self> {
        let text = match (&config.users, &config.users_file) {
            (Some(_), Some(_)) => {
                return Err(Error::Config(
                    "set MONITOR_USERS or MONITOR_USERS_FILE, not both".into(),
                ));
            }
            (Some(text), None) => Some(text.clone()),
            (None, Some(path)) => Some(std::fs::read_to_string(path).map_err(|e| {
                Error::Config(format!("MONITOR_USERS_FILE {}: {e}", path.display()))
            })?),
            (None, None) => None,
        };
        let metrics_token = config
            .metrics_token
            .clone()
            .filter(|t| !t.trim().is_empty());
        let oidc = oidc(config)?;
        if text.is_none() && oidc.is_none() {
            return Ok(Access {
                guard: None,
                metrics_token,
            });
        }
        let users = match &text {
            Some(text) => {
                let users = staff_auth::parse_users::<MonitorRole>(text)
                    .map_err(|e| Error::Config(format!("MONITOR_USERS: {e}")))?;
                if users.is_empty() {
                    return Err(Error::Config("MONITOR_USERS lists no user".into()));
                }
                users
            }
            None => Vec::new(),
        };
        let key = match &config.session_key {
            Some(k) => SessionKey::parse(k)
                .map_err(|e| Error::Config(format!("MONITOR_SESSION_KEY: {e}")))?,
            None => {
                tracing::warn!(
                    "MONITOR_SESSION_KEY is not set: sessions are signed with a random key, so \
                     they end when the monitor restarts and replicas do not share them"
                );
                SessionKey::random()
            }
        };
        let secure = config
            .secure_cookies
            .unwrap_or(!config.bind.ip().is_loopback());
        let auth = Auth::new(users, key, config.session_ttl, "tq_monitor_session", secure);
        Ok(Access {
            guard: Some(Guard::with_oidc(
                auth,
                required_role,
                &["/livez", "/readyz", "/metrics"],
                LoginText::english("task monitor"),
                oidc,
            )),
            metrics_token,
        })
    }

    /// Whether users are configured.
    pub fn signs_in(&self) -> bool {
        self.guard.is_some()
    }

    /// The guard, when users are configured.
    pub fn guard(&self) -> Option<&Arc<Guard<MonitorRole>>> {
        self.guard.as_ref()
    }
}

/// The OpenID Connect provider the configuration names, if any.
fn oidc(config: &Config) -> Result<Option<staff_auth::Oidc<MonitorRole>>> {
    let Some(issuer) = config.oidc_issuer.clone().filter(|i| !i.trim().is_empty()) else {
        return Ok(None);
    };
    let need = |v: &Option<String>, name: &str| {
        v.clone().filter(|v| !v.trim().is_empty()).ok_or_else(|| {
            Error::Config(format!("MONITOR_OIDC_ISSUER is set: {name} is needed too"))
        })
    };
    let roles = staff_auth::oidc::parse_role_map::<MonitorRole>(&config.oidc_roles)
        .map_err(|e| Error::Config(format!("MONITOR_OIDC_ROLES: {e}")))?;
    Ok(Some(staff_auth::Oidc::new(staff_auth::OidcConfig {
        issuer,
        client_id: need(&config.oidc_client_id, "MONITOR_OIDC_CLIENT_ID")?,
        client_secret: need(&config.oidc_client_secret, "MONITOR_OIDC_CLIENT_SECRET")?,
        redirect_url: need(&config.oidc_redirect_url, "MONITOR_OIDC_REDIRECT_URL")?,
        role_claim: config.oidc_role_claim.clone(),
        roles,
        name: config.oidc_name.clone(),
    })))
}

/// The outer middleware: `/metrics`'s bearer token, then the guard when users are configured.
pub(crate) async fn authenticate(
    State(access): State<Arc<Access>>,
    request: Request,
    next: Next,
) -> Response {
    if request.uri().path() == "/metrics"
        && let Some(token) = &access.metrics_token
    {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same_secret(given.trim(), token) {
            return (
                StatusCode::UNAUTHORIZED,
                "/metrics needs Authorization: Bearer <MONITOR_METRICS_TOKEN>",
            )
                .into_response();
        }
    }
    match &access.guard {
        Some(guard) => staff_auth::guard::check(State(guard.clone()), request, next).await,
        None => next.run(request).await,
    }
}

/// Compares two secrets in time independent of where they differ.
fn same_secret(given: &str, expected: &str) -> bool {
    let mac = |s: &str| {
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"metrics token")
            .expect("HMAC takes any key length");
        m.update(s.as_bytes());
        m.finalize().into_bytes()
    };
    mac(given) == mac(expected)
}

tokio::task_local! {
    static ME: Me;
}

/// The signed-in user of the request being answered, for the pages' header and forms.
#[derive(Debug, Clone, Default)]
pub struct Me {
    pub user: Option<String>,
    pub role: &'static str,
    pub csrf: String,
}

/// The signed-in user of the request a page is rendered for (none without sign-in).
pub fn me() -> Me {
    ME.try_with(Clone::clone).unwrap_or_default()
}

/// The inner middleware: makes the signed-in user the request's actor and the pages' `me()`.
pub(crate) async fn identify(
    State(access): State<Arc<Access>>,
    mut request: Request,
    next: Next,
) -> Response {
    let session = request.extensions().get::<Session<MonitorRole>>().cloned();
    let csrf = request
        .extensions()
        .get::<CsrfToken>()
        .map(|t| t.0.clone())
        .unwrap_or_default();
    if access.signs_in() {
        let headers = request.headers_mut();
        headers.remove("x-forwarded-user");
        headers.remove("x-forwarded-email");
        if let Some(s) = &session
            && let Ok(v) = HeaderValue::from_str(&s.user)
        {
            headers.insert("x-forwarded-user", v);
        }
    }
    let me = Me {
        role: session.as_ref().map_or("", |s| s.role.name()),
        user: session.map(|s| s.user),
        csrf,
    };
    ME.scope(me, next.run(request)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oidc_needs_its_client_settings_and_a_valid_role_map() {
        let mut c = Config::from_env().unwrap();
        c.oidc_issuer = Some("https://idp.example.com/realms/staff".into());
        let e = Access::from_config(&c).unwrap_err().to_string();
        assert!(e.contains("MONITOR_OIDC_CLIENT_ID"), "{e}");
        c.oidc_client_id = Some("monitor".into());
        c.oidc_client_secret = Some("secret".into());
        c.oidc_redirect_url = Some("https://monitor.example.com/login/oidc/callback".into());
        c.oidc_roles = "sre=chief".into();
        let e = Access::from_config(&c).unwrap_err().to_string();
        assert!(
            e.contains("MONITOR_OIDC_ROLES") && e.contains("unknown role"),
            "{e}"
        );
        c.oidc_roles = "sre=operator,*=viewer".into();
        let access = Access::from_config(&c).unwrap();
        assert!(access.signs_in(), "OIDC alone is a sign-in");
        assert!(c.check_bind().is_ok() || c.bind.ip().is_loopback());
    }

    #[test]
    fn roles_by_route() {
        assert_eq!(
            required_role(&Method::GET, "/api/tasks"),
            MonitorRole::Viewer
        );
        assert_eq!(
            required_role(&Method::POST, "/api/task/revoke/x"),
            MonitorRole::Operator
        );
        assert_eq!(
            required_role(&Method::POST, "/api/worker/shutdown/w"),
            MonitorRole::Admin
        );
        assert_eq!(
            required_role(&Method::POST, "/beat/x/remove"),
            MonitorRole::Admin
        );
        assert_eq!(
            required_role(&Method::POST, "/queues/q/purge"),
            MonitorRole::Admin
        );
        assert_eq!(
            required_role(&Method::POST, "/queues/q/pause"),
            MonitorRole::Operator
        );
    }
}
