//! The fake's HTTP layer around [`Gateway::process`], in this order: routes, Basic auth, the
//! per-terminal concurrency cap, the request's fault, then `X-Request-ID` replay with the
//! configured latency spent as processing time while the request id is claimed (so a duplicate
//! arriving meanwhile waits for the first answer rather than racing it).
//!
//! Everything after the cap runs in its own task, like a real server that keeps processing after
//! the caller hangs up: a client timing out never cancels a charge half-way, and the in-flight
//! slot is held until processing really ends. No lock is held across the latency sleep or any
//! other await; the shared state is a few short-lived mutexes and atomics, so thousands of
//! requests can be in their latency sleep at once.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio::sync::watch;

use super::faults::Fault;
use super::gateway::{Gateway, Op, Slot, Terminal};
use super::idempotency::{Claim, StoredResponse};
use super::responses;
use crate::cloudpayments::fields::Fields;

#[derive(Clone)]
struct AppState {
    gw: Arc<Gateway>,
    shutdown: watch::Receiver<bool>,
}

/// The router: every API path of §3 the fake implements (POST only; other methods get 405), and
/// the emulated ACS page at `/acs`.
pub(crate) fn router(gw: Arc<Gateway>, shutdown: watch::Receiver<bool>) -> Router {
    let mut router = Router::new();
    for op in Op::ALL {
        router = router.route(
            op.path(),
            post(
                move |State(state): State<AppState>, headers: HeaderMap, body: Bytes| async move {
                    api(state, op, headers, body).await
                },
            ),
        );
    }
    router
        .route("/acs", post(acs_page))
        .with_state(AppState { gw, shutdown })
}

fn json(status: StatusCode, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

fn status_only(code: u16) -> Response {
    StatusCode::from_u16(code)
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        .into_response()
}

fn too_many(retry_after: Option<Duration>) -> Response {
    let mut response = json(
        StatusCode::TOO_MANY_REQUESTS,
        responses::request_error("Too many requests"),
    );
    if let Some(after) = retry_after
        && let Ok(v) = HeaderValue::from_str(&after.as_secs().max(1).to_string())
    {
        response.headers_mut().insert(RETRY_AFTER, v);
    }
    response
}

fn unauthorized() -> Response {
    let mut response = StatusCode::UNAUTHORIZED.into_response();
    response.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"CloudPayments\""),
    );
    response
}

/// Compares without an early exit, so response time does not reveal how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The terminal whose Public ID and API secret the `Authorization: Basic …` header carries.
fn authenticate(gw: &Gateway, headers: &HeaderMap) -> Option<Arc<Terminal>> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credentials) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(credentials.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    let terminal = gw.terminals.get(user)?;
    constant_time_eq(
        password.as_bytes(),
        terminal.config.api_secret.expose().as_bytes(),
    )
    .then(|| Arc::clone(terminal))
}

async fn api(state: AppState, op: Op, headers: HeaderMap, body: Bytes) -> Response {
    state.gw.count_request(op);
    let Some(terminal) = authenticate(&state.gw, &headers) else {
        return unauthorized();
    };
    let Some(slot) = terminal.try_acquire() else {
        return too_many(state.gw.config.cap_retry_after);
    };
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(str::to_owned);
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let request = Request {
        op,
        terminal,
        request_id,
        content_type,
        body,
        _slot: slot,
    };
    // Detached: processing continues if the caller hangs up (see the module docs).
    match tokio::spawn(serve(state, request)).await {
        Ok(response) => response,
        Err(_) => status_only(500),
    }
}

/// One authenticated request holding an in-flight slot.
struct Request {
    op: Op,
    terminal: Arc<Terminal>,
    request_id: Option<String>,
    content_type: Option<String>,
    body: Bytes,
    _slot: Slot,
}

/// Sleeps unless the fake is shutting down; false if it is.
async fn pause(duration: Duration, shutdown: &watch::Receiver<bool>) -> bool {
    if duration.is_zero() {
        return true;
    }
    let mut shutdown = shutdown.clone();
    tokio::select! {
        () = tokio::time::sleep(duration) => true,
        _ = shutdown.wait_for(|stop| *stop) => false,
    }
}

