//! TLS for `amqps://` broker URLs, with rustls.
//!
//! An `amqps://` URL is verified against the system's trust store plus, when set,
//! `BROKER_TLS_CA_FILE` (PEM: the CA that signed the broker's certificate, as a private CA
//! usually is); the name checked is the URL's host, so connect by the name (or IP address) the
//! certificate carries. `BROKER_TLS_CERT_FILE` and `BROKER_TLS_KEY_FILE` (PEM certificate chain and
//! PKCS#8 key) present a client certificate, for brokers that require one (RabbitMQ's
//! `ssl_options.fail_if_no_peer_cert`). The files are read once, at start, so a missing or
//! unreadable file stops the program there with the setting's name. `amqp://` URLs ignore all of
//! this and stay plain.

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Connection, ConnectionProperties};

use crate::error::{Error, Result};

/// What an `amqps://` connection trusts and presents.
#[derive(Clone, Default, PartialEq)]
pub struct BrokerTls {
    /// PEM certificates trusted besides the system's.
    ca_pem: Option<String>,
    /// PEM certificate chain and PEM PKCS#8 key.
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for BrokerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("BrokerTls")
            .field("extra_ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

impl BrokerTls {
    /// From `BROKER_TLS_CA_FILE`, `BROKER_TLS_CERT_FILE` and `BROKER_TLS_KEY_FILE`.
    pub fn from_env() -> Result<Self> {
        let path = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        Self::from_files(
            path("BROKER_TLS_CA_FILE").as_deref(),
            path("BROKER_TLS_CERT_FILE").as_deref(),
            path("BROKER_TLS_KEY_FILE").as_deref(),
        )
    }

    /// From the files (PEM) at these paths; see the module documentation.
    pub fn from_files(ca: Option<&str>, cert: Option<&str>, key: Option<&str>) -> Result<Self> {
        let read = |setting: &str, path: &str| {
            std::fs::read(path)
                .map_err(|e| Error::Config(format!("{setting} {path}: {e}")))
                .and_then(|bytes| {
                    if String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
                        Ok(bytes)
                    } else {
                        Err(Error::Config(format!("{setting} {path}: not a PEM file")))
                    }
                })
        };
        let ca_pem = match ca {
            Some(path) => Some(
                String::from_utf8(read("BROKER_TLS_CA_FILE", path)?).map_err(|_| {
                    Error::Config(format!("BROKER_TLS_CA_FILE {path}: not a PEM file"))
                })?,
            ),
            None => None,
        };
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((
                read("BROKER_TLS_CERT_FILE", cert)?,
                read("BROKER_TLS_KEY_FILE", key)?,
            )),
            (None, None) => None,
            _ => {
                return Err(Error::Config(
                    "BROKER_TLS_CERT_FILE and BROKER_TLS_KEY_FILE go together: a client \
                     certificate needs its key"
                        .into(),
                ));
            }
        };
        Ok(BrokerTls { ca_pem, identity })
    }

    fn config(&self) -> OwnedTLSConfig {
        OwnedTLSConfig {
            identity: self
                .identity
                .as_ref()
                .map(|(pem, key)| OwnedIdentity::PKCS8 {
                    pem: pem.clone(),
                    key: key.clone(),
                }),
            cert_chain: self.ca_pem.clone(),
        }
    }

    /// Opens a connection to `uri` (`amqp://` plain, `amqps://` with TLS as configured here).
    pub async fn connect(
        &self,
        uri: &str,
        props: ConnectionProperties,
    ) -> lapin::Result<Connection> {
        lapin::DefaultConnectionBuilder::new()?
            .with_uri_str(uri.to_owned())
            .with_properties(props)
            .with_tls_config(self.config())
            .connect()
            .await
    }
}
