//! Sign-in for the staff web UIs (the task monitor, billing's back-office): configured users
//! with Argon2id password hashes, a role per user, signed session cookies that expire, and CSRF
//! tokens bound to the session. One implementation, so both UIs refuse the same things.
//!
//! - **OpenID Connect** ([`oidc`]): any standard provider, the authorization-code flow with
//!   PKCE; the role from a claim of the ID token. Its sessions are the same cookies, marked as
//!   the provider's (not checked against the configured users).
//! - **Users** come from configuration: one entry per line (or `;`-separated), `name role hash`,
//!   the hash a PHC string as [`hash_password`] (or `argon2`'s CLI) writes it. Passwords are
//!   never stored or logged; an unknown name costs the same Argon2 work as a wrong password.
//! - **Sessions** are a cookie `user.role.expires.nonce.mac`, the MAC an HMAC-SHA256 under the
//!   session key; nothing is kept on the server, so replicas sharing the key share sessions. A
//!   session ends at its expiry, and as soon as the user is removed or their role changes in the
//!   configuration (the cookie's role must still be the configured one). The cookie is
//!   `HttpOnly` and `SameSite=Strict`, and `Secure` unless told otherwise.
//! - **CSRF**: every state-changing request made with a session cookie must carry the session's
//!   token (a hidden `csrf` form field or an `X-CSRF-Token` header), an HMAC of the session's
//!   nonce. Requests authenticated with an `Authorization: Basic` header (scripts) carry no
//!   cookie a browser could send on their behalf, and need none.
//! - **The audit log** ([`audit`]): who did what, when and why, append-only, exportable.
//! - **Roles** are the application's: an ordered enum implementing [`Role`]; [`guard`] asks the
//!   application which role a request needs and refuses it with 403 below that.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64};
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub mod audit;
pub mod guard;
pub mod oidc;

pub use guard::{Guard, LoginText};
pub use oidc::{Oidc, OidcConfig};

type HmacSha256 = Hmac<Sha256>;

/// An application's roles, lowest first: a user holds everything a lower role may do.
pub trait Role: Copy + Eq + Ord + fmt::Debug + Send + Sync + 'static {
    /// Every role, lowest first.
    const ALL: &'static [Self];

    /// The role's name in configuration and on pages.
    fn name(self) -> &'static str;

    /// The role named `name`.
    fn parse(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|r| r.name() == name)
    }
}

/// A signed-in user.
#[derive(Clone, PartialEq, Eq)]
pub struct Session<R> {
    pub user: String,
    pub role: R,
    /// Unix seconds after which the session is over.
    pub expires: i64,
    /// Signed in through an identity provider (OIDC), not as a configured user.
    pub external: bool,
    nonce: String,
}

impl<R: fmt::Debug> fmt::Debug for Session<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("user", &self.user)
            .field("role", &self.role)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Account<R> {
    role: R,
    hash: String,
}

/// The key sessions and CSRF tokens are signed with.
#[derive(Clone)]
pub struct SessionKey(Vec<u8>);

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl SessionKey {
    /// A key given in configuration: at least 32 bytes, as base64 or hex.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bytes = if text.len().is_multiple_of(2) && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..text.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&text[i..i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|e| e.to_string())?
        } else {
            STANDARD
                .decode(text)
                .or_else(|_| B64.decode(text))
                .map_err(|_| "the session key is neither hex nor base64".to_owned())?
        };
        if bytes.len() < 32 {
            return Err(format!(
                "the session key has {} bytes; it needs at least 32 (e.g. `openssl rand -hex 32`)",
                bytes.len()
            ));
        }
        Ok(SessionKey(bytes))
    }

    /// A fresh random key: sessions then end when the process does, and replicas do not share
    /// them.
    pub fn random() -> Self {
        let mut bytes = vec![0u8; 32];
        OsRng.fill_bytes(&mut bytes);
        SessionKey(bytes)
    }
}

/// The configured users and the session settings.
pub struct Auth<R: Role> {
    accounts: HashMap<String, Account<R>>,
    /// Users the application keeps (its staff table), replaced by [`Auth::set_managed`]; a
    /// configured user of the same name wins.
    managed: std::sync::RwLock<HashMap<String, Account<R>>>,
    key: SessionKey,
    ttl: Duration,
    cookie: String,
    secure: bool,
    /// Verified against when the user is unknown, so the answer takes as long.
    dummy: String,
}

