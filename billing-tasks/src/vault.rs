//! Encryption at rest for the card secrets the ledger holds for a few minutes: a cryptogram until
//! its charge, a 3-D Secure answer (`PaRes`) until it is posted.
//!
//! Wiping a column (`SET cryptogram = NULL`) does not wipe old row versions, the WAL, replicas or
//! backups, so the ledger never holds these in clear: they are sealed with AES-256-GCM under a key
//! only billing processes hold, bound (as associated data) to their payment and column so a sealed
//! value cannot be moved to another row. A dump of the database holds no usable cryptogram.
//!
//! Keys come from `BILLING_VAULT_KEYS`: `id:base64-of-32-bytes`, comma-separated; the first seals,
//! every one opens, so a key is rotated by putting a new one first and dropping the old one once
//! nothing it sealed can still be waiting (cryptograms are discarded after `created_timeout`,
//! challenges after `three_ds_timeout`). Without it, one key is derived from the gateway API
//! secret, which every billing process holds and the database never sees.
//!
//! Sealed form: `v1.<key id>.<base64(nonce ‖ ciphertext ‖ tag)>`.

use std::sync::OnceLock;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

use crate::error::{BillingError, Result};
use crate::secret::Secret;

const PREFIX: &str = "v1";
/// The id of the key derived from the API secret.
const DERIVED_ID: &str = "api";

/// Which secret of a payment a sealed value holds (part of the associated data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `payment.cryptogram`.
    Cryptogram,
    /// `payment.pa_res`.
    PaRes,
}

impl Field {
    fn as_str(self) -> &'static str {
        match self {
            Field::Cryptogram => "cryptogram",
            Field::PaRes => "pa_res",
        }
    }
}

struct Key {
    id: String,
    key: LessSafeKey,
}

/// The sealing keys: the first seals, all open.
pub struct Vault {
    keys: Vec<Key>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        f.debug_struct("Vault").field("key_ids", &ids).finish()
    }
}

fn aead_key(bytes: &[u8]) -> Result<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, bytes)
        .map(LessSafeKey::new)
        .map_err(|_| BillingError::invalid("a vault key must be 32 bytes"))
}

fn aad(payment_id: Uuid, field: Field) -> Vec<u8> {
    format!("payment:{payment_id}:{}", field.as_str()).into_bytes()
}

impl Vault {
    /// Parses `BILLING_VAULT_KEYS` (`id:base64key,id:base64key`, the first sealing).
    pub fn from_spec(spec: &Secret<String>) -> Result<Vault> {
        let bad = |why: &str| {
            BillingError::invalid(format!(
                "BILLING_VAULT_KEYS: {why} (expected id:base64-of-32-bytes, comma-separated)"
            ))
        };
        let mut keys = Vec::new();
        for part in spec
            .expose()
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let (id, b64) = part.split_once(':').ok_or_else(|| bad("a key has no id"))?;
            if id.is_empty()
                || id.len() > 32
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(bad("a key id must be 1 to 32 of A-Z a-z 0-9 - _"));
            }
            if keys.iter().any(|k: &Key| k.id == id) {
                return Err(bad("a key id is given twice"));
            }
            let bytes = B64
                .decode(b64.trim())
                .map_err(|_| bad("a key is not base64"))?;
            if bytes.len() != 32 {
                return Err(bad("a key is not 32 bytes"));
            }
            keys.push(Key {
                id: id.to_owned(),
                key: aead_key(&bytes)?,
            });
        }
        if keys.is_empty() {
            return Err(bad("no key"));
        }
        Ok(Vault { keys })
    }

    /// The one key derived from the gateway API secret (HMAC-SHA256 with a fixed label).
    pub fn derived_from(api_secret: &Secret<String>) -> Vault {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(api_secret.expose().as_bytes())
            .expect("HMAC takes a key of any length");
        mac.update(b"billing-tasks vault key v1");
        let bytes = mac.finalize().into_bytes();
        Vault {
            keys: vec![Key {
                id: DERIVED_ID.to_owned(),
                key: aead_key(&bytes).expect("HMAC-SHA256 gives 32 bytes"),
            }],
        }
    }

    /// A fresh random key in the `BILLING_VAULT_KEYS` form, under `id`.
    pub fn generate_key(id: &str) -> Secret<String> {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .expect("the system random source works");
        Secret::new(format!("{id}:{}", B64.encode(bytes)))
    }

    /// Seals a secret of a payment.
    pub fn seal(&self, payment_id: Uuid, field: Field, plaintext: &str) -> Result<String> {
        let key = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| BillingError::Internal("no randomness for a nonce".into()))?;
        let mut data = plaintext.as_bytes().to_vec();
        key.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(payment_id, field)),
                &mut data,
            )
            .map_err(|_| BillingError::Internal("sealing failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(format!("{PREFIX}.{}.{}", key.id, B64.encode(out)))
    }

    /// Opens a sealed secret of a payment; an error for anything not sealed by one of these keys
    /// for this payment and field.
    pub fn open(&self, payment_id: Uuid, field: Field, sealed: &str) -> Result<Secret<String>> {
        let refuse = |why: &str| {
            BillingError::Internal(format!(
                "the stored {} of payment {payment_id} cannot be opened: {why}",
                field.as_str()
            ))
        };
        let mut parts = sealed.splitn(3, '.');
        let (Some(PREFIX), Some(id), Some(body)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(refuse("not sealed"));
        };
        let key = self
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or_else(|| refuse("sealed with a key this process does not hold"))?;
        let bytes = B64.decode(body).map_err(|_| refuse("not base64"))?;
        if bytes.len() < NONCE_LEN {
            return Err(refuse("too short"));
        }
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| refuse("bad nonce"))?;
        let mut data = rest.to_vec();
        let plain = key
            .key
            .open_in_place(nonce, Aad::from(aad(payment_id, field)), &mut data)
            .map_err(|_| refuse("authentication failed"))?;
        String::from_utf8(plain.to_vec())
            .map(Secret::new)
            .map_err(|_| refuse("not text"))
    }
}

