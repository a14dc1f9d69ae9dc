//! The back-office: the web UI accounting and support work in, served by `billing-api` under
//! `/admin`. Server-rendered pages (askama), no JavaScript framework, in Russian (the default)
//! and English; amounts in roubles with kopecks, times in Moscow time with UTC on hover.
//!
//! - **Access** ([`StaffRole`]): staff sign in through [`staff_auth`] (configured users with
//!   Argon2id hashes, or an OpenID Connect provider), shared with the task monitor. `support`
//!   reads everything and cancels, extends, retries renewals, resends role changes and asks for
//!   refunds; `accountant` also approves refunds, resolves mismatches, reads the reports and
//!   exports CSV; `admin` also manages the staff ([`staff`]: add, change the role, reset the
//!   password, disable; the configured users are shown, not changed). Every route checks the role on the server;
//!   every form carries the session's CSRF token; sessions expire.
//! - **Actions** ([`actions`]) are idempotent (each form carries a one-time key; a second submit
//!   shows the first result), take a reason from a list plus a note, and write an entry to the
//!   audit log (`audit_log`, append-only, [`staff_auth::audit`]) in the same transaction as the
//!   ledger change: either both happen or neither does. A refund above
//!   `BACKOFFICE_APPROVAL_ABOVE` waits for a second person's approval.
//! - **Pages** ([`pages`]): one search over ids, gateway transaction ids, card last four digits
//!   and expiry, amounts and dates; the payer's timeline; lists with filters, keyset pages and
//!   CSV exports; the queues that need a person; the gateway notification log; reports.
//!
//! No page ever shows card data: the mask (first six, last four) and the expiry only.

pub mod actions;
pub mod data;
pub mod format;
pub mod pages;
pub mod staff;
pub mod text;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::Method;
use clap::Args;
use staff_auth::{Auth, Guard, LoginText, Role, SessionKey};

use crate::context::Billing;
use crate::error::{BillingError, Result};
use crate::service::BillingService;

/// Where the back-office is mounted.
pub const BASE: &str = "/admin";

/// The back-office's roles, lowest first (each holds what the ones below it may do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StaffRole {
    Support,
    Accountant,
    Admin,
}

impl Role for StaffRole {
    const ALL: &'static [Self] = &[StaffRole::Support, StaffRole::Accountant, StaffRole::Admin];

    fn name(self) -> &'static str {
        match self {
            StaffRole::Support => "support",
            StaffRole::Accountant => "accountant",
            StaffRole::Admin => "admin",
        }
    }
}

/// The role a request needs (`path` below `/admin`): reading and the everyday actions are
/// support's; approvals, resolutions, reports, the audit log and every CSV export an
/// accountant's; the staff list an admin's.
pub fn required_role(method: &Method, path: &str) -> StaffRole {
    let accountant = path.ends_with(".csv")
        || path.starts_with("/reports")
        || path.starts_with("/audit")
        || (path.starts_with("/approvals/") && *method == Method::POST)
        || path.ends_with("/resolve");
    if path.starts_with("/staff") {
        StaffRole::Admin
    } else if accountant {
        StaffRole::Accountant
    } else {
        StaffRole::Support
    }
}

