//! Sign-in through OpenID Connect against a provider that follows the protocol (discovery,
//! authorization-code flow with PKCE, a token endpoint checking the client secret and the code
//! verifier, ES256 ID tokens with the nonce, published keys), served on loopback by the test:
//! the role comes from the `groups` claim; a user it maps to nothing, a replayed code, a state
//! that does not match, a missing pending cookie and a token for another audience are refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use axum::Router;
use axum::body::Body;
use axum::extract::{Form, Query, State};
use axum::http::{Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use staff_auth::guard::{CsrfToken, check};
use staff_auth::{Auth, Guard, LoginText, Oidc, OidcConfig, Role, Session, SessionKey};
use tower::ServiceExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum R {
    Viewer,
    Operator,
}

impl Role for R {
    const ALL: &'static [Self] = &[R::Viewer, R::Operator];
    fn name(self) -> &'static str {
        match self {
            R::Viewer => "viewer",
            R::Operator => "operator",
        }
    }
}

const CLIENT: &str = "monitor";
const SECRET: &str = "s3cret";
const CALLBACK: &str = "http://monitor.test/login/oidc/callback";

/// The provider: its key, the claims of whoever "signs in" next, the codes it handed out.
struct Provider {
    issuer: String,
    pkcs8: Vec<u8>,
    jwk: Value,
    next_user: Mutex<Value>,
    codes: Mutex<HashMap<String, (String, String, Value)>>, // code -> (nonce, challenge, claims)
}

async fn discovery(State(p): State<Arc<Provider>>) -> Response {
    axum::Json(json!({
        "issuer": p.issuer,
        "authorization_endpoint": format!("{}/authorize", p.issuer),
        "token_endpoint": format!("{}/token", p.issuer),
        "jwks_uri": format!("{}/jwks", p.issuer),
        "response_types_supported": ["code"],
        "id_token_signing_alg_values_supported": ["ES256"],
    }))
    .into_response()
}

async fn jwks(State(p): State<Arc<Provider>>) -> Response {
    axum::Json(json!({"keys": [p.jwk]})).into_response()
}

async fn authorize(
    State(p): State<Arc<Provider>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    assert_eq!(q["client_id"], CLIENT);
    assert_eq!(q["redirect_uri"], CALLBACK);
    assert_eq!(q["code_challenge_method"], "S256");
    assert!(q["scope"].split(' ').any(|s| s == "openid"));
    let code = uuid_like();
    p.codes.lock().unwrap().insert(
        code.clone(),
        (
            q["nonce"].clone(),
            q["code_challenge"].clone(),
            p.next_user.lock().unwrap().clone(),
        ),
    );
    let query =
        serde_urlencoded::to_string([("code", code.as_str()), ("state", q["state"].as_str())])
            .unwrap();
    Redirect::to(&format!("{}?{query}", q["redirect_uri"])).into_response()
}

async fn token(State(p): State<Arc<Provider>>, Form(f): Form<HashMap<String, String>>) -> Response {
    let refuse =
        |e: &str| (StatusCode::BAD_REQUEST, axum::Json(json!({"error": e}))).into_response();
    if f.get("client_secret").map(String::as_str) != Some(SECRET) {
        return refuse("invalid_client");
    }
    let Some((nonce, challenge, claims)) = p.codes.lock().unwrap().remove(&f["code"]) else {
        return refuse("invalid_grant");
    };
    if B64.encode(Sha256::digest(f["code_verifier"].as_bytes())) != challenge {
        return refuse("invalid_grant");
    }
    let now = chrono::Utc::now().timestamp();
    let mut body =
        json!({"iss": p.issuer, "aud": CLIENT, "iat": now, "exp": now + 300, "nonce": nonce});
    for (k, v) in claims.as_object().unwrap() {
        body[k] = v.clone();
    }
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("k1".into());
    let id_token = jsonwebtoken::encode(
        &header,
        &body,
        &jsonwebtoken::EncodingKey::from_ec_der(&p.pkcs8),
    )
    .unwrap();
    axum::Json(json!({"id_token": id_token, "access_token": "at", "token_type": "Bearer"}))
        .into_response()
}

fn uuid_like() -> String {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    B64.encode(b)
}

