//! Access tokens signed RS256 are accepted as ES256 ones are (the key type in the configured PEM
//! decides), and a token signed with the algorithm of no configured key is refused.

use billing_tasks::grpc::caller::{Authenticator, Caller, Scope};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tonic::metadata::MetadataMap;
use uuid::Uuid;

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn bearer(token: &str) -> MetadataMap {
    let mut m = MetadataMap::new();
    m.insert("authorization", format!("Bearer {token}").parse().unwrap());
    m
}

#[test]
fn rs256_tokens_are_checked_against_an_rsa_key() {
    let dir = std::env::temp_dir().join(format!("billing-rsa-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    openssl(&dir, &["genrsa", "-out", "private.pem", "2048"]);
    openssl(
        &dir,
        &["rsa", "-in", "private.pem", "-pubout", "-out", "public.pem"],
    );
    let private = std::fs::read(dir.join("private.pem")).unwrap();
    let public = std::fs::read(dir.join("public.pem")).unwrap();
    let auth = Authenticator::new("auth", "billing")
        .with_public_key_pem(&public)
        .unwrap();
    let user = Uuid::new_v4();
    let now = chrono::Utc::now().timestamp();
    let claims = serde_json::json!({"sub": user, "iss": "auth", "aud": "billing", "exp": now + 60});
    let key = EncodingKey::from_rsa_pem(&private).unwrap();
    let token = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key).unwrap();
    assert_eq!(
        auth.authenticate(&bearer(&token), Scope::Write).unwrap(),
        Caller::User(user)
    );
    // The same key, another algorithm than the one the key is configured for.
    let ps = jsonwebtoken::encode(&Header::new(Algorithm::RS384), &claims, &key).unwrap();
    let e = auth.authenticate(&bearer(&ps), Scope::Read).unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    // A token without `exp` is refused.
    let no_exp = serde_json::json!({"sub": user, "iss": "auth", "aud": "billing"});
    let t = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &no_exp, &key).unwrap();
    assert_eq!(
        auth.authenticate(&bearer(&t), Scope::Read)
            .unwrap_err()
            .code(),
        tonic::Code::Unauthenticated
    );
    let _ = std::fs::remove_dir_all(dir);
}
