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

use redis::{ClientTlsConfig, TlsCertificates};

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
}