impl<R: Role> fmt::Debug for Auth<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut users: Vec<_> = self
            .accounts
            .iter()
            .map(|(n, a)| (n.as_str(), a.role))
            .collect();
        users.sort();
        f.debug_struct("Auth")
            .field("users", &users)
            .field("ttl", &self.ttl)
            .field("cookie", &self.cookie)
            .field("secure", &self.secure)
            .finish_non_exhaustive()
    }
}

/// Hashes `password` as a PHC string (Argon2id, the `argon2` crate's default parameters:
/// 19 MiB, 2 passes), for a users entry.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// For a program's `--hash-password`: reads a password from standard input, prints its hash
/// for a users entry and returns the exit code (2 when no password came).
pub fn print_hash_from_stdin(program: &str) -> std::process::ExitCode {
    let mut password = String::new();
    if std::io::stdin().read_line(&mut password).is_err() || password.trim_end().is_empty() {
        eprintln!("{program}: --hash-password reads the password from standard input");
        return std::process::ExitCode::from(2);
    }
    match hash_password(password.trim_end_matches(['\r', '\n'])) {
        Ok(hash) => {
            println!("{hash}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{program}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Parses users entries: `name role hash`, one per line or `;`-separated; blank lines and
/// lines starting with `#` are skipped. An error names the entry and what is wrong with it.
pub fn parse_users<R: Role>(text: &str) -> Result<Vec<(String, R, String)>, String> {
    let mut users: Vec<(String, R, String)> = Vec::new();
    for (i, entry) in text
        .split(['\n', ';'])
        .map(str::trim)
        .enumerate()
        .filter(|(_, e)| !e.is_empty() && !e.starts_with('#'))
    {
        let n = i + 1;
        let parts: Vec<&str> = entry.split_whitespace().collect();
        let [name, role, hash] = parts[..] else {
            return Err(format!(
                "users entry {n}: expected `name role hash`, found {} field(s)",
                parts.len()
            ));
        };
        let Some(role) = R::parse(role) else {
            let names: Vec<&str> = R::ALL.iter().map(|r| r.name()).collect();
            return Err(format!(
                "users entry {n} ({name}): unknown role `{role}` (one of {})",
                names.join(", ")
            ));
        };
        if PasswordHash::new(hash).is_err() {
            return Err(format!(
                "users entry {n} ({name}): the hash is not a PHC string such as `$argon2id$v=19$...`"
            ));
        }
        if users.iter().any(|(u, _, _)| u == name) {
            return Err(format!("users entry {n}: `{name}` is listed twice"));
        }
        users.push((name.to_owned(), role, hash.to_owned()));
    }
    Ok(users)
}

impl<R: Role> Auth<R> {
    /// Replaces the users the application manages (name, role, PHC hash), e.g. after staff
    /// were added, changed or disabled in its UI. A session of a user no longer listed, or
    /// listed with another role, ends at its next request.
    pub fn set_managed(&self, users: Vec<(String, R, String)>) {
        let users = users
            .into_iter()
            .filter(|(name, _, _)| !self.accounts.contains_key(name))
            .map(|(name, role, hash)| (name, Account { role, hash }))
            .collect();
        *self.managed.write().unwrap_or_else(|e| e.into_inner()) = users;
    }

    /// Whether `name` is a configured (not a managed) user.
    pub fn is_configured(&self, name: &str) -> bool {
        self.accounts.contains_key(name)
    }

    fn account(&self, name: &str) -> Option<Account<R>> {
        self.accounts.get(name).cloned().or_else(|| {
            self.managed
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(name)
                .cloned()
        })
    }

    /// The configured users and their roles, by name.
    pub fn user_roles(&self) -> Vec<(String, R)> {
        let mut users: Vec<(String, R)> = self
            .accounts
            .iter()
            .map(|(n, a)| (n.clone(), a.role))
            .collect();
        users.sort();
        users
    }

    /// Users and session settings: sessions last `ttl`, in a cookie named `cookie`, marked
    /// `Secure` when `secure` (set it whenever the UI is reached over HTTPS).
    pub fn new(
        users: Vec<(String, R, String)>,
        key: SessionKey,
        ttl: Duration,
        cookie: &str,
        secure: bool,
    ) -> Self {
        Auth {
            accounts: users
                .into_iter()
                .map(|(name, role, hash)| (name, Account { role, hash }))
                .collect(),
            managed: std::sync::RwLock::new(HashMap::new()),
            key,
            ttl,
            cookie: cookie.to_owned(),
            secure,
            dummy: hash_password("not a password anyone has").unwrap_or_default(),
        }
    }

    /// How many users there are (configured and managed).
    pub fn users(&self) -> usize {
        self.accounts.len() + self.managed.read().map_or(0, |m| m.len())
    }

    /// Checks a name and password: a new session on success. Takes the same Argon2 work for an
    /// unknown name as for a known one.
    pub fn sign_in(&self, user: &str, password: &str, now: i64) -> Option<Session<R>> {
        let account = self.account(user);
        let hash = account
            .as_ref()
            .map_or(self.dummy.as_str(), |a| a.hash.as_str());
        let parsed = PasswordHash::new(hash).ok()?;
        let ok = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        let account = account.filter(|_| ok)?;
        Some(self.new_session(user, account.role, false, now))
    }

    /// A session for `user` with `role`; `external` when an identity provider vouched for them
    /// (the session is then not checked against the configured users).
    pub fn new_session(&self, user: &str, role: R, external: bool, now: i64) -> Session<R> {
        let mut nonce = [0u8; 16];
        OsRng.fill_bytes(&mut nonce);
        Session {
            user: user.to_owned(),
            role,
            expires: now.saturating_add(i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX)),
            external,
            nonce: B64.encode(nonce),
        }
    }

    /// Signs `value` for a cookie of this UI: `value.mac`.
    pub fn sign(&self, what: &str, value: &str) -> String {
        let mac = B64.encode(self.mac(what, value).finalize().into_bytes());
        format!("{value}.{mac}")
    }

    /// The value [`sign`](Self::sign) signed, if the signature holds.
    pub fn unsign(&self, what: &str, signed: &str) -> Option<String> {
        let (value, mac) = signed.rsplit_once('.')?;
        self.mac(what, value)
            .verify_slice(&B64.decode(mac).ok()?)
            .ok()?;
        Some(value.to_owned())
    }

    /// The cookie name sessions use.
    pub fn cookie_name(&self) -> &str {
        &self.cookie
    }

    /// Whether cookies are marked `Secure`.
    pub fn secure(&self) -> bool {
        self.secure
    }

    /// Checks an `Authorization: Basic …` header value; a session for this request only.
    pub fn basic(&self, header: &str, now: i64) -> Option<Session<R>> {
        let encoded = header.strip_prefix("Basic ")?.trim();
        let decoded = String::from_utf8(STANDARD.decode(encoded).ok()?).ok()?;
        let (user, password) = decoded.split_once(':')?;
        self.sign_in(user, password, now)
    }

    fn mac(&self, what: &str, text: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key.0).expect("HMAC takes any key length");
        mac.update(what.as_bytes());
        mac.update(b"|");
        mac.update(text.as_bytes());
        mac
    }

    fn cookie_value(&self, s: &Session<R>) -> String {
        let body = format!(
            "{}.{}.{}.{}.{}",
            B64.encode(&s.user),
            s.role.name(),
            s.expires,
            s.nonce,
            if s.external { "oidc" } else { "local" }
        );
        let mac = B64.encode(self.mac("session", &body).finalize().into_bytes());
        format!("{body}.{mac}")
    }

    /// The `Set-Cookie` value that starts `session`.
    pub fn set_cookie(&self, s: &Session<R>) -> String {
        format!(
            "{}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
            self.cookie,
            self.cookie_value(s),
            self.ttl.as_secs(),
            if self.secure { "; Secure" } else { "" }
        )
    }

    /// The `Set-Cookie` value that ends a session.
    pub fn clear_cookie(&self) -> String {
        format!(
            "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
            self.cookie,
            if self.secure { "; Secure" } else { "" }
        )
    }

    /// The session a `Cookie` header carries, if it is ours, unaltered, unexpired, and its user
    /// still holds that role.
    pub fn from_cookies(&self, cookie_header: &str, now: i64) -> Option<Session<R>> {
        let value = cookie_header.split(';').find_map(|c| {
            let (name, value) = c.trim().split_once('=')?;
            (name == self.cookie).then_some(value)
        })?;
        let (body, mac) = value.rsplit_once('.')?;
        self.mac("session", body)
            .verify_slice(&B64.decode(mac).ok()?)
            .ok()?;
        let mut parts = body.split('.');
        let user = String::from_utf8(B64.decode(parts.next()?).ok()?).ok()?;
        let role = R::parse(parts.next()?)?;
        let expires: i64 = parts.next()?.parse().ok()?;
        let nonce = parts.next()?.to_owned();
        let external = match parts.next()? {
            "oidc" => true,
            "local" => false,
            _ => return None,
        };
        if parts.next().is_some() || expires <= now {
            return None;
        }
        let session = Session {
            user,
            role,
            expires,
            external,
            nonce,
        };
        if external {
            return Some(session);
        }
        let account = self.account(&session.user)?;
        (account.role == role).then_some(session)
    }

    /// The CSRF token of `session`, for its forms.
    pub fn csrf_token(&self, s: &Session<R>) -> String {
        B64.encode(self.mac("csrf", &s.nonce).finalize().into_bytes())
    }

    /// Whether `token` is `session`'s CSRF token (compared in constant time).
    pub fn csrf_ok(&self, s: &Session<R>, token: &str) -> bool {
        B64.decode(token.trim())
            .is_ok_and(|t| self.mac("csrf", &s.nonce).verify_slice(&t).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum R {
        Viewer,
        Admin,
    }

    impl Role for R {
        const ALL: &'static [Self] = &[R::Viewer, R::Admin];
        fn name(self) -> &'static str {
            match self {
                R::Viewer => "viewer",
                R::Admin => "admin",
            }
        }
    }

    fn auth(users: &str) -> Auth<R> {
        Auth::new(
            parse_users(users).unwrap(),
            SessionKey::parse(&"ab".repeat(32)).unwrap(),
            Duration::from_secs(3600),
            "s",
            true,
        )
    }

    #[test]
    fn a_session_signs_in_round_trips_and_expires() {
        let hash = hash_password("pw one").unwrap();
        let a = auth(&format!("ann admin {hash}"));
        assert!(a.sign_in("ann", "wrong", 100).is_none());
        assert!(a.sign_in("bob", "pw one", 100).is_none());
        let s = a.sign_in("ann", "pw one", 100).unwrap();
        assert_eq!(
            (s.user.as_str(), s.role, s.expires),
            ("ann", R::Admin, 3700)
        );
        let cookie = a.set_cookie(&s);
        assert!(cookie.contains("HttpOnly; SameSite=Strict; Max-Age=3600; Secure"));
        let value = cookie.split(';').next().unwrap();
        assert_eq!(
            a.from_cookies(&format!("x=1; {value}"), 200),
            Some(s.clone())
        );
        assert_eq!(a.from_cookies(value, 3700), None, "expired");
        // Altered: the role, then the MAC.
        let forged = value.replace(".admin.", ".viewer.");
        assert_eq!(a.from_cookies(&forged, 200), None);
        let mut bad = value.to_owned();
        bad.pop();
        assert_eq!(a.from_cookies(&bad, 200), None);
        // The role changed in the configuration: the old session is over.
        let changed = Auth {
            key: a.key.clone(),
            ..auth(&format!("ann viewer {hash}"))
        };
        assert_eq!(changed.from_cookies(value, 200), None);
        // CSRF tokens are per session.
        let token = a.csrf_token(&s);
        assert!(a.csrf_ok(&s, &token));
        let other = a.sign_in("ann", "pw one", 100).unwrap();
        assert!(!a.csrf_ok(&other, &token));
        assert!(!a.csrf_ok(&s, ""));
    }

    #[test]
    fn basic_auth_headers_are_checked() {
        let a = auth(&format!("ann viewer {}", hash_password("p:w").unwrap()));
        let header = format!("Basic {}", STANDARD.encode("ann:p:w"));
        assert_eq!(a.basic(&header, 0).unwrap().role, R::Viewer);
        assert!(
            a.basic(&format!("Basic {}", STANDARD.encode("ann:p")), 0)
                .is_none()
        );
        assert!(a.basic("Bearer x", 0).is_none());
    }

    #[test]
    fn bad_users_entries_are_named() {
        let hash = hash_password("x").unwrap();
        let e = parse_users::<R>("ann admin").unwrap_err();
        assert!(
            e.contains("entry 1") && e.contains("`name role hash`"),
            "{e}"
        );
        let e = parse_users::<R>(&format!("# staff\nann boss {hash}")).unwrap_err();
        assert!(
            e.contains("entry 2 (ann)") && e.contains("viewer, admin"),
            "{e}"
        );
        let e = parse_users::<R>("ann admin secret").unwrap_err();
        assert!(e.contains("PHC"), "{e}");
        let e = parse_users::<R>(&format!("ann admin {hash}; ann viewer {hash}")).unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
        assert_eq!(
            parse_users::<R>(&format!("ann admin {hash}\n\n"))
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn session_keys_are_checked() {
        assert!(SessionKey::parse(&"0f".repeat(32)).is_ok());
        assert!(SessionKey::parse(&STANDARD.encode([7u8; 32])).is_ok());
        let e = SessionKey::parse("abcd").unwrap_err();
        assert!(e.contains("at least 32"), "{e}");
    }
}