async fn provider() -> Arc<Provider> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}", listener.local_addr().unwrap());
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let point = pair.public_key().as_ref().to_vec();
    let jwk = json!({"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
                     "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65])});
    let p = Arc::new(Provider {
        issuer,
        pkcs8: pkcs8.as_ref().to_vec(),
        jwk,
        next_user: Mutex::new(json!({})),
        codes: Mutex::default(),
    });
    let app = Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/jwks", get(jwks))
        .route("/authorize", get(authorize))
        .route("/token", post(token))
        .with_state(p.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    p
}

fn rule(method: &Method, _path: &str) -> R {
    if method == Method::GET {
        R::Viewer
    } else {
        R::Operator
    }
}

fn app(p: &Provider) -> Router {
    let auth = Auth::new(
        Vec::new(),
        SessionKey::random(),
        Duration::from_secs(600),
        "sid",
        false,
    );
    let oidc = Oidc::new(OidcConfig {
        issuer: p.issuer.clone(),
        client_id: CLIENT.into(),
        client_secret: SECRET.into(),
        redirect_url: CALLBACK.into(),
        role_claim: "groups".into(),
        roles: staff_auth::oidc::parse_role_map("ops=operator,staff=viewer").unwrap(),
        name: "Test IdP".into(),
    });
    let guard = Guard::with_oidc(auth, rule, &[], LoginText::english("Test"), Some(oidc));
    Router::new()
        .route(
            "/page",
            get(
                |axum::Extension(s): axum::Extension<Session<R>>,
                 axum::Extension(t): axum::Extension<CsrfToken>| async move {
                    format!("{} {} {}", s.user, s.role.name(), t.0)
                },
            )
            .post(
                |axum::Extension(s): axum::Extension<Session<R>>| async move {
                    format!("done by {}", s.user)
                },
            ),
        )
        .merge(guard.routes())
        .layer(axum::middleware::from_fn_with_state(
            guard.clone(),
            check::<R>,
        ))
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn cookies(headers: &axum::http::HeaderMap) -> HashMap<String, String> {
    headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| {
            let first = v.to_str().unwrap().split(';').next().unwrap();
            let (k, v) = first.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// The browser's part up to the callback: (callback path and query, pending cookie).
async fn to_callback(app: &Router, p: &Provider, claims: Value) -> (String, String) {
    *p.next_user.lock().unwrap() = claims;
    let (status, headers, _) = send(
        app,
        Request::get("/login/oidc?next=%2Fpage")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let pending = cookies(&headers)["sid_oidc"].clone();
    let authorize = headers[header::LOCATION].to_str().unwrap().to_owned();
    assert!(
        authorize.starts_with(&format!("{}/authorize?", p.issuer)),
        "{authorize}"
    );
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let back = http.get(&authorize).send().await.unwrap();
    let callback = back.headers()[header::LOCATION]
        .to_str()
        .unwrap()
        .to_owned();
    (
        callback
            .strip_prefix("http://monitor.test")
            .unwrap()
            .to_owned(),
        pending,
    )
}

async fn callback(
    app: &Router,
    path: &str,
    pending: Option<&str>,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let mut req = Request::get(path);
    if let Some(p) = pending {
        req = req.header(header::COOKIE, format!("sid_oidc={p}"));
    }
    send(app, req.body(Body::empty()).unwrap()).await
}

#[tokio::test]
async fn users_sign_in_through_the_provider_with_the_role_their_groups_give() {
    let p = provider().await;
    let app = app(&p);

    // The sign-in page offers the provider (and no password form: no configured users).
    let (_, _, page) = send(
        &app,
        Request::get("/login?next=/page")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(
        page.contains("Sign in with Test IdP") && page.contains("/login/oidc?next="),
        "{page}"
    );
    assert!(!page.contains("name=\"password\""));

    // An operator by their groups.
    let (path, pending) = to_callback(
        &app,
        &p,
        json!({"sub": "u1", "email": "ada@example.com", "groups": ["ops", "x"]}),
    )
    .await;
    let (status, headers, body) = callback(&app, &path, Some(&pending)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("url=/page"), "{body}");
    let session = format!("sid={}", cookies(&headers)["sid"]);
    assert_eq!(
        cookies(&headers)["sid_oidc"],
        "",
        "the pending cookie is cleared"
    );
    let (status, _, body) = send(
        &app,
        Request::get("/page")
            .header(header::COOKIE, &session)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("ada@example.com operator "), "{body}");
    let token = body.rsplit(' ').next().unwrap().to_owned();
    let (status, _, body) = send(
        &app,
        Request::post("/page")
            .header(header::COOKIE, &session)
            .header("x-csrf-token", &token)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "done by ada@example.com")
    );

    // The same code again: the provider refuses it.
    let (status, _, body) = callback(&app, &path, Some(&pending)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("refused"), "{body}");

    // A viewer reads and may not act.
    let (path, pending) = to_callback(
        &app,
        &p,
        json!({"sub": "u2", "preferred_username": "bob", "groups": "staff"}),
    )
    .await;
    let (status, headers, _) = callback(&app, &path, Some(&pending)).await;
    assert_eq!(status, StatusCode::OK);
    let session = format!("sid={}", cookies(&headers)["sid"]);
    let (_, _, body) = send(
        &app,
        Request::get("/page")
            .header(header::COOKIE, &session)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(body.starts_with("bob viewer "), "{body}");
    let token = body.rsplit(' ').next().unwrap().to_owned();
    let (status, _, _) = send(
        &app,
        Request::post("/page")
            .header(header::COOKIE, &session)
            .header("x-csrf-token", &token)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Refused: no mapped group; a state that is not this sign-in's; no pending cookie; a token
    // for another client.
    let (path, pending) = to_callback(
        &app,
        &p,
        json!({"sub": "u3", "email": "eve@example.com", "groups": ["sales"]}),
    )
    .await;
    let (status, _, body) = callback(&app, &path, Some(&pending)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("eve@example.com holds no role"), "{body}");
    let (path, pending) = to_callback(
        &app,
        &p,
        json!({"sub": "u1", "email": "ada@example.com", "groups": ["ops"]}),
    )
    .await;
    let forged = format!("{}x", path);
    assert_eq!(
        callback(&app, &forged, Some(&pending)).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(callback(&app, &path, None).await.0, StatusCode::BAD_REQUEST);
    let (path, pending) = to_callback(
        &app,
        &p,
        json!({"sub": "u1", "email": "ada@example.com", "groups": ["ops"], "aud": "someone-else"}),
    )
    .await;
    let (status, _, body) = callback(&app, &path, Some(&pending)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("does not check out"), "{body}");
}
