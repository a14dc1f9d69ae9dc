//! A fake auth service speaking `auth.v1`, for the tests and the demo: it keeps the roles it was
//! told and refuses stale sequence numbers (FAILED_PRECONDITION, `STALE_SEQUENCE`), so a test can
//! see that role changes arrive in order. A repeated idempotency key answers the first result.
//! Every applied change is kept in a log, in the order applied.
//!
//! It also stands in for the auth service's login: [`issue_access_token`] signs a user access
//! token (ES256, the claims billing checks) with a demo key, so the demo and a hand-written client
//! can call `billing.v1` as the frontend does.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::grpc::proto::auth::v1 as pb;
use crate::secret::Secret;

/// Signs an access token for `user`, as the auth service would after a login: ES256 with the
/// P-256 private key `signing_key_pem` (PKCS#8 PEM), `iss`/`aud` as given, valid for `ttl`.
/// Billing accepts it when the matching public key is in `BILLING_JWT_PUBLIC_KEYS`.
pub fn issue_access_token(
    signing_key_pem: &[u8],
    user: uuid::Uuid,
    issuer: &str,
    audience: &str,
    ttl: std::time::Duration,
) -> crate::Result<String> {
    let key = jsonwebtoken::EncodingKey::from_ec_pem(signing_key_pem).map_err(|e| {
        crate::BillingError::invalid(format!(
            "the signing key is not a P-256 private key in PKCS#8 PEM: {e}"
        ))
    })?;
    let now = chrono::Utc::now().timestamp();
    let claims = serde_json::json!({
        "sub": user.to_string(), "iss": issuer, "aud": audience,
        "iat": now, "exp": now + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2),
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &key,
    )
    .map_err(|e| crate::BillingError::invalid(format!("could not sign the access token: {e}")))
}

/// One change the fake applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The user.
    pub user_id: String,
    /// `grant` or `revoke`.
    pub op: &'static str,
    /// The role.
    pub role: String,
    /// The change's sequence number.
    pub user_seq: i64,
}

#[derive(Debug, Default)]
struct UserState {
    last_seq: i64,
    roles: HashMap<String, Option<prost_types::Timestamp>>,
}

#[derive(Debug, Default)]
struct State {
    users: HashMap<String, UserState>,
    keys: HashMap<String, i64>,
    log: Vec<Applied>,
    refused_stale: u64,
}

/// The fake's state, shared with the test that started it.
#[derive(Debug, Clone)]
pub struct FakeAuth {
    state: Arc<Mutex<State>>,
    token: Secret<String>,
}

impl FakeAuth {
    /// A fake accepting calls bearing `token`.
    pub fn new(token: Secret<String>) -> Self {
        FakeAuth {
            state: Arc::default(),
            token,
        }
    }

    /// Every applied change, in order.
    pub fn log(&self) -> Vec<Applied> {
        self.state.lock().expect("fake auth state").log.clone()
    }

    /// The roles a user holds now.
    pub fn roles(&self, user_id: &str) -> Vec<String> {
        let state = self.state.lock().expect("fake auth state");
        let mut roles: Vec<String> = state
            .users
            .get(user_id)
            .map(|u| u.roles.keys().cloned().collect())
            .unwrap_or_default();
        roles.sort();
        roles
    }

    /// How many stale changes were refused.
    pub fn refused_stale(&self) -> u64 {
        self.state.lock().expect("fake auth state").refused_stale
    }

    fn check_token<T>(&self, r: &Request<T>) -> Result<(), Status> {
        let expected = format!("Bearer {}", self.token.expose());
        match r
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
        {
            Some(v) if v == expected => Ok(()),
            Some(_) => Err(Status::unauthenticated("wrong service token")),
            None => Err(Status::unauthenticated("no service token")),
        }
    }

    fn apply(
        &self,
        user_id: String,
        role: String,
        user_seq: i64,
        key: String,
        op: &'static str,
        expires_at: Option<prost_types::Timestamp>,
    ) -> Result<pb::RoleResponse, Status> {
        if uuid::Uuid::parse_str(&user_id).is_err() || role.is_empty() || key.is_empty() {
            return Err(Status::invalid_argument(
                "user_id (a UUID), role and idempotency_key are required",
            ));
        }
        if user_seq < 1 {
            return Err(Status::invalid_argument("user_seq must be at least 1"));
        }
        let mut state = self.state.lock().expect("fake auth state");
        if state.keys.contains_key(&key) {
            let applied_seq = state.users.get(&user_id).map_or(0, |u| u.last_seq);
            return Ok(pb::RoleResponse {
                applied_seq,
                replayed: true,
            });
        }
        let user = state.users.entry(user_id.clone()).or_default();
        if user_seq <= user.last_seq {
            let last = user.last_seq;
            state.refused_stale += 1;
            return Err(Status::with_error_details(
                tonic::Code::FailedPrecondition,
                format!("user_seq {user_seq} is not above {last}, the last applied"),
                ErrorDetails::with_precondition_failure_violation(
                    "STALE_SEQUENCE",
                    user_id,
                    format!("last applied sequence number is {last}"),
                ),
            ));
        }
        user.last_seq = user_seq;
        if op == "grant" {
            user.roles.insert(role.clone(), expires_at);
        } else {
            user.roles.remove(&role);
        }
        state.keys.insert(key, user_seq);
        state.log.push(Applied {
            user_id,
            op,
            role,
            user_seq,
        });
        Ok(pb::RoleResponse {
            applied_seq: user_seq,
            replayed: false,
        })
    }

    /// Serves `auth.v1.Auth` on `listener` until `shutdown`.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        tonic::transport::Server::builder()
            .add_service(pb::auth_server::AuthServer::new(self))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                shutdown,
            )
            .await
    }
}

#[tonic::async_trait]
impl pb::auth_server::Auth for FakeAuth {
    async fn grant_role(
        &self,
        request: Request<pb::GrantRoleRequest>,
    ) -> Result<Response<pb::RoleResponse>, Status> {
        self.check_token(&request)?;
        let r = request.into_inner();
        self.apply(
            r.user_id,
            r.role,
            r.user_seq,
            r.idempotency_key,
            "grant",
            r.expires_at,
        )
        .map(Response::new)
    }

    async fn revoke_role(
        &self,
        request: Request<pb::RevokeRoleRequest>,
    ) -> Result<Response<pb::RoleResponse>, Status> {
        self.check_token(&request)?;
        let r = request.into_inner();
        self.apply(
            r.user_id,
            r.role,
            r.user_seq,
            r.idempotency_key,
            "revoke",
            None,
        )
        .map(Response::new)
    }

    async fn check_user(
        &self,
        request: Request<pb::CheckUserRequest>,
    ) -> Result<Response<pb::CheckUserResponse>, Status> {
        self.check_token(&request)?;
        let user = request.into_inner().user_id;
        if uuid::Uuid::parse_str(&user).is_err() {
            return Err(Status::invalid_argument("user_id must be a UUID"));
        }
        // Every well-formed user exists in the fake.
        Ok(Response::new(pb::CheckUserResponse {
            exists: true,
            roles: self.roles(&user),
        }))
    }
}
