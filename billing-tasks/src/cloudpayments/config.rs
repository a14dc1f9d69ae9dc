//! Client configuration: where the gateway is, the terminal's credentials, timeouts.
//!
//! Read from `CLOUDPAYMENTS_URL` (default `https://api.cloudpayments.ru`),
//! `CLOUDPAYMENTS_PUBLIC_ID` and `CLOUDPAYMENTS_API_SECRET` (ARCHITECTURE.md §3.4). The secret
//! has no default and never appears in an error: a bad setting is reported by variable name.

use std::time::Duration;

use reqwest::Url;

use crate::secret::Secret;

/// The real gateway.
pub const DEFAULT_URL: &str = "https://api.cloudpayments.ru";
/// Environment variable with the base URL.
pub const ENV_URL: &str = "CLOUDPAYMENTS_URL";
/// Environment variable with the Public ID.
pub const ENV_PUBLIC_ID: &str = "CLOUDPAYMENTS_PUBLIC_ID";
/// Environment variable with the API secret.
pub const ENV_API_SECRET: &str = "CLOUDPAYMENTS_API_SECRET";

/// Default whole-request timeout. The gateway may take minutes in the worst case (§8), but a
/// worker should not hold a charge that long: a timed-out call is an unknown outcome, settled by
/// retrying with the same `X-Request-ID` or by `payments/find`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time to establish a connection (TCP + TLS).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A missing or malformed setting, named by its variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required variable is not set (or is empty).
    #[error("{0} is not set")]
    Missing(&'static str),
    /// A variable is set but unusable; the value itself is not repeated (it may be a secret).
    #[error("{var} is malformed: {reason}")]
    Malformed {
        /// The variable (or field) name.
        var: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client could not be built (TLS set-up).
    #[error("cannot build the CloudPayments HTTP client: {0}")]
    HttpClient(String),
}

/// How to reach one terminal of the gateway.
#[derive(Debug, Clone)]
pub struct Config {
    /// Base URL; paths such as `/payments/cards/charge` are appended to it.
    pub base_url: Url,
    /// The terminal's Public ID (Basic-auth user name).
    pub public_id: String,
    /// The terminal's API secret (Basic-auth password and webhook HMAC key).
    pub api_secret: Secret<String>,
    /// Whole-request timeout (connect, send, wait, read).
    pub timeout: Duration,
    /// Connection set-up timeout.
    pub connect_timeout: Duration,
}

impl Config {
    /// A configuration with default timeouts, validating every field.
    pub fn new(
        base_url: &str,
        public_id: impl Into<String>,
        api_secret: Secret<String>,
    ) -> Result<Self, ConfigError> {
        let base_url = parse_base_url(base_url, ENV_URL)?;
        let public_id = public_id.into();
        check_public_id(&public_id, ENV_PUBLIC_ID)?;
        check_secret(&api_secret, ENV_API_SECRET)?;
        Ok(Config {
            base_url,
            public_id,
            api_secret,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        })
    }

    /// Reads the three `CLOUDPAYMENTS_*` variables from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the three variables through `lookup` (the environment, a file, a test map).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &'static str| lookup(name).filter(|v| !v.trim().is_empty());
        let url = get(ENV_URL).unwrap_or_else(|| DEFAULT_URL.to_owned());
        let public_id = get(ENV_PUBLIC_ID).ok_or(ConfigError::Missing(ENV_PUBLIC_ID))?;
        let secret = get(ENV_API_SECRET).ok_or(ConfigError::Missing(ENV_API_SECRET))?;
        Config::new(url.trim(), public_id.trim(), Secret::new(secret))
    }

    /// The same configuration with other timeouts.
    pub fn with_timeouts(mut self, connect: Duration, whole_request: Duration) -> Self {
        self.connect_timeout = connect;
        self.timeout = whole_request;
        self
    }
}

pub(crate) fn parse_base_url(s: &str, var: &'static str) -> Result<Url, ConfigError> {
    let bad = |reason: &str| ConfigError::Malformed {
        var,
        reason: reason.to_owned(),
    };
    let url = Url::parse(s).map_err(|e| bad(&format!("not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("the URL has no host"));
    }
    // Credentials in the URL would leak into every error message that names the URL.
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(
            "the URL must not carry credentials (use the Public ID and API secret)",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("the URL must not have a query or fragment"));
    }
    Ok(url)
}

pub(crate) fn check_public_id(id: &str, var: &'static str) -> Result<(), ConfigError> {
    if id.is_empty() {
        return Err(ConfigError::Missing(var));
    }
    // Basic auth cannot carry a `:` in the user name.
    if id.contains(':') || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::Malformed {
            var,
            reason: "a Public ID has no spaces, control characters or `:`".into(),
        });
    }
    Ok(())
}

pub(crate) fn check_secret(secret: &Secret<String>, var: &'static str) -> Result<(), ConfigError> {
    let s = secret.expose();
    if s.is_empty() {
        return Err(ConfigError::Missing(var));
    }
    if s.chars().any(|c| c.is_control()) {
        return Err(ConfigError::Malformed {
            var,
            reason: "contains control characters".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_and_errors_name_the_variable() {
        let c = Config::from_lookup(lookup(&[
            (ENV_PUBLIC_ID, "pk_1"),
            (ENV_API_SECRET, "s3cr3t-value"),
        ]))
        .unwrap();
        assert_eq!(c.base_url.as_str(), "https://api.cloudpayments.ru/");
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        assert!(!format!("{c:?}").contains("s3cr3t-value"));

        let e = Config::from_lookup(lookup(&[(ENV_API_SECRET, "x")])).unwrap_err();
        assert_eq!(e.to_string(), "CLOUDPAYMENTS_PUBLIC_ID is not set");
        let e = Config::from_lookup(lookup(&[(ENV_PUBLIC_ID, "pk"), (ENV_API_SECRET, " ")]))
            .unwrap_err();
        assert_eq!(e.to_string(), "CLOUDPAYMENTS_API_SECRET is not set");
        let e = Config::from_lookup(lookup(&[
            (ENV_URL, "ftp://x"),
            (ENV_PUBLIC_ID, "pk"),
            (ENV_API_SECRET, "s"),
        ]))
        .unwrap_err();
        assert!(
            e.to_string().starts_with("CLOUDPAYMENTS_URL is malformed"),
            "{e}"
        );
        let e = Config::from_lookup(lookup(&[
            (ENV_URL, "https://pk:s3cr3t@api.example"),
            (ENV_PUBLIC_ID, "pk"),
            (ENV_API_SECRET, "s3cr3t"),
        ]))
        .unwrap_err();
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
        let e = Config::from_lookup(lookup(&[(ENV_PUBLIC_ID, "a:b"), (ENV_API_SECRET, "s")]))
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("CLOUDPAYMENTS_PUBLIC_ID is malformed"),
            "{e}"
        );
    }
}
