//! Who is calling: a user with the auth service's access token (a JWT signed RS256 or ES256 with
//! a key from configuration; `exp`, `aud` and `iss` checked; the user is `sub`), or another
//! back-end with a static service token and scopes, naming the user it acts for in
//! `x-on-behalf-of`. A user only ever acts on their own objects; the API looks everything up by
//! the caller's user id.

use std::collections::HashSet;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tonic::Status;
use uuid::Uuid;

use crate::error::{BillingError, Result};
use crate::secret::Secret;

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Reads (`billing.read`).
    Read,
    /// Changes (`billing.write`).
    Write,
}

impl Scope {
    fn name(self) -> &'static str {
        match self {
            Scope::Read => "billing.read",
            Scope::Write => "billing.write",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A user with an access token.
    User(Uuid),
    /// A back-end (by its configured name) acting for a user.
    Service {
        /// The service's name.
        name: String,
        /// The user it acts for.
        user: Uuid,
    },
}

impl Caller {
    /// The user the call acts for.
    pub fn user(&self) -> Uuid {
        match self {
            Caller::User(u) | Caller::Service { user: u, .. } => *u,
        }
    }
}

struct Key {
    alg: Algorithm,
    key: DecodingKey,
}

struct ServiceToken {
    name: String,
    token: Secret<String>,
    scopes: HashSet<String>,
}

/// Checks credentials. Build it with [`Authenticator::new`] and add keys and service tokens.
pub struct Authenticator {
    keys: Vec<Key>,
    issuer: String,
    audience: String,
    services: Vec<ServiceToken>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("keys", &self.keys.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field(
                "services",
                &self.services.iter().map(|s| &s.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
}

impl Authenticator {
    /// Accepts tokens issued by `issuer` for `audience`.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Authenticator {
            keys: Vec::new(),
            issuer: issuer.into(),
            audience: audience.into(),
            services: Vec::new(),
        }
    }

    /// Adds a public key (PEM: an RSA key for RS256, or a P-256 key for ES256).
    pub fn with_public_key_pem(mut self, pem: &[u8]) -> Result<Self> {
        let key = if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
            Key {
                alg: Algorithm::RS256,
                key: k,
            }
        } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
            Key {
                alg: Algorithm::ES256,
                key: k,
            }
        } else {
            return Err(BillingError::invalid(
                "BILLING_JWT_PUBLIC_KEYS: a key is neither an RSA nor an EC public key in PEM",
            ));
        };
        self.keys.push(key);
        Ok(self)
    }

    /// Adds service tokens from `name:scope+scope:token` entries separated by `,`.
    pub fn with_service_tokens(mut self, spec: &Secret<String>) -> Result<Self> {
        for entry in spec.expose().split(',').filter(|e| !e.trim().is_empty()) {
            let mut parts = entry.trim().splitn(3, ':');
            let (Some(name), Some(scopes), Some(token)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(BillingError::invalid(
                    "BILLING_SERVICE_TOKENS: each entry is name:scope+scope:token",
                ));
            };
            if token.len() < 16 {
                return Err(BillingError::invalid(format!(
                    "BILLING_SERVICE_TOKENS: the token of `{name}` must be at least 16 characters"
                )));
            }
            self.services.push(ServiceToken {
                name: name.to_owned(),
                token: Secret::new(token.to_owned()),
                scopes: scopes.split('+').map(str::to_owned).collect(),
            });
        }
        Ok(self)
    }

    /// Authenticates a request's metadata for `scope`.
    pub fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        scope: Scope,
    ) -> Result<Caller, Status> {
        let header = metadata
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("no `authorization: Bearer <token>` metadata"))?
            .to_str()
            .map_err(|_| Status::unauthenticated("the authorization metadata is not text"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?
            .trim();
        if token.len() > 8192 {
            return Err(Status::unauthenticated("the token is too long"));
        }
        if let Some(service) = self.service_for(token) {
            if !service.scopes.contains(scope.name()) {
                return Err(Status::permission_denied(format!(
                    "service `{}` lacks scope {}",
                    service.name,
                    scope.name()
                )));
            }
            let user = metadata
                .get("x-on-behalf-of")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| Uuid::parse_str(v).ok())
                .ok_or_else(|| {
                    crate::grpc::status::invalid(
                        "x-on-behalf-of",
                        "a service call names the user it acts for (a UUID)",
                    )
                })?;
            return Ok(Caller::Service {
                name: service.name.clone(),
                user,
            });
        }
        self.verify_jwt(token).map(Caller::User)
    }

    fn service_for(&self, token: &str) -> Option<&ServiceToken> {
        use sha2::{Digest, Sha256};
        // Compare digests so the time taken says nothing about how much of a token matched.
        let presented = Sha256::digest(token.as_bytes());
        self.services
            .iter()
            .find(|s| Sha256::digest(s.token.expose().as_bytes()) == presented)
    }

    fn verify_jwt(&self, token: &str) -> Result<Uuid, Status> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Status::unauthenticated("the access token is not a JWT"))?;
        let mut last = None;
        for k in self.keys.iter().filter(|k| k.alg == header.alg) {
            let mut v = Validation::new(k.alg);
            v.set_issuer(&[&self.issuer]);
            v.set_audience(&[&self.audience]);
            v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            v.leeway = 30;
            match jsonwebtoken::decode::<Claims>(token, &k.key, &v) {
                Ok(data) => {
                    return Uuid::parse_str(&data.claims.sub).map_err(|_| {
                        Status::unauthenticated("the access token's subject is not a user id")
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        use jsonwebtoken::errors::ErrorKind;
        Err(Status::unauthenticated(
            match last.as_ref().map(|e| e.kind()) {
                None => {
                    "the access token is signed with an algorithm or key billing does not accept"
                }
                Some(ErrorKind::ExpiredSignature) => "the access token has expired",
                Some(ErrorKind::InvalidAudience) => "the access token is not for billing",
                Some(ErrorKind::InvalidIssuer) => "the access token is not from the auth service",
                Some(ErrorKind::InvalidSignature) => {
                    "the access token's signature does not match any configured key"
                }
                Some(_) => "the access token is invalid",
            },
        ))
    }
}