/// The back-office's settings (`BACKOFFICE_*`).
#[derive(Debug, Clone, Args)]
pub struct BackofficeArgs {
    /// Staff users, `name role hash` per line or `;`-separated (roles: support, accountant,
    /// admin; the hash an Argon2id PHC string, `billing-api --hash-password` prints one). Without
    /// users or an OIDC provider the back-office is off.
    #[arg(
        long = "backoffice-users",
        env = "BACKOFFICE_USERS",
        hide_env_values = true
    )]
    pub users: Option<String>,

    /// A file with the users entries instead.
    #[arg(long = "backoffice-users-file", env = "BACKOFFICE_USERS_FILE")]
    pub users_file: Option<std::path::PathBuf>,

    /// Key sessions and CSRF tokens are signed with (32+ bytes, hex or base64); random when
    /// unset (sessions then end at restart and replicas do not share them).
    #[arg(
        long = "backoffice-session-key",
        env = "BACKOFFICE_SESSION_KEY",
        hide_env_values = true
    )]
    pub session_key: Option<String>,

    /// How long a session lasts.
    #[arg(long = "backoffice-session-ttl", env = "BACKOFFICE_SESSION_TTL", default_value = "8h", value_parser = parse_duration)]
    pub session_ttl: Duration,

    /// Mark the session cookie `Secure` (default: unless the HTTP server binds to loopback).
    #[arg(long = "backoffice-secure-cookies", env = "BACKOFFICE_SECURE_COOKIES")]
    pub secure_cookies: Option<bool>,

    /// Refunds above this many roubles wait for a second person's approval.
    #[arg(long = "backoffice-approval-above", env = "BACKOFFICE_APPROVAL_ABOVE", default_value = "1000", value_parser = format::parse_roubles_arg)]
    pub approval_above: i64,

    /// The task monitor's URL, for links from a payer's task runs.
    #[arg(long = "backoffice-monitor-url", env = "BACKOFFICE_MONITOR_URL")]
    pub monitor_url: Option<String>,

    /// OpenID Connect issuer URL (sign-in through a provider).
    #[arg(long = "backoffice-oidc-issuer", env = "BACKOFFICE_OIDC_ISSUER")]
    pub oidc_issuer: Option<String>,

    /// The back-office's client id at the provider.
    #[arg(long = "backoffice-oidc-client-id", env = "BACKOFFICE_OIDC_CLIENT_ID")]
    pub oidc_client_id: Option<String>,

    /// Its client secret.
    #[arg(
        long = "backoffice-oidc-client-secret",
        env = "BACKOFFICE_OIDC_CLIENT_SECRET",
        hide_env_values = true
    )]
    pub oidc_client_secret: Option<String>,

    /// The redirect URL registered at the provider (`https://…/admin/login/oidc/callback`).
    #[arg(
        long = "backoffice-oidc-redirect-url",
        env = "BACKOFFICE_OIDC_REDIRECT_URL"
    )]
    pub oidc_redirect_url: Option<String>,

    /// The ID token claim that carries the user's groups.
    #[arg(
        long = "backoffice-oidc-role-claim",
        env = "BACKOFFICE_OIDC_ROLE_CLAIM",
        default_value = "groups"
    )]
    pub oidc_role_claim: String,

    /// Claim values to roles, `value=role,…` (`*=support` for everyone the provider signs in).
    #[arg(
        long = "backoffice-oidc-roles",
        env = "BACKOFFICE_OIDC_ROLES",
        default_value = ""
    )]
    pub oidc_roles: String,

    /// The provider's name on the sign-in button.
    #[arg(
        long = "backoffice-oidc-name",
        env = "BACKOFFICE_OIDC_NAME",
        default_value = "SSO"
    )]
    pub oidc_name: String,
}

impl Default for BackofficeArgs {
    fn default() -> Self {
        BackofficeArgs {
            users: None,
            users_file: None,
            session_key: None,
            session_ttl: Duration::from_secs(8 * 3600),
            secure_cookies: None,
            approval_above: 100_000,
            monitor_url: None,
            oidc_issuer: None,
            oidc_client_id: None,
            oidc_client_secret: None,
            oidc_redirect_url: None,
            oidc_role_claim: "groups".into(),
            oidc_roles: String::new(),
            oidc_name: "SSO".into(),
        }
    }
}