async fn serve(state: AppState, request: Request) -> Response {
    let gw = &state.gw;
    let latency = gw.config.latency;
    let fault = gw.faults().take(request.op.path(), request.op.is_payment());
    match fault {
        Some(Fault::TimeoutBeforeProcessing) => {
            pause(latency + gw.config.hang, &state.shutdown).await;
            return status_only(504);
        }
        Some(Fault::ServerErrorBeforeProcessing(code)) => {
            pause(latency, &state.shutdown).await;
            return status_only(code);
        }
        Some(Fault::Unauthorized) => return status_only(401),
        Some(Fault::UnparsableBeforeProcessing) => {
            pause(latency, &state.shutdown).await;
            return (StatusCode::OK, "<html><body>upstream error</body></html>").into_response();
        }
        Some(Fault::TooManyRequests { retry_after }) => return too_many(retry_after),
        _ => {}
    }
    let forced = match fault {
        Some(Fault::Decline(code)) => Some(code),
        _ => None,
    };
    let processing = match fault {
        Some(Fault::SlowProcessing(extra)) => latency + extra,
        _ => latency,
    };
    // The latency is the processing time, spent while holding the request id's claim, so a
    // duplicate arriving meanwhile waits for the first one's response instead of racing it.
    let stored = match &request.request_id {
        Some(id) => match gw
            .idempotency
            .claim(&request.terminal.config.public_id, id)
            .await
        {
            Claim::Replay(stored) => {
                if !pause(latency, &state.shutdown).await {
                    return status_only(503);
                }
                stored
            }
            Claim::Process(ticket) => {
                if !pause(processing, &state.shutdown).await {
                    // Dropping the ticket releases the id: nothing was processed.
                    return status_only(503);
                }
                ticket.complete(process(gw, &request, forced).await)
            }
        },
        None => {
            if !pause(processing, &state.shutdown).await {
                return status_only(503);
            }
            Arc::new(process(gw, &request, forced).await)
        }
    };
    match fault {
        Some(Fault::TimeoutAfterProcessing) => {
            // The effect has happened and is stored for replay; the answer comes too late.
            pause(gw.config.hang, &state.shutdown).await;
        }
        Some(Fault::ServerErrorAfterProcessing(code)) => return status_only(code),
        _ => {}
    }
    json(
        StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK),
        stored.body.clone(),
    )
}

async fn process(
    gw: &Gateway,
    request: &Request,
    forced: Option<crate::cloudpayments::ReasonCode>,
) -> StoredResponse {
    let body = match Fields::from_body(request.content_type.as_deref(), &request.body) {
        // Ours: the real text for an unreadable body is undocumented.
        Err(_) => responses::request_error("Invalid request body"),
        Ok(fields) => {
            gw.process(
                request.op,
                &request.terminal,
                &fields,
                request.request_id.as_deref(),
                forced,
            )
            .await
        }
    };
    StoredResponse { status: 200, body }
}

fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The emulated issuer page (3-D Secure step 2): the payer's browser posts `PaReq`, `MD` and
/// `TermUrl`; the page posts `MD` and a `PaRes` back to `TermUrl`, passing or failing by button.
async fn acs_page(headers: HeaderMap, body: Bytes) -> Response {
    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let Ok(fields) = Fields::from_body(content_type, &body) else {
        return status_only(400);
    };
    let (Some(md), Some(term_url)) = (fields.text("MD"), fields.text("TermUrl")) else {
        return (StatusCode::BAD_REQUEST, "MD and TermUrl are required").into_response();
    };
    let md = escape_html(&md);
    let term_url = escape_html(&term_url);
    let ok = super::cards::PA_RES_OK;
    let fail = super::cards::PA_RES_FAIL;
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>3-D Secure (fake)</title></head>\
         <body><h1>3-D Secure (fake issuer)</h1>\
         <form method=\"post\" action=\"{term_url}\"><input type=\"hidden\" name=\"MD\" value=\"{md}\">\
         <button name=\"PaRes\" value=\"{ok}\">Confirm payment</button> \
         <button name=\"PaRes\" value=\"{fail}\">Fail authentication</button></form></body></html>"
    ))
    .into_response()
}
