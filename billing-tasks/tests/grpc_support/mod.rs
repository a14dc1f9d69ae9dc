//! A gRPC test front over a billing test environment: the `billing.v1` server on `127.0.0.1:0`
//! with a fresh ES256 key standing in for the auth service's, tokens minted with it, and a
//! service token.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use billing_tasks::grpc::api::BillingApi;
use billing_tasks::grpc::caller::Authenticator;
use billing_tasks::grpc::metrics::GrpcMetrics;
use billing_tasks::secret::Secret;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::billing_support::Env;

pub const ISSUER: &str = "auth";
pub const AUDIENCE: &str = "billing";
pub const SERVICE_TOKEN: &str = "bff-service-token-0123456789";

/// A signing key like the auth service's.
pub struct SigningKey {
    pkcs8: Vec<u8>,
    pub public_pem: String,
}

impl SigningKey {
    pub fn generate() -> Self {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let pkcs8 = pair.to_pkcs8v1().unwrap().as_ref().to_vec();
        let der = pair.public_key().as_der().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        let public_pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            lines.join("\n")
        );
        SigningKey { pkcs8, public_pem }
    }

    /// An access token for `user` valid for `ttl_secs` (negative: already expired).
    pub fn token_for(&self, user: Uuid, ttl_secs: i64) -> String {
        self.token_with(user, ttl_secs, ISSUER, AUDIENCE)
    }

    pub fn token_with(&self, user: Uuid, ttl_secs: i64, iss: &str, aud: &str) -> String {
        let now = chrono::Utc::now().timestamp();
        let claims = serde_json::json!({
            "sub": user.to_string(), "iss": iss, "aud": aud,
            "iat": now, "exp": now + ttl_secs, "roles": ["user"],
        });
        jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &claims,
            &EncodingKey::from_ec_der(&self.pkcs8),
        )
        .unwrap()
    }
}

pub struct GrpcFront {
    pub addr: SocketAddr,
    pub key: SigningKey,
    pub registry: Arc<Registry>,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<billing_tasks::Result<()>>,
}

impl GrpcFront {
    pub async fn start(env: &Env) -> GrpcFront {
        let key = SigningKey::generate();
        let auth = Authenticator::new(ISSUER, AUDIENCE)
            .with_public_key_pem(key.public_pem.as_bytes())
            .unwrap()
            .with_service_tokens(&Secret::new(format!(
                "bff:billing.read+billing.write:{SERVICE_TOKEN},reader:billing.read:reader-token-0123456789"
            )))
            .unwrap();
        let mut registry = Registry::default();
        let metrics = GrpcMetrics::register(&mut registry);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let api = BillingApi::new(env.service.clone(), Arc::new(auth));
        let server = tokio::spawn(billing_tasks::grpc::server::serve(
            listener,
            api,
            env.billing.clone(),
            metrics,
            None,
            async {
                let _ = stopped.await;
            },
        ));
        GrpcFront {
            addr,
            key,
            registry: Arc::new(registry),
            stop: Some(stop),
            server,
        }
    }

    pub fn metrics_text(&self) -> String {
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &self.registry).unwrap();
        body
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.server.await;
    }
}
