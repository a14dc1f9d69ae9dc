//! The gRPC settings of `billing-api` (ARCHITECTURE.md §3.4): each a flag and an environment
//! variable.

use std::net::SocketAddr;
use std::sync::Arc;

use super::caller::Authenticator;
use super::server::Tls;
use crate::error::{BillingError, Result};
use crate::secret::Secret;

/// Where the gRPC API listens and whom it trusts.
#[derive(Debug, Clone, clap::Args)]
pub struct GrpcArgs {
    /// Address the gRPC API listens on.
    #[arg(long, env = "BILLING_GRPC_BIND", default_value = "127.0.0.1:50051")]
    pub grpc_bind: SocketAddr,

    /// The auth service's public keys that sign access tokens: PEM files (RSA for RS256, P-256
    /// for ES256), comma-separated. Unset: no user token is accepted.
    #[arg(long, env = "BILLING_JWT_PUBLIC_KEYS")]
    pub jwt_public_keys: Option<String>,

    /// The `iss` access tokens must carry.
    #[arg(long, env = "BILLING_JWT_ISSUER", default_value = "auth")]
    pub jwt_issuer: String,

    /// The `aud` access tokens must carry.
    #[arg(long, env = "BILLING_JWT_AUDIENCE", default_value = "billing")]
    pub jwt_audience: String,

    /// Back-ends allowed to call for a user: `name:scope+scope:token`, comma-separated (scopes
    /// `billing.read`, `billing.write`; tokens of 16+ characters).
    #[arg(long, env = "BILLING_SERVICE_TOKENS", hide_env_values = true)]
    pub service_tokens: Option<String>,

    /// TLS certificate chain (PEM file); with BILLING_GRPC_TLS_KEY the API speaks TLS only.
    #[arg(long, env = "BILLING_GRPC_TLS_CERT")]
    pub tls_cert: Option<String>,

    /// TLS private key (PEM file).
    #[arg(long, env = "BILLING_GRPC_TLS_KEY")]
    pub tls_key: Option<String>,
}

fn read(var: &str, path: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| BillingError::invalid(format!("{var}: cannot read `{path}`: {e}")))
}

impl GrpcArgs {
    /// The caller checks these settings describe.
    pub fn authenticator(&self) -> Result<Arc<Authenticator>> {
        let mut auth = Authenticator::new(&self.jwt_issuer, &self.jwt_audience);
        for path in self
            .jwt_public_keys
            .iter()
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            auth = auth.with_public_key_pem(&read("BILLING_JWT_PUBLIC_KEYS", path)?)?;
        }
        if let Some(spec) = &self.service_tokens {
            auth = auth.with_service_tokens(&Secret::new(spec.clone()))?;
        }
        Ok(Arc::new(auth))
    }

    /// The TLS identity, if configured.
    pub fn tls(&self) -> Result<Option<Tls>> {
        match (&self.tls_cert, &self.tls_key) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => Ok(Some(Tls {
                cert_pem: read("BILLING_GRPC_TLS_CERT", cert)?,
                key_pem: Secret::new(read("BILLING_GRPC_TLS_KEY", key)?),
            })),
            _ => Err(BillingError::invalid(
                "BILLING_GRPC_TLS_CERT and BILLING_GRPC_TLS_KEY go together",
            )),
        }
    }
}
