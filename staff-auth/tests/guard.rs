//! The guard on a small router: sign-in, roles, CSRF, expiry of the route to the login page.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use axum::routing::get;
use base64::Engine;
use staff_auth::guard::{CsrfToken, check};
use staff_auth::{Auth, Guard, LoginText, Role, Session, SessionKey, hash_password, parse_users};
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

fn rule(method: &Method, _path: &str) -> R {
    if method == Method::GET {
        R::Viewer
    } else {
        R::Operator
    }
}

fn app() -> Router {
    let users = format!(
        "vic viewer {}\nola operator {}",
        hash_password("vic-pw").unwrap(),
        hash_password("ola-pw").unwrap()
    );
    let auth = Auth::new(
        parse_users(&users).unwrap(),
        SessionKey::random(),
        Duration::from_secs(600),
        "sid",
        false,
    );
    let guard = Guard::new(auth, rule, &["/livez"], LoginText::english("Test"));
    Router::new()
        .route(
            "/page",
            get(
                |axum::Extension(s): axum::Extension<Session<R>>,
                 axum::Extension(t): axum::Extension<CsrfToken>| async move {
                    format!("{} {}", s.user, t.0)
                },
            )
            .post(
                |axum::Extension(s): axum::Extension<Session<R>>| async move {
                    format!("done by {}", s.user)
                },
            ),
        )
        .route("/livez", get(|| async { "ok" }))
        .layer(axum::middleware::from_fn_with_state(
            guard.clone(),
            check::<R>,
        ))
        .merge(guard.routes())
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

async fn sign_in(app: &Router, user: &str, password: &str) -> (StatusCode, Option<String>) {
    let (status, headers, _) = send(
        app,
        Request::post("/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!(
                "user={user}&password={password}&next=%2Fpage"
            )))
            .unwrap(),
    )
    .await;
    let cookie = headers
        .get(header::SET_COOKIE)
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned());
    (status, cookie)
}

#[tokio::test]
async fn sign_in_roles_and_csrf_are_enforced() {
    let app = app();
    // Public and unauthenticated.
    assert_eq!(
        send(&app, Request::get("/livez").body(Body::empty()).unwrap())
            .await
            .0,
        StatusCode::OK
    );
    let (status, headers, _) = send(
        &app,
        Request::get("/page?x=1")
            .header(header::ACCEPT, "text/html")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers[header::LOCATION], "/login?next=%2Fpage%3Fx%3D1");
    assert_eq!(
        send(&app, Request::get("/page").body(Body::empty()).unwrap())
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    let (status, _, body) = send(
        &app,
        Request::get("/login?next=/page")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("name=\"password\""), "{body}");

    // A wrong password: 401 and no cookie.
    let (status, cookie) = sign_in(&app, "vic", "nope").await;
    assert_eq!((status, cookie), (StatusCode::UNAUTHORIZED, None));

    // A viewer reads but may not act.
    let (status, cookie) = sign_in(&app, "vic", "vic-pw").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let vic = cookie.unwrap();
    let (status, _, body) = send(
        &app,
        Request::get("/page")
            .header(header::COOKIE, &vic)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("vic "), "{body}");
    let vic_token = body.split(' ').nth(1).unwrap().to_owned();
    let (status, _, body) = send(
        &app,
        Request::post("/page")
            .header(header::COOKIE, &vic)
            .header("x-csrf-token", &vic_token)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        body.contains("needs the operator role; vic is viewer"),
        "{body}"
    );

    // An operator acts with the token, not without it nor with another session's.
    let (_, cookie) = sign_in(&app, "ola", "ola-pw").await;
    let ola = cookie.unwrap();
    let (_, _, body) = send(
        &app,
        Request::get("/page")
            .header(header::COOKIE, &ola)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    let ola_token = body.split(' ').nth(1).unwrap().to_owned();
    let form = |token: &str| {
        Request::post("/page")
            .header(header::COOKIE, &ola)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("reason=x&csrf={}", urlencode(token))))
            .unwrap()
    };
    let (status, _, body) = send(&app, form(&ola_token)).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "done by ola"));
    let (status, _, body) = send(&app, form(&vic_token)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("CSRF"), "{body}");
    let (status, _, _) = send(
        &app,
        Request::post("/page")
            .header(header::COOKIE, &ola)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // A script with Basic credentials needs no token.
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("ola:ola-pw")
    );
    let (status, _, body) = send(
        &app,
        Request::post("/page")
            .header(header::AUTHORIZATION, basic)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "done by ola"));

    // Signing out needs the token too, and clears the cookie.
    let (status, headers, _) = send(
        &app,
        Request::post("/logout")
            .header(header::COOKIE, &ola)
            .header("x-csrf-token", &ola_token)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(
        headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
}

fn urlencode(s: &str) -> String {
    serde_urlencoded::to_string([("v", s)]).unwrap()[2..].to_owned()
}