static CONFIGURED: OnceLock<Vault> = OnceLock::new();

/// Installs the keys from configuration for this process (once, at start-up).
pub fn configure(vault: Vault) -> Result<()> {
    CONFIGURED
        .set(vault)
        .map_err(|_| BillingError::Internal("the vault keys are already configured".into()))
}

/// Runs `f` with the keys configured for this process, or the one derived from `api_secret`.
pub(crate) fn with_current<R>(api_secret: &Secret<String>, f: impl FnOnce(&Vault) -> R) -> R {
    match CONFIGURED.get() {
        Some(v) => f(v),
        None => f(&Vault::derived_from(api_secret)),
    }
}

/// Seals a payment's secret with this process's keys.
pub(crate) fn seal(
    billing: &crate::Billing,
    payment_id: Uuid,
    field: Field,
    plaintext: &str,
) -> Result<String> {
    with_current(billing.gateway().api_secret(), |v| {
        v.seal(payment_id, field, plaintext)
    })
}

/// Opens a payment's sealed secret with this process's keys.
pub(crate) fn open(
    billing: &crate::Billing,
    payment_id: Uuid,
    field: Field,
    sealed: &str,
) -> Result<Secret<String>> {
    with_current(billing.gateway().api_secret(), |v| {
        v.open(payment_id, field, sealed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_for_their_payment_field_and_keys() {
        let old = Vault::from_spec(&Vault::generate_key("k1")).unwrap();
        let id = Uuid::new_v4();
        let sealed = old.seal(id, Field::Cryptogram, "the cryptogram").unwrap();
        assert!(sealed.starts_with("v1.k1."), "{sealed}");
        assert!(!sealed.contains("cryptogram"));
        assert_eq!(
            old.open(id, Field::Cryptogram, &sealed).unwrap().expose(),
            "the cryptogram"
        );
        assert!(
            old.open(Uuid::new_v4(), Field::Cryptogram, &sealed)
                .is_err()
        );
        assert!(old.open(id, Field::PaRes, &sealed).is_err());
        assert!(old.open(id, Field::Cryptogram, "the cryptogram").is_err());
        let mut tampered = sealed.clone();
        tampered.pop();
        tampered.push(if sealed.ends_with('A') { 'B' } else { 'A' });
        assert!(old.open(id, Field::Cryptogram, &tampered).is_err());

        // Rotation: a new key first seals; the old one still opens what it sealed.
        let old_spec = Vault::generate_key("k1");
        let new_spec = Vault::generate_key("k2");
        let before = Vault::from_spec(&old_spec).unwrap();
        let sealed = before.seal(id, Field::PaRes, "pa-res").unwrap();
        let both = Secret::new(format!("{},{}", new_spec.expose(), old_spec.expose()));
        let rotated = Vault::from_spec(&both).unwrap();
        assert_eq!(
            rotated.open(id, Field::PaRes, &sealed).unwrap().expose(),
            "pa-res"
        );
        assert!(
            rotated
                .seal(id, Field::PaRes, "x")
                .unwrap()
                .starts_with("v1.k2.")
        );
        let only_new = Vault::from_spec(&new_spec).unwrap();
        assert!(only_new.open(id, Field::PaRes, &sealed).is_err());
    }

    #[test]
    fn bad_key_specs_are_refused() {
        for spec in ["", "nokey", "a:!!!", "a:AAAA", "a b:AAAA", ","] {
            assert!(
                Vault::from_spec(&Secret::new(spec.to_owned())).is_err(),
                "{spec}"
            );
        }
        let k = Vault::generate_key("dup");
        let twice = Secret::new(format!("{},{}", k.expose(), k.expose()));
        assert!(Vault::from_spec(&twice).is_err());
        assert!(format!("{:?}", Vault::from_spec(&k).unwrap()).contains("dup"));
    }
}
