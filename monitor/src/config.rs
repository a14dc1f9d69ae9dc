//! The monitor's settings (ARCHITECTURE.md §3.4): every one an environment variable and a flag.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

/// The default queue the monitor reads events from.
pub const DEFAULT_EVENTS_QUEUE: &str = "tq.monitor.events";

/// Everything [`crate::run`] needs.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address the UI, the API and /metrics are served on. Without users (MONITOR_USERS) only a
    /// loopback address is accepted, unless MONITOR_ALLOW_UNAUTHENTICATED says otherwise.
    #[arg(long, env = "MONITOR_BIND", default_value = "127.0.0.1:5555")]
    pub bind: SocketAddr,

    /// Serve a non-loopback MONITOR_BIND without authentication, e.g. behind an authenticating
    /// proxy. Anyone who reaches the port can revoke tasks and stop workers.
    #[arg(long, env = "MONITOR_ALLOW_UNAUTHENTICATED", default_value_t = false)]
    pub allow_unauthenticated: bool,

    /// Staff who may sign in: `name role hash` entries, one per line or `;`-separated; roles
    /// `viewer`, `operator`, `admin`; the hash an Argon2 PHC string (`monitor --hash-password`
    /// prints one). With users, every page and API route needs a sign-in.
    #[arg(long, env = "MONITOR_USERS", hide_env_values = true)]
    pub users: Option<String>,

    /// A file of MONITOR_USERS entries (e.g. a mounted Kubernetes secret), instead of the
    /// variable.
    #[arg(long, env = "MONITOR_USERS_FILE")]
    pub users_file: Option<std::path::PathBuf>,

    /// Sign-in through an OpenID Connect provider: its issuer URL, exactly as its tokens carry
    /// it (e.g. `https://keycloak.example.com/realms/staff`). With it, MONITOR_OIDC_CLIENT_ID,
    /// MONITOR_OIDC_CLIENT_SECRET and MONITOR_OIDC_REDIRECT_URL are needed; MONITOR_USERS may be
    /// set as well, or not.
    #[arg(long, env = "MONITOR_OIDC_ISSUER")]
    pub oidc_issuer: Option<String>,

    /// The monitor's client id at the provider.
    #[arg(long, env = "MONITOR_OIDC_CLIENT_ID")]
    pub oidc_client_id: Option<String>,

    /// The monitor's client secret at the provider.
    #[arg(long, env = "MONITOR_OIDC_CLIENT_SECRET", hide_env_values = true)]
    pub oidc_client_secret: Option<String>,

    /// The callback registered with the provider: `https://<monitor>/login/oidc/callback`.
    #[arg(long, env = "MONITOR_OIDC_REDIRECT_URL")]
    pub oidc_redirect_url: Option<String>,

    /// The ID token claim that carries the user's groups or roles.
    #[arg(long, env = "MONITOR_OIDC_ROLE_CLAIM", default_value = "groups")]
    pub oidc_role_claim: String,

    /// Which claim values give which role: `monitor-admins=admin,sre=operator,*=viewer` (`*`:
    /// everyone the provider signs in); a user given none is refused.
    #[arg(long, env = "MONITOR_OIDC_ROLES", default_value = "*=viewer")]
    pub oidc_roles: String,

    /// The provider's name on the sign-in button.
    #[arg(long, env = "MONITOR_OIDC_NAME", default_value = "single sign-on")]
    pub oidc_name: String,

    /// Key signing sessions and CSRF tokens, at least 32 bytes as hex or base64 (`openssl rand
    /// -hex 32`); replicas behind one address need the same. Unset: a random key per process.
    #[arg(long, env = "MONITOR_SESSION_KEY", hide_env_values = true)]
    pub session_key: Option<String>,

    /// How long a sign-in lasts, e.g. `8h`.
    #[arg(long, env = "MONITOR_SESSION_TTL", default_value = "8h", value_parser = parse_duration)]
    pub session_ttl: Duration,

    /// Mark the session cookie `Secure` (sent over HTTPS only). Default: yes unless
    /// MONITOR_BIND is a loopback address.
    #[arg(long, env = "MONITOR_SECURE_COOKIES")]
    pub secure_cookies: Option<bool>,

    /// How long task rows are kept, by state: `SUCCESS=7d,FAILURE=90d,*=30d` (`*`: every other
    /// state), or `off`.
    #[arg(long, env = "MONITOR_RETENTION", default_value = "*=30d", value_parser = crate::retention::parse)]
    pub retention: crate::retention::Retention,

    /// How often old task rows are looked for.
    #[arg(long, env = "MONITOR_RETENTION_EVERY", default_value = "10m", value_parser = parse_duration)]
    pub retention_every: Duration,

    /// How often unfinished tasks are checked against the result backend, and the backend's
    /// results walked for tasks no event told of (see `monitor::reconcile`).
    #[arg(long, env = "MONITOR_RECONCILE_EVERY", default_value = "1m", value_parser = parse_duration)]
    pub reconcile_every: Duration,

    /// Also serve Flower's metric names on /metrics (`flower_events_total`,
    /// `flower_task_runtime_seconds`, `flower_worker_online`, …), so a Grafana dashboard or
    /// alert rules written for Flower keep working.
    #[arg(long, env = "MONITOR_FLOWER_METRICS", default_value_t = false)]
    pub flower_metrics: bool,

    /// When set, /metrics answers only requests with `Authorization: Bearer <token>`.
    #[arg(long, env = "MONITOR_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,

    /// The store (PostgreSQL); the database is created if missing, the tables live in schema
    /// `monitor`.
    #[arg(
        long,
        env = "MONITOR_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/monitor"
    )]
    pub database_url: String,

    /// RabbitMQ.
    #[arg(
        long,
        env = "BROKER_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub broker_url: String,

    /// RabbitMQ's management HTTP API, as Flower's `--broker-api`
    /// (`http://guest:guest@127.0.0.1:15672/api/`): with it the monitor lists every queue, with
    /// unacknowledged counts and the oldest message's age; without it only the queues workers
    /// consume, from AMQP.
    #[arg(long, env = "MONITOR_BROKER_API", hide_env_values = true)]
    pub broker_api: Option<String>,

    /// Redis result backend (read for /api/task/result and task details).
    #[arg(
        long,
        env = "RESULT_BACKEND",
        default_value = "redis://127.0.0.1:6379/0"
    )]
    pub result_backend: String,

    /// The key prefix of the scheduler's store (in RESULT_BACKEND's Redis), as the `scheduler`
    /// replicas are given it: the beat page reads and changes their entries there.
    #[arg(long, env = "SCHEDULER_KEY_PREFIX", default_value = scheduler::DEFAULT_KEY_PREFIX)]
    pub scheduler_prefix: String,

    /// The durable queue bound to `celeryev` that keeps events while the monitor is down.
    #[arg(long, env = "MONITOR_EVENTS_QUEUE", default_value = DEFAULT_EVENTS_QUEUE)]
    pub events_queue: String,

    /// Most events the queue keeps while nobody reads it (`x-max-length`; the oldest are dropped).
    #[arg(long, env = "MONITOR_EVENTS_MAX_LENGTH", default_value_t = 1_000_000)]
    pub events_max_length: u32,

    /// How long an unread event is kept (`x-message-ttl`), e.g. `1d`, `6h`, `90s`.
    #[arg(long, env = "MONITOR_EVENTS_TTL", default_value = "1d", value_parser = parse_duration)]
    pub events_ttl: Duration,

    /// Delete the events queue after it has had no consumer this long (`x-expires`); unset keeps
    /// it forever. For test and review deployments.
    #[arg(long, env = "MONITOR_EVENTS_QUEUE_EXPIRES", value_parser = parse_duration)]
    pub events_queue_expires: Option<Duration>,

    /// Events written per transaction, at most (a `task.multi` message may take a batch over it;
    /// the batch then ends with that message). Batches are smaller when traffic is (they end at
    /// `MONITOR_BATCH_WAIT`); large ones are what keeps up with a worker at full speed
    /// (`scripts/bench-monitor-intake`: 500 fell 17 s behind, 5000 stayed within about a second).
    #[arg(long, env = "MONITOR_BATCH_SIZE", default_value_t = 5000)]
    pub batch_size: u16,

    /// Longest wait to fill a batch, e.g. `200ms`.
    #[arg(long, env = "MONITOR_BATCH_WAIT", default_value = "200ms", value_parser = parse_duration)]
    pub batch_wait: Duration,

    /// How long /api/workers answers from its cache before it asks the workers again.
    #[arg(long, env = "MONITOR_INSPECT_CACHE", default_value = "5s", value_parser = parse_duration)]
    pub inspect_cache: Duration,

    /// How long one remote-control broadcast waits for replies.
    #[arg(long, env = "MONITOR_INSPECT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub inspect_timeout: Duration,
}

