//! Redis clients from Celery-style URLs, with TLS.
//!
//! `redis://host:port/db` is plain. `rediss://host:port/db` is TLS (rustls), verified against the
//! system's trust store unless the URL names a CA, with the query parameters Celery and kombu
//! take, so a Python service and a Rust one can share the same `RESULT_BACKEND` string:
//!
//! - `ssl_ca_certs=/path/ca.pem`: the CA (PEM) that signed the server's certificate; it replaces
//!   the system's store;
//! - `ssl_certfile=/path/cert.pem` and `ssl_keyfile=/path/key.pem`: a client certificate and its
//!   key (PEM), for servers started with `tls-auth-clients yes`;
//! - `ssl_cert_reqs=required` (the default; also `CERT_REQUIRED`). Celery's `none`/`optional`
//!   (no verification) are refused: an unverified server can read every result and lease, so
//!   name its CA with `ssl_ca_certs` instead.
//!
//! The name checked is the URL's host. Files are read when the client is made, so a wrong path
//! stops the program at start with the URL (password hidden) and the parameter.
//!
//! `sentinel://host:26379/db;sentinel://host2:26379/db;…` is Celery's Sentinel form: the
//! sentinels to ask, separated by `;`, with the database, user and password of the primary taken
//! from the first one (as Celery does). The primary's name is Celery's transport option
//! `master_name`; here it is the query parameter `?master_name=NAME` on any of the addresses or,
//! when no address names one, the environment variable [`SENTINEL_MASTER_ENV`], so the URL itself
//! can stay the string Python services use. The sentinels are reached in plain text and without
//! a password; `ssl_*` parameters are refused there. [`crate::redis_conn::RedisConn`] follows the
//! primary through failovers.

use redis::{ClientTlsConfig, ConnectionAddr, RedisConnectionInfo, TlsCertificates};

/// The environment variable naming the Sentinel primary when a `sentinel://` URL does not.
pub const SENTINEL_MASTER_ENV: &str = "REDIS_SENTINEL_MASTER";

/// Whether `url` is one of the Redis forms this module takes (`redis://`, `rediss://`,
/// `sentinel://`).
pub fn is_redis_url(url: &str) -> bool {
    url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("sentinel://")
}

/// Where a Redis URL leads.
#[derive(Clone, Debug)]
pub enum Target {
    /// One server (`redis://`, `rediss://`).
    Direct(redis::Client),
    /// The primary that Sentinel names (`sentinel://`).
    Sentinel(SentinelTarget),
}

/// The parts of a `sentinel://` URL.
#[derive(Clone)]
pub struct SentinelTarget {
    /// The sentinels, in the URL's order.
    pub sentinels: Vec<(String, u16)>,
    /// The monitored primary's name.
    pub master_name: String,
    /// Database, user and password for the primary and its replicas.
    pub redis: RedisConnectionInfo,
}

impl std::fmt::Debug for SentinelTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelTarget")
            .field("sentinels", &self.sentinels)
            .field("master_name", &self.master_name)
            .field("db", &self.redis.db())
            .finish_non_exhaustive()
    }
}

impl SentinelTarget {
    /// The sentinels as connection addresses.
    pub fn addrs(&self) -> Vec<ConnectionAddr> {
        self.sentinels
            .iter()
            .map(|(h, p)| ConnectionAddr::Tcp(h.clone(), *p))
            .collect()
    }
}

/// Reads any Redis URL this module takes (see the module documentation).
pub fn target(url: &str) -> Result<Target, String> {
    if url.starts_with("sentinel://") {
        sentinel(url, std::env::var(SENTINEL_MASTER_ENV).ok()).map(Target::Sentinel)
    } else {
        client(url).map(Target::Direct)
    }
}

