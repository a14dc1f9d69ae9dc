//! Sign-in through an OpenID Connect provider (any standard one: Keycloak, Google, Okta, Azure
//! AD, GitLab, Dex): the authorization-code flow with PKCE.
//!
//! `GET /login/oidc` sends the browser to the provider's authorization endpoint (from its
//! discovery document, `<issuer>/.well-known/openid-configuration`, read once) with a fresh
//! `state`, `nonce` and PKCE challenge, which a short-lived signed cookie keeps. The provider
//! sends it back to `GET /login/oidc/callback` with a code; the code is exchanged at the token
//! endpoint (client secret and PKCE verifier), and the ID token is checked: its signature against
//! the provider's published keys (RS256/ES256 and the rest `jsonwebtoken` knows), its issuer,
//! audience, expiry and nonce. The user is the token's `email` (else `preferred_username`, else
//! `sub`); the role is the highest one the mapping grants from a claim (e.g. `groups`), and a user
//! it grants none is refused. The session is then the same signed cookie as a configured user's.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use crate::Role;

/// The provider and how its users map to roles.
#[derive(Debug, Clone)]
pub struct OidcConfig<R> {
    /// The issuer URL, exactly as the provider's tokens carry it.
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    /// This UI's callback, `https://<host>/login/oidc/callback`, as registered with the provider.
    pub redirect_url: String,
    /// The claim holding the user's groups or roles (a string or a list of strings).
    pub role_claim: String,
    /// (claim value, role); `*` matches every signed-in user.
    pub roles: Vec<(String, R)>,
    /// The provider's name on the sign-in button.
    pub name: String,
}

/// `value=role` pairs, comma-separated (`monitor-admins=admin,ops=operator,*=viewer`).
pub fn parse_role_map<R: Role>(text: &str) -> Result<Vec<(String, R)>, String> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (value, role) = part
            .rsplit_once('=')
            .ok_or_else(|| format!("`{part}`: expected CLAIM-VALUE=role"))?;
        let role = R::parse(role.trim()).ok_or_else(|| {
            let names: Vec<&str> = R::ALL.iter().map(|r| r.name()).collect();
            format!("`{part}`: unknown role (one of {})", names.join(", "))
        })?;
        out.push((value.trim().to_owned(), role));
    }
    if out.is_empty() {
        return Err("the role mapping grants no role to anyone".into());
    }
    Ok(out)
}

#[derive(Debug, Clone, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
}

/// A configured provider; the discovery document is read on first use.
#[derive(Debug)]
pub struct Oidc<R> {
    config: OidcConfig<R>,
    http: reqwest::Client,
    discovery: OnceCell<Discovery>,
}

/// What the browser carries between the redirect and the callback.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Pending {
    pub state: String,
    pub nonce: String,
    pub verifier: String,
    pub next: String,
}

fn random() -> String {
    use argon2::password_hash::rand_core::{OsRng, RngCore};
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    B64.encode(bytes)
}

impl<R: Role> Oidc<R> {
    pub fn new(config: OidcConfig<R>) -> Self {
        Oidc {
            config,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("an HTTP client with a timeout"),
            discovery: OnceCell::new(),
        }
    }

    /// The provider's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    async fn discovery(&self) -> Result<&Discovery, String> {
        self.discovery
            .get_or_try_init(|| async {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    self.config.issuer.trim_end_matches('/')
                );
                let d: Discovery = self
                    .http
                    .get(&url)
                    .send()
                    .await
                    .and_then(|r| r.error_for_status())
                    .map_err(|e| format!("the provider's discovery document {url}: {e}"))?
                    .json()
                    .await
                    .map_err(|e| format!("the provider's discovery document {url}: {e}"))?;
                if d.issuer != self.config.issuer {
                    return Err(format!(
                        "the provider says its issuer is {}, not {}",
                        d.issuer, self.config.issuer
                    ));
                }
                Ok(d)
            })
            .await
    }

    /// The authorization URL to send the browser to, and what to keep until the callback.
    pub async fn start(&self, next: &str) -> Result<(String, Pending), String> {
        let d = self.discovery().await?;
        let pending = Pending {
            state: random(),
            nonce: random(),
            verifier: random(),
            next: next.to_owned(),
        };
        let challenge = B64.encode(Sha256::digest(pending.verifier.as_bytes()));
        let query = serde_urlencoded::to_string([
            ("response_type", "code"),
            ("client_id", self.config.client_id.as_str()),
            ("redirect_uri", self.config.redirect_url.as_str()),
            ("scope", "openid email profile"),
            ("state", pending.state.as_str()),
            ("nonce", pending.nonce.as_str()),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ])
        .map_err(|e| e.to_string())?;
        let sep = if d.authorization_endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        Ok((format!("{}{sep}{query}", d.authorization_endpoint), pending))
    }

    /// Exchanges the callback's `code` and checks the ID token: the user and their role.
    pub async fn finish(&self, code: &str, pending: &Pending) -> Result<(String, R), String> {
        let d = self.discovery().await?;
        let form = [
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", self.config.redirect_url.as_str()),
            ("client_id", self.config.client_id.as_str()),
            ("client_secret", self.config.client_secret.as_str()),
            ("code_verifier", pending.verifier.as_str()),
        ];
        let tokens: Value = self
            .http
            .post(&d.token_endpoint)
            .form(&form)
            .send()
            .await
            .map_err(|e| format!("the provider's token endpoint: {e}"))?
            .json()
            .await
            .map_err(|e| format!("the provider's token endpoint: {e}"))?;
        let id_token =
            tokens
                .get("id_token")
                .and_then(Value::as_str)
                .ok_or_else(|| match tokens.get("error") {
                    Some(e) => format!("the provider refused the code: {e}"),
                    None => "the provider's answer has no id_token".to_owned(),
                })?;
        let claims = self.verify(d, id_token).await?;
        if claims.get("nonce").and_then(Value::as_str) != Some(pending.nonce.as_str()) {
            return Err("the ID token's nonce is not this sign-in's".into());
        }
        let user = ["email", "preferred_username", "sub"]
            .iter()
            .find_map(|c| claims.get(*c).and_then(Value::as_str))
            .ok_or("the ID token names no user")?
            .to_owned();
        let values: Vec<String> = match claims.get(&self.config.role_claim) {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        let role = self
            .config
            .roles
            .iter()
            .filter(|(value, _)| value == "*" || values.contains(value))
            .map(|(_, r)| *r)
            .max()
            .ok_or_else(|| {
                format!(
                    "{user} holds no role here (claim `{}`: {values:?})",
                    self.config.role_claim
                )
            })?;
        Ok((user, role))
    }

    async fn verify(
        &self,
        d: &Discovery,
        token: &str,
    ) -> Result<serde_json::Map<String, Value>, String> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| format!("the ID token: {e}"))?;
        let jwks: jsonwebtoken::jwk::JwkSet = self
            .http
            .get(&d.jwks_uri)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| format!("the provider's keys: {e}"))?
            .json()
            .await
            .map_err(|e| format!("the provider's keys: {e}"))?;
        let jwk = match &header.kid {
            Some(kid) => jwks.find(kid),
            None => jwks.keys.first(),
        }
        .ok_or("the ID token is signed with a key the provider does not publish")?;
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk)
            .map_err(|e| format!("the provider's key: {e}"))?;
        let mut validation = jsonwebtoken::Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.client_id]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key, &validation)
            .map_err(|e| format!("the ID token does not check out: {e}"))?;
        Ok(data.claims)
    }
}