impl Config {
    /// The settings from the environment alone (no flags), the defaults where a variable is
    /// unset: what the binary starts with when given no arguments.
    pub fn from_env() -> Result<Self, clap::Error> {
        use clap::{FromArgMatches, Parser};
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            config: Config,
        }
        let matches = <Wrapper as clap::CommandFactory>::command()
            .no_binary_name(true)
            .try_get_matches_from(Vec::<String>::new())?;
        Ok(Wrapper::from_arg_matches(&matches)?.config)
    }

    /// Refuses a non-loopback bind without authentication, naming the setting to change.
    pub fn check_bind(&self) -> crate::Result<()> {
        if self.bind.ip().is_loopback()
            || self.allow_unauthenticated
            || self.users.is_some()
            || self.users_file.is_some()
            || self.oidc_issuer.is_some()
        {
            return Ok(());
        }
        Err(crate::Error::Config(format!(
            "MONITOR_BIND {} is not a loopback address and no authentication is configured: \
             anyone reaching it could revoke tasks and stop workers. Set MONITOR_USERS (or \
             MONITOR_USERS_FILE), bind 127.0.0.1, or set MONITOR_ALLOW_UNAUTHENTICATED=true \
             when an authenticating proxy is in front",
            self.bind
        )))
    }
}

/// `250ms`, `90s`, `15m`, `6h`, `1d`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (use e.g. 200ms, 90s, 15m, 6h, 1d)"))?;
    let secs = |k: u64| Duration::from_secs(n.saturating_mul(k));
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(secs(1)),
        "m" => Ok(secs(60)),
        "h" => Ok(secs(3600)),
        "d" => Ok(secs(86_400)),
        _ => Err(format!(
            "`{s}` has an unknown unit `{unit}` (use ms, s, m, h or d)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("200ms").unwrap(), Duration::from_millis(200));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86_400));
        assert!(parse_duration("5 weeks").is_err());
    }

    #[test]
    fn a_public_bind_needs_auth_or_an_explicit_opt_out() {
        let mut c = Config::from_env().unwrap();
        c.bind = "127.0.0.1:5555".parse().unwrap();
        assert!(c.check_bind().is_ok());
        c.bind = "0.0.0.0:5555".parse().unwrap();
        let e = c.check_bind().unwrap_err().to_string();
        assert!(e.contains("MONITOR_BIND 0.0.0.0:5555"), "{e}");
        c.allow_unauthenticated = true;
        assert!(c.check_bind().is_ok());
    }
}