fn sentinel(url: &str, env_master: Option<String>) -> Result<SentinelTarget, String> {
    let mut sentinels = Vec::new();
    let mut master_name = None;
    let mut redis = RedisConnectionInfo::default();
    for (i, chunk) in url.split(';').map(str::trim).enumerate() {
        if chunk.is_empty() {
            continue;
        }
        let shown = crate::redact_url(chunk);
        let parsed = url::Url::parse(chunk).map_err(|e| format!("`{shown}`: {e}"))?;
        if parsed.scheme() != "sentinel" {
            return Err(format!(
                "`{shown}`: every address of a Sentinel URL starts with sentinel://"
            ));
        }
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("`{shown}` names no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        sentinels.push((host, parsed.port().unwrap_or(26379)));
        for (k, v) in parsed.query_pairs() {
            match k.as_ref() {
                "master_name" if !v.is_empty() => master_name = Some(v.into_owned()),
                k if k.starts_with("ssl") => {
                    return Err(format!(
                        "`{shown}`: {k}: TLS through Sentinel is not supported (use rediss:// to \
                         one server)"
                    ));
                }
                other => return Err(format!("`{shown}`: unknown parameter {other}")),
            }
        }
        if i == 0 {
            let db = match parsed.path().trim_matches('/') {
                "" => 0,
                n => n
                    .parse::<i64>()
                    .map_err(|_| format!("`{shown}`: the database `{n}` is not a number"))?,
            };
            redis = redis.set_db(db);
            if !parsed.username().is_empty() {
                redis = redis.set_username(decode(parsed.username()));
            }
            if let Some(p) = parsed.password() {
                redis = redis.set_password(decode(p));
            }
        }
    }
    if sentinels.is_empty() {
        return Err("a sentinel:// URL names no sentinel".into());
    }
    let master_name = master_name
        .or(env_master.filter(|m| !m.is_empty()))
        .ok_or_else(|| {
            format!(
                "a sentinel:// URL needs the primary's name: add ?master_name=NAME or set \
                 {SENTINEL_MASTER_ENV}"
            )
        })?;
    Ok(SentinelTarget {
        sentinels,
        master_name,
        redis,
    })
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// A client for `url` (see the module documentation), or a one-line reason it cannot be made.
pub fn client(url: &str) -> Result<redis::Client, String> {
    if !url.starts_with("rediss://") {
        return redis::Client::open(url).map_err(|e| e.to_string());
    }
    let mut parsed = url::Url::parse(url).map_err(|e| e.to_string())?;
    let mut ca = None;
    let mut cert = None;
    let mut key = None;
    let mut kept: Vec<(String, String)> = Vec::new();
    for (k, v) in parsed.query_pairs() {
        match k.as_ref() {
            "ssl_ca_certs" => ca = Some(v.into_owned()),
            "ssl_certfile" => cert = Some(v.into_owned()),
            "ssl_keyfile" => key = Some(v.into_owned()),
            "ssl_cert_reqs" => match v.to_ascii_lowercase().as_str() {
                "required" | "cert_required" => {}
                "none" | "cert_none" | "optional" | "cert_optional" => {
                    return Err(format!(
                        "ssl_cert_reqs={v}: a Redis server is always verified; give its CA with \
                         ssl_ca_certs=/path/ca.pem"
                    ));
                }
                other => {
                    return Err(format!("ssl_cert_reqs={other}: use required (the default)"));
                }
            },
            _ => kept.push((k.into_owned(), v.into_owned())),
        }
    }
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    if parsed.fragment().is_some() {
        return Err(
            "a fragment (such as #insecure) is not taken: the server is always verified".into(),
        );
    }
    let read =
        |what: &str, path: &str| std::fs::read(path).map_err(|e| format!("{what}={path}: {e}"));
    let client_tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(ClientTlsConfig {
            client_cert: read("ssl_certfile", &cert)?,
            client_key: read("ssl_keyfile", &key)?,
        }),
        (None, None) => None,
        _ => return Err("ssl_certfile and ssl_keyfile go together".into()),
    };
    let root_cert = ca.map(|path| read("ssl_ca_certs", &path)).transpose()?;
    redis::Client::build_with_tls(
        parsed.as_str(),
        TlsCertificates {
            client_tls,
            root_cert,
        },
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_urls_pass_through_and_tls_parameters_are_checked() {
        assert!(client("redis://127.0.0.1:6379/0").is_ok());
        assert!(client("rediss://127.0.0.1:6380/0").is_ok());
        let missing = client("rediss://:pw@h:6380/0?ssl_ca_certs=/nonexistent/ca.pem").unwrap_err();
        assert!(
            missing.contains("ssl_ca_certs=/nonexistent/ca.pem"),
            "{missing}"
        );
        assert!(!missing.contains("pw"), "{missing}");
        let half = client("rediss://h:6380/0?ssl_certfile=/etc/hostname").unwrap_err();
        assert!(half.contains("go together"), "{half}");
        let odd = client("rediss://h:6380/0?ssl_cert_reqs=maybe").unwrap_err();
        assert!(odd.contains("ssl_cert_reqs=maybe"), "{odd}");
        let off = client("rediss://h:6380/0?ssl_cert_reqs=CERT_NONE").unwrap_err();
        assert!(off.contains("always verified"), "{off}");
        assert!(client("rediss://h:6380/0#insecure").is_err());
    }

    #[test]
    fn sentinel_urls_read_as_celery_reads_them() {
        let t = sentinel(
            "sentinel://:s3cret@10.0.0.1:26379/3;sentinel://10.0.0.2;sentinel://[::1]:26380/3",
            Some("from-env".into()),
        )
        .unwrap();
        assert_eq!(
            t.sentinels,
            vec![
                ("10.0.0.1".to_owned(), 26379),
                ("10.0.0.2".to_owned(), 26379),
                ("::1".to_owned(), 26380)
            ]
        );
        assert_eq!(t.master_name, "from-env");
        assert_eq!(t.redis.db(), 3);
        assert_eq!(t.redis.password(), Some("s3cret"));
        assert!(!format!("{t:?}").contains("s3cret"));

        let named = sentinel(
            "sentinel://h:1/0;sentinel://h:2/0?master_name=mymaster",
            None,
        )
        .unwrap();
        assert_eq!(named.master_name, "mymaster");
        let url_wins = sentinel("sentinel://h:1?master_name=a", Some("b".into())).unwrap();
        assert_eq!(url_wins.master_name, "a");

        let unnamed = sentinel("sentinel://h:1", None).unwrap_err();
        assert!(unnamed.contains(SENTINEL_MASTER_ENV), "{unnamed}");
        let tls =
            sentinel("sentinel://h:1?master_name=a&ssl_cert_reqs=required", None).unwrap_err();
        assert!(tls.contains("not supported"), "{tls}");
        let odd = sentinel("sentinel://h:1?master_name=a&socket_timeout=3", None).unwrap_err();
        assert!(odd.contains("unknown parameter socket_timeout"), "{odd}");
        let mixed = sentinel("sentinel://h:1;redis://h:2?master_name=a", None).unwrap_err();
        assert!(mixed.contains("starts with sentinel://"), "{mixed}");
        let db = sentinel("sentinel://:pw@h:1/x?master_name=a", None).unwrap_err();
        assert!(db.contains("not a number"), "{db}");
        assert!(!db.contains("pw"), "{db}");
        assert!(
            is_redis_url("sentinel://h:1")
                && is_redis_url("rediss://h")
                && !is_redis_url("amqp://h")
        );
        assert_eq!(
            crate::redact_url("sentinel://:pw@h:1/0;sentinel://u:pw2@h:2/0"),
            "sentinel://:***@h:1/0;sentinel://u:***@h:2/0"
        );
    }
}