/// `8h`, `30m`, `90s`, `1d`, or seconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 8h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("`{s}`: the unit is one of s, m, h, d")),
    };
    if secs == 0 {
        return Err("the duration must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

impl BackofficeArgs {
    /// The guard for these settings; `None` when no users and no provider are configured (the
    /// back-office is then off).
    pub fn guard(&self, loopback: bool) -> Result<Option<Arc<Guard<StaffRole>>>> {
        let bad = |m: String| BillingError::invalid(m);
        let text = match (&self.users, &self.users_file) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "set BACKOFFICE_USERS or BACKOFFICE_USERS_FILE, not both".into(),
                ));
            }
            (Some(t), None) => Some(t.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| bad(format!("BACKOFFICE_USERS_FILE {}: {e}", path.display())))?,
            ),
            (None, None) => None,
        };
        let oidc = self.oidc()?;
        if text.is_none() && oidc.is_none() {
            return Ok(None);
        }
        let users = match &text {
            Some(t) => {
                let users = staff_auth::parse_users::<StaffRole>(t)
                    .map_err(|e| bad(format!("BACKOFFICE_USERS: {e}")))?;
                if users.is_empty() {
                    return Err(bad("BACKOFFICE_USERS lists no user".into()));
                }
                users
            }
            None => Vec::new(),
        };
        let key = match &self.session_key {
            Some(k) => {
                SessionKey::parse(k).map_err(|e| bad(format!("BACKOFFICE_SESSION_KEY: {e}")))?
            }
            None => {
                tracing::warn!(
                    "BACKOFFICE_SESSION_KEY is not set: back-office sessions end when billing-api restarts"
                );
                SessionKey::random()
            }
        };
        let secure = self.secure_cookies.unwrap_or(!loopback);
        let auth = Auth::new(
            users,
            key,
            self.session_ttl,
            "billing_backoffice_session",
            secure,
        );
        Ok(Some(Guard::mounted(
            auth,
            required_role,
            &["/static/"],
            LoginText::russian("Биллинг · бэк-офис"),
            oidc,
            BASE,
        )))
    }

    fn oidc(&self) -> Result<Option<staff_auth::Oidc<StaffRole>>> {
        let Some(issuer) = self.oidc_issuer.clone().filter(|i| !i.trim().is_empty()) else {
            return Ok(None);
        };
        let need = |v: &Option<String>, name: &str| {
            v.clone().filter(|v| !v.trim().is_empty()).ok_or_else(|| {
                BillingError::invalid(format!(
                    "BACKOFFICE_OIDC_ISSUER is set: {name} is needed too"
                ))
            })
        };
        let roles = staff_auth::oidc::parse_role_map::<StaffRole>(&self.oidc_roles)
            .map_err(|e| BillingError::invalid(format!("BACKOFFICE_OIDC_ROLES: {e}")))?;
        Ok(Some(staff_auth::Oidc::new(staff_auth::OidcConfig {
            issuer,
            client_id: need(&self.oidc_client_id, "BACKOFFICE_OIDC_CLIENT_ID")?,
            client_secret: need(&self.oidc_client_secret, "BACKOFFICE_OIDC_CLIENT_SECRET")?,
            redirect_url: need(&self.oidc_redirect_url, "BACKOFFICE_OIDC_REDIRECT_URL")?,
            role_claim: self.oidc_role_claim.clone(),
            roles,
            name: self.oidc_name.clone(),
        })))
    }
}

/// What the back-office's handlers share.
#[derive(Clone)]
#[allow(missing_debug_implementations)]
pub struct Backoffice {
    pub(crate) billing: Billing,
    pub(crate) service: BillingService,
    pub(crate) approval_above: i64,
    pub(crate) monitor_url: Option<String>,
    pub(crate) guard: Arc<Guard<StaffRole>>,
}

impl Backoffice {
    /// The back-office over `billing`, signing staff in with `guard`.
    pub fn new(billing: Billing, args: &BackofficeArgs, guard: Arc<Guard<StaffRole>>) -> Self {
        Backoffice {
            service: BillingService::new(billing.clone()),
            billing,
            approval_above: args.approval_above,
            monitor_url: args
                .monitor_url
                .clone()
                .map(|u| u.trim_end_matches('/').to_owned())
                .filter(|u| !u.is_empty()),
            guard,
        }
    }

    /// The routes, all under `/admin`, behind the sign-in; the staff table is read now and every
    /// [`staff::RELOAD_EVERY`] (call [`Backoffice::load_staff`] first to serve managed staff from
    /// the first request).
    pub fn router(self) -> Router {
        self.spawn_staff_reload();
        pages::router(self)
    }
}
