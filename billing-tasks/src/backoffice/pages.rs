//! The back-office's routes (all under `/admin`) and pages (askama templates in
//! `templates/admin/`).

use std::borrow::Borrow;
use std::collections::HashMap;

use askama::Template;
use axum::body::Body;
use axum::extract::{Extension, Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use staff_auth::guard::CsrfToken;
use staff_auth::{Role, Session};
use uuid::Uuid;

use super::actions::{Done, Refused, Staff, Why};
use super::data::{self, PAGE};
use super::format;
use super::text::Lang;
use super::{BASE, Backoffice, StaffRole};

/// The routes, behind the guard.
pub fn router(bo: Backoffice) -> Router {
    let guard = bo.guard.clone();
    let r = |p: &str| format!("{BASE}{p}");
    Router::new()
        .route(&r(""), get(home))
        .route(&r("/"), get(home))
        .route(&r("/lang"), get(lang))
        .route(&r("/search"), get(search))
        .route(&r("/payers/{id}"), get(payer))
        .route(&r("/payments"), get(payments))
        .route(&r("/payments.csv"), get(export::<data::PaymentFilter>))
        .route(&r("/invoices"), get(invoices))
        .route(&r("/invoices.csv"), get(export::<data::InvoiceFilter>))
        .route(&r("/refunds"), get(refunds))
        .route(&r("/refunds.csv"), get(export::<data::RefundFilter>))
        .route(&r("/subscriptions"), get(subscriptions))
        .route(
            &r("/subscriptions.csv"),
            get(export::<data::SubscriptionFilter>),
        )
        .route(&r("/attention/{queue}"), get(attention))
        .route(&r("/approvals"), get(approvals))
        .route(&r("/notifications"), get(notifications))
        .route(&r("/reports"), get(reports))
        .route(&r("/reports.csv"), get(reports_csv))
        .route(&r("/audit"), get(audit))
        .route(&r("/audit.csv"), get(audit_csv))
        .route(&r("/staff"), get(staff).post(staff_add))
        .route(&r("/staff/{name}/{change}"), post(staff_change))
        .route(&r("/payments/{id}/refund"), post(refund))
        .route(&r("/approvals/{id}/approve"), post(approve))
        .route(&r("/approvals/{id}/reject"), post(reject))
        .route(&r("/subscriptions/{id}/cancel"), post(cancel))
        .route(&r("/subscriptions/{id}/extend"), post(extend))
        .route(&r("/subscriptions/{id}/resend-role"), post(resend_role))
        .route(&r("/invoices/{id}/retry"), post(retry))
        .route(&r("/findings/{id}/resolve"), post(resolve_finding))
        .route(
            &r("/notifications/{id}/resolve"),
            post(resolve_notification),
        )
        .route(&r("/outbox/{id}/redeliver"), post(redeliver))
        .with_state(bo)
        .merge(guard.routes())
        .layer(middleware::from_fn_with_state(
            guard,
            staff_auth::guard::check::<StaffRole>,
        ))
}

/// What every page's frame needs.
#[derive(Debug, Clone)]
pub struct Base {
    pub t: Lang,
    pub user: String,
    pub role: &'static str,
    pub csrf: String,
    pub nav: &'static str,
    /// This page's path and query, for the language switch.
    pub here: String,
}

impl Base {
    /// A fresh one-time key for a form.
    pub fn key(&self) -> String {
        Uuid::new_v4().to_string()
    }

    /// The switch to the other language.
    pub fn switch(&self) -> String {
        format!(
            "{BASE}/lang?{}",
            serde_urlencoded::to_string([("to", self.t.other().code()), ("back", &self.here)])
                .unwrap_or_default()
        )
    }

    /// The reasons of the action forms, with their words.
    pub fn reasons(&self) -> Vec<(&'static str, &'static str)> {
        super::actions::REASONS
            .iter()
            .map(|r| (*r, self.t.get(&format!("reason_{r}"))))
            .collect()
    }

    /// Money.
    pub fn money(&self, minor: impl Borrow<i64>, currency: impl AsRef<str>) -> String {
        format::money(*minor.borrow(), currency.as_ref(), self.t)
    }

    /// An amount in roubles as a form field holds it (`299,00` in Russian).
    pub fn plain(&self, minor: impl Borrow<i64>) -> String {
        format::amount(*minor.borrow(), self.t)
    }

    /// A time: Moscow, with UTC on hover.
    pub fn at(&self, t: impl Borrow<DateTime<Utc>>) -> String {
        let t = *t.borrow();
        format!(
            "<time datetime=\"{}\" title=\"{}\">{}</time>",
            t.to_rfc3339(),
            format::utc(t),
            format::msk(t)
        )
    }

    /// An optional time.
    pub fn at_opt(&self, t: impl Borrow<Option<DateTime<Utc>>>) -> String {
        t.borrow().map(|t| self.at(t)).unwrap_or_default()
    }

    /// A short id, the whole on hover.
    pub fn short(&self, id: impl Borrow<Uuid>) -> String {
        data::short(*id.borrow())
    }
}

fn lang_of(headers: &HeaderMap, q: &HashMap<String, String>) -> Lang {
    if let Some(l) = q.get("lang").and_then(|l| Lang::parse(l)) {
        return l;
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("bo_lang=").and_then(Lang::parse))
        .unwrap_or_default()
}

/// The request's signed-in member of staff, language and frame.
struct Ctx {
    base: Base,
    staff: Staff,
}

fn ctx(
    session: &Session<StaffRole>,
    csrf: &CsrfToken,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
    nav: &'static str,
    here: String,
) -> Ctx {
    Ctx {
        base: Base {
            t: lang_of(headers, q),
            user: session.user.clone(),
            role: session.role.name(),
            csrf: csrf.0.clone(),
            nav,
            here,
        },
        staff: Staff {
            user: session.user.clone(),
            role: session.role,
        },
    }
}

fn render(t: &impl Template) -> Response {
    render_status(StatusCode::OK, t)
}

fn render_status(status: StatusCode, t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "a back-office page did not render");
            (StatusCode::INTERNAL_SERVER_ERROR, "the page did not render").into_response()
        }
    }
}

fn failed(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "a back-office page failed");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "the ledger is not answering; try again shortly",
    )
        .into_response()
}

macro_rules! page_ctx {
    ($session:ident, $csrf:ident, $headers:ident, $q:ident, $nav:expr, $here:expr) => {
        ctx(&$session, &$csrf, &$headers, &$q, $nav, $here)
    };
}

type Q = Query<HashMap<String, String>>;
type S = Extension<Session<StaffRole>>;
type C = Extension<CsrfToken>;

fn here(path: &str, q: &HashMap<String, String>) -> String {
    let mut pairs: Vec<(&String, &String)> = q.iter().filter(|(k, _)| *k != "lang").collect();
    pairs.sort();
    let query = serde_urlencoded::to_string(&pairs).unwrap_or_default();
    if query.is_empty() {
        format!("{BASE}{path}")
    } else {
        format!("{BASE}{path}?{query}")
    }
}

#[derive(Template)]
#[template(path = "admin/home.html")]
struct HomePage {
    b: Base,
    counts: data::Counts,
    approval_above: i64,
}

async fn home(
    State(bo): State<Backoffice>,
    Extension(s): S,
    Extension(c): C,
    headers: HeaderMap,
    Query(q): Q,
) -> Response {
    let cx = page_ctx!(s, c, headers, q, "home", here("", &q));
    let stuck_before = bo.billing.now() - data::stuck_after(&bo.billing);
    match data::counts(bo.billing.db(), stuck_before).await {
        Ok(counts) => render(&HomePage {
            b: cx.base,
            counts,
            approval_above: bo.approval_above,
        }),
        Err(e) => failed(e),
    }
}

async fn lang(Query(q): Q) -> Response {
    let to = q.get("to").and_then(|l| Lang::parse(l)).unwrap_or_default();
    let back = q
        .get("back")
        .filter(|b| b.starts_with(BASE) && !b.starts_with("//"))
        .cloned()
        .unwrap_or_else(|| BASE.to_owned());
    let mut r = Redirect::to(&back).into_response();
    if let Ok(v) = format!(
        "bo_lang={}; Path={BASE}; SameSite=Strict; Max-Age=31536000",
        to.code()
    )
    .parse()
    {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

#[derive(Template)]
#[template(path = "admin/search.html")]
struct SearchPage {
    b: Base,
    q: String,
    found: data::Found,
}

async fn search(
    State(bo): State<Backoffice>,
    Extension(s): S,
    Extension(c): C,
    headers: HeaderMap,
    Query(q): Q,
) -> Response {
    let cx = page_ctx!(s, c, headers, q, "search", here("/search", &q));
    let text = q.get("q").cloned().unwrap_or_default();
    let text: String = text.chars().take(200).collect();
    let found = if text.trim().is_empty() {
        data::Found::default()
    } else {
        match data::search(bo.billing.db(), &text).await {
            Ok(f) => f,
            Err(e) => return failed(e),
        }
    };
    // One payer found: straight to their page.
    if found.payers.len() == 1 && found.unknown.is_empty() && found.payments.len() <= 1 {
        return Redirect::to(&format!("{BASE}/payers/{}", found.payers[0].id)).into_response();
    }
    render(&SearchPage {
        b: cx.base,
        q: text,
        found,
    })
}

#[derive(Template)]
#[template(path = "admin/payer.html")]
struct PayerPage {
    b: Base,
    p: data::PayerPage,
    monitor: Option<String>,
    approval_above: i64,
}

impl PayerPage {
    fn refundable(&self, pay: &data::PaymentRow) -> i64 {
        let held: i64 = self
            .p
            .approvals
            .iter()
            .filter(|a| a.payment_id == pay.id && a.status == "pending")
            .map(|a| a.amount_minor)
            .sum();
        if pay.status == "succeeded" {
            (pay.amount_minor - pay.refunded_minor - held).max(0)
        } else {
            0
        }
    }

    fn monitor_link(&self, id: impl Borrow<Uuid>) -> Option<String> {
        let id = id.borrow();
        self.monitor.as_ref().map(|m| {
            format!(
                "{m}/tasks?{}",
                serde_urlencoded::to_string([("search", id.to_string())]).unwrap_or_default()
            )
        })
    }
}

async fn payer(
    State(bo): State<Backoffice>,
    Extension(s): S,
    Extension(c): C,
    headers: HeaderMap,
    Query(q): Q,
    Path(id): Path<String>,
) -> Response {
    let cx = page_ctx!(
        s,
        c,
        headers,
        q,
        "search",
        here(&format!("/payers/{id}"), &q)
    );
    let Ok(id) = Uuid::parse_str(&id) else {
        return not_found(cx.base.t);
    };
    match data::payer_page(bo.billing.db(), id).await {
        Ok(Some(p)) => render(&PayerPage {
            b: cx.base,
            p,
            monitor: bo.monitor_url.clone(),
            approval_above: bo.approval_above,
        }),
        Ok(None) => not_found(cx.base.t),
        Err(e) => failed(e),
    }
}

fn not_found(t: Lang) -> Response {
    (
        StatusCode::NOT_FOUND,
        match t {
            Lang::Ru => "Не найдено.",
            Lang::En => "Not found.",
        },
    )
        .into_response()
}

// ---- Lists ----

fn opt(q: &HashMap<String, String>, k: &str) -> Option<String> {
    q.get(k)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

fn after(q: &HashMap<String, String>) -> Option<(DateTime<Utc>, Uuid)> {
    let (t, id) = opt(q, "after")?
        .split_once('_')
        .map(|(a, b)| (a.to_owned(), b.to_owned()))?;
    Some((
        DateTime::parse_from_rfc3339(&t).ok()?.with_timezone(&Utc),
        Uuid::parse_str(&id).ok()?,
    ))
}

fn cursor(t: &DateTime<Utc>, id: &Uuid) -> String {
    format!(
        "{}_{id}",
        t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    )
}

/// A filter field that does not parse: the message says which.
fn bad_filter(t: Lang, field: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        match t {
            Lang::Ru => format!("Поле фильтра «{field}» заполнено неверно."),
            Lang::En => format!("The filter's {field} is not valid."),
        },
    )
        .into_response()
}

fn payment_filter(q: &HashMap<String, String>) -> Result<data::PaymentFilter, &'static str> {
    let amount = |k: &'static str| -> Result<Option<i64>, &'static str> {
        opt(q, k)
            .map(|v| format::parse_roubles(&v).map_err(|_| k))
            .transpose()
    };
    let day = |k: &'static str| -> Result<Option<NaiveDate>, &'static str> {
        opt(q, k).map(|v| data::parse_day(&v).ok_or(k)).transpose()
    };
    Ok(data::PaymentFilter {
        status: opt(q, "status"),
        amount_min: amount("amount_min")?,
        amount_max: amount("amount_max")?,
        from: day("from")?,
        to: day("to")?,
        reason_code: opt(q, "reason_code")
            .map(|v| v.parse().map_err(|_| "reason_code"))
            .transpose()?,
        tariff: opt(q, "tariff"),
        payer: opt(q, "payer")
            .map(|v| Uuid::parse_str(&v).map_err(|_| "payer"))
            .transpose()?,
        after: after(q),
        ..data::PaymentFilter::default()
    })
}

/// The query string of a list without its page cursor (for the next page and the export).
fn filter_query(q: &HashMap<String, String>) -> String {
    let mut pairs: Vec<(&String, &String)> = q
        .iter()
        .filter(|(k, v)| *k != "after" && *k != "lang" && !v.trim().is_empty())
        .collect();
    pairs.sort();
    serde_urlencoded::to_string(&pairs).unwrap_or_default()
}

#[derive(Template)]
#[template(path = "admin/payments.html")]
struct PaymentsPage {
    b: Base,
    q: HashMap<String, String>,
    rows: Vec<data::PaymentRow>,
    next: Option<String>,
    filter: String,
}

impl PaymentsPage {
    fn v(&self, k: &str) -> String {
        self.q.get(k).cloned().unwrap_or_default()
    }
}

const PAYMENT_STATUSES: &[&str] = &[
    "succeeded",
    "declined",
    "processing",
    "awaiting_3ds",
    "created",
    "expired",
    "failed",
];

async fn payments(
    State(bo): State<Backoffice>,
    Extension(s): S,
    Extension(c): C,
    headers: HeaderMap,
    Query(q): Q,
) -> Response {
    let cx = page_ctx!(s, c, headers, q, "payments", here("/payments", &q));
    let (rows, next) = match list_page::<data::PaymentFilter>(&bo, cx.base.t, &q).await {
        Ok(page) => page,
        Err(answer) => return answer,
    };
    render(&PaymentsPage {
        filter: filter_query(&q),
        b: cx.base,
        q,
        rows,
        next,
    })
}

fn next_cursor<T>(rows: &mut Vec<T>, key: impl Fn(&T) -> String) -> Option<String> {
    if rows.len() as i64 > PAGE {
        rows.truncate(PAGE as usize);
        rows.last().map(key)
    } else {
        None
    }
}

/// One page of a list for its HTML page: the rows its filter matches and the next page's
/// cursor, or the answer to a filter that does not parse or a query that failed.
async fn list_page<E: Export>(
    bo: &Backoffice,
    t: Lang,
    q: &HashMap<String, String>,
) -> Result<(Vec<E::Row>, Option<String>), Response> {
    let f = E::parse(q).map_err(|field| bad_filter(t, field))?;
    let mut rows = E::fetch(bo.billing.db().clone(), f, PAGE + 1)
        .await
        .map_err(failed)?;
    let next = next_cursor(&mut rows, |r| {
        let (at, id) = E::key(r);
        cursor(&at, &id)
    });
    Ok((rows, next))
}

fn csv_response(name: &str, body: Body) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        body,
    )
        .into_response()
}

/// A list whose every matching row can be exported: its filter (from the query string, with the
/// keyset cursor), the rows, one CSV line per row.
trait Export: Clone + Send + Sync + 'static {
    type Row: Send + 'static;
    /// The file name and its header line.
    const FILE: &'static str;
    const HEADER: &'static str;
    fn parse(q: &HashMap<String, String>) -> Result<Self, &'static str>;
    fn after(&mut self, after: (DateTime<Utc>, Uuid));
    fn fetch(
        db: sqlx::PgPool,
        f: Self,
        limit: i64,
    ) -> impl std::future::Future<Output = crate::Result<Vec<Self::Row>>> + Send;
    fn line(r: &Self::Row) -> String;
    fn key(r: &Self::Row) -> (DateTime<Utc>, Uuid);
}

/// `GET /admin/<list>.csv`: every row the list's filter matches, streamed 1000 at a time.
async fn export<E: Export>(
    State(bo): State<Backoffice>,
    headers: HeaderMap,
    Query(q): Q,
) -> Response {
    let f = match E::parse(&q) {
        Ok(f) => f,
        Err(field) => return bad_filter(lang_of(&headers, &q), field),
    };
    let db = bo.billing.db().clone();
    csv_response(
        E::FILE,
        csv_stream(
            E::HEADER,
            move |after| {
                let mut f = f.clone();
                if let Some(a) = after {
                    f.after(a);
                }
                E::fetch(db.clone(), f, CSV_PAGE)
            },
            E::line,
            E::key,
        ),
    )
}

macro_rules! export {
    ($filter:ty, $row:ty, $file:literal, $header:literal, $parse:ident, $fetch:ident, $line:ident) => {
        impl Export for $filter {
            type Row = $row;
            const FILE: &'static str = $file;
            const HEADER: &'static str = $header;
            fn parse(q: &HashMap<String, String>) -> Result<Self, &'static str> {
                $parse(q)
            }
            fn after(&mut self, after: (DateTime<Utc>, Uuid)) {
                self.after = Some(after);
            }
            async fn fetch(db: sqlx::PgPool, f: Self, limit: i64) -> crate::Result<Vec<$row>> {
                data::$fetch(&db, &f, limit).await
            }
            fn line(r: &$row) -> String {
                $line(r)
            }
            fn key(r: &$row) -> (DateTime<Utc>, Uuid) {
                (r.created_at, r.id)
            }
        }
    };
}

export!(
    data::PaymentFilter,
    data::PaymentRow,
    "payments.csv",
    "id,created_msk,created_utc,payer_id,invoice_id,kind,attempt,status,amount_kopecks,amount_roubles,currency,transaction_id,reason_code,tariff,card_mask,card_exp,refunded_kopecks\r\n",
    payment_filter,
    payments,
    payment_line
);
export!(
    data::InvoiceFilter,
    data::InvoiceRow,
    "invoices.csv",
    "id,created_msk,created_utc,payer_id,subscription_id,kind,status,amount_kopecks,amount_roubles,currency,period_start_utc,period_end_utc,attempts\r\n",
    invoice_filter,
    invoices,
    invoice_line
);
export!(
    data::RefundFilter,
    data::RefundRow,
    "refunds.csv",
    "id,created_msk,created_utc,payer_id,payment_id,status,amount_kopecks,amount_roubles,currency,transaction_id,requested_by,reason\r\n",
    refund_filter,
    refunds,
    refund_line
);
export!(
    data::SubscriptionFilter,
    data::SubscriptionRow,
    "subscriptions.csv",
    "id,created_msk,created_utc,payer_id,status,auto_renew,tariff,period_start_utc,period_end_utc,grace_until_utc\r\n",
    subscription_filter,
    subscriptions,
    subscription_line
);

/// Rows a CSV export reads at a time.
const CSV_PAGE: i64 = 1000;

/// Streams every row a filter matches, page by page, as CSV.
fn csv_stream<T, F, Fut>(
    header_line: &'static str,
    fetch: F,
    line: fn(&T) -> String,
    key: fn(&T) -> (DateTime<Utc>, Uuid),
) -> Body
where
    T: Send + 'static,
    F: Fn(Option<(DateTime<Utc>, Uuid)>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = crate::Result<Vec<T>>> + Send,
{
    let fetch = std::sync::Arc::new(fetch);
    let stream = futures_util::stream::unfold(Some((true, None)), move |state| {
        let fetch = fetch.clone();
        async move {
            let (first, after) = state?;
            let mut out = if first {
                String::from(header_line)
            } else {
                String::new()
            };
            match fetch(after).await {
                Ok(rows) => {
                    for r in &rows {
                        out.push_str(&line(r));
                    }
                    let next =
                        (rows.len() as i64 == CSV_PAGE).then(|| (false, rows.last().map(key)));
                    Some((Ok::<_, std::io::Error>(out), next))
                }
                Err(e) => {
                    tracing::error!(error = %e, "a CSV export failed part way");
                    Some((Err(std::io::Error::other(e.to_string())), None))
                }
            }
        }
    });
    Body::from_stream(stream)
}

fn payment_line(p: &data::PaymentRow) -> String {
    staff_auth::audit::csv_line(&[
        &p.id.to_string(),
        &format::msk_full(p.created_at),
        &format::utc(p.created_at),
        &p.payer_id.to_string(),
        &p.invoice_id.to_string(),
        &p.kind,
        &p.attempt.to_string(),
        &p.status,
        &p.amount_minor.to_string(),
        &format::decimal(p.amount_minor),
        &p.currency,
        &p.gateway_transaction_id
            .map(|t| t.to_string())
            .unwrap_or_default(),
        &p.reason_code.map(|c| c.to_string()).unwrap_or_default(),
        &p.tariff,
        p.card_mask.as_deref().unwrap_or_default(),
        p.card_exp.as_deref().unwrap_or_default(),
        &p.refunded_minor.to_string(),
    ])
}

fn invoice_filter(q: &HashMap<String, String>) -> Result<data::InvoiceFilter, &'static str> {
    let day = |k: &'static str| opt(q, k).map(|v| data::parse_day(&v).ok_or(k)).transpose();
    Ok(data::InvoiceFilter {
        status: opt(q, "status"),
        kind: opt(q, "kind"),
        payer: opt(q, "payer")
            .map(|v| Uuid::parse_str(&v).map_err(|_| "payer"))
            .transpose()?,
        from: day("from")?,
        to: day("to")?,
        after: after(q),
    })
}

#[derive(Template)]
#[template(path = "admin/invoices.html")]
struct InvoicesPage {
    b: Base,
    q: HashMap<String, String>,
    rows: Vec<data::InvoiceRow>,
    next: Option<String>,
    filter: String,
}

impl InvoicesPage {
    fn v(&self, k: &str) -> String {
        self.q.get(k).cloned().unwrap_or_default()
    }
}

async fn invoices(
    State(bo): State<Backoffice>,
    Extension(s): S,
    Extension(c): C,
    headers: HeaderMap,
    Query(q): Q,
) -> Response {
    let cx = page_ctx!(s, c, headers, q, "invoices", here("/invoices", &q));
    let (rows, next) = match list_page::<data::InvoiceFilter>(&bo, cx.base.t, &q).await {
        Ok(page) => page,
        Err(answer) => return answer,
    };
    render(&InvoicesPage {
        filter: filter_query(&q),
        b: cx.base,
        q,
        rows,
        next,
    })
}

fn invoice_line(i: &data::InvoiceRow) -> String {
    staff_auth::audit::csv_line(&[
        &i.id.to_string(),
        &format::msk_full(i.created_at),
        &format::utc(i.created_at),
        &i.payer_id.to_string(),
        &i.subscription_id.to_string(),
        &i.kind,
        &i.status,
        &i.amount_minor.to_string(),
        &format::decimal(i.amount_minor),
        &i.currency,
        &format::utc(i.period_start),
        &format::utc(i.period_end),
        &i.attempt_count.to_string(),
    ])
}

fn refund_filter(q: &HashMap<String, String>) -> Result<data::RefundFilter, &'static str> {
    let day = |k: &'static str| opt(q, k).map(|v| data::parse_day(&v).ok_or(k)).transpose();
    Ok(data::RefundFilter {
        status: opt(q, "status"),
        payer: opt(q, "payer")
            .map(|v| Uuid::parse_str(&v).map_err(|_| "payer"))
            .transpose()?,
        from: day("from")?,
        to: day("to")?,
        after: after(q),
    })
}

#[derive(Template)]
#[template(path = "admin/refunds.html")]
struct RefundsPage {
    b: Base,
    q: HashMap<String, String>,
    rows: Vec<data::RefundRow>,
    next: Option<String>,
    filter: String,
}

impl RefundsPage {
    fn v(&self, k: &str) -> String {
        self.q.get(k).cloned().unwrap_or_default()
    }
}

async fn refunds(
    State(bo): State<Backoffice>,
    Extension(s): S,
    Extension(c): C,
    headers: HeaderMap,
    Query(q): Q,
) -> Response {
    let cx = page_ctx!(s, c, headers, q, "refunds", here("/refunds", &q));
    let (rows, next) = match list_page::<data::RefundFilter>(&bo, cx.base.t, &q).await {
        Ok(page) => page,
        Err(answer) => return answer,
    };
    render(&RefundsPage {
        filter: filter_query(&q),
        b: cx.base,
        q,
        rows,
        next,
    })
}

fn refund_line(r: &data::RefundRow) -> String {
    staff_auth::audit::csv_line(&[
        &r.id.to_string(),
        &format::msk_full(r.created_at),
        &format::utc(r.created_at),
        &r.payer_id.to_string(),
        &r.payment_id.to_string(),
        &r.status,
        &r.amount_minor.to_string(),
        &format::decimal(r.amount_minor),
        &r.currency,
        &r.gateway_transaction_id
            .map(|t| t.to_string())
            .unwrap_or_default(),
        &r.requested_by,
        &r.reason,
    ])
}

fn subscription_filter(
    q: &HashMap<String, String>,
) -> Result<data::SubscriptionFilter, &'static str> {
    let day = |k: &'static str| opt(q, k).map(|v| data::parse_day(&v).ok_or(k)).transpose();
    Ok(data::SubscriptionFilter {
        status: opt(q, "status"),
        payer: opt(q, "payer")
            .map(|v| Uuid::parse_str(&v).map_err(|_| "payer"))
            .transpose()?,
        renews_from: day("renews_from")?,
        renews_to: day("renews_to")?,
        past_due: opt(q, "past_due").is_some(),
        after: after(q),
    })
}

#[derive(Template)]
#[template(path = "admin/subscriptions.html")]
struct SubscriptionsPage {
    b: Base,
    q: HashMap<String, String>,
    rows: Vec<data::SubscriptionRow>,
    next: Option<String>,
    filter: String,
}

impl SubscriptionsPage {
    fn v(&self, k: &str) -> String {
        self.q.get(k).cloned().unwrap_or_default()
    }
}

async fn subscriptions(
    State(bo): State<Backoffice>,
    Extension(s): S,
    Extension(c): C,
    headers: HeaderMap,
    Query(q): Q,
) -> Response {
    let cx = page_ctx!(
        s,
        c,
        headers,
        q,
        "subscriptions",
        here("/subscriptions", &q)
    );
    let (rows, next) = match list_page::<data::SubscriptionFilter>(&bo, cx.base.t, &q).await {
        Ok(page) => page,
        Err(answer) => return answer,
    };
    render(&SubscriptionsPage {
        filter: filter_query(&q),
        b: cx.base,
        q,
        rows,
        next,
    })
}

fn subscription_line(s: &data::SubscriptionRow) -> String {
    let t = |t: &Option<DateTime<Utc>>| t.map(format::utc).unwrap_or_default();
    staff_auth::audit::csv_line(&[
        &s.id.to_string(),
        &format::msk_full(s.created_at),
        &format::utc(s.created_at),
        &s.payer_id.to_string(),
        &s.status,
        &s.auto_renew.to_string(),
        &s.tariff,
        &t(&s.current_period_start),
        &t(&s.current_period_end),
        &t(&s.grace_until),
    ])
}

// ---- Queues that need a person ----

#[derive(Template)]
#[template(path = "admin/attention.html")]
struct AttentionPage {
    b: Base,
    queue: String,
    payments: Vec<data::PaymentRow>,
    events: Vec<data::EventRow>,
    findings: Vec<data::FindingRow>,
    outbox: Vec<data::OutboxRow>,
}

async fn attention(
    State(bo): State<Backoffice>,
    Extension(s): S,
    Extension(c): C,
    headers: HeaderMap,
    Query(q): Q,
    Path(queue): Path<String>,
) -> Response {
    let cx = page_ctx!(
        s,
        c,
        headers,
        q,
        "attention",
        here(&format!("/attention/{queue}"), &q)
    );
    let db = bo.billing.db();
    let mut page = AttentionPage {
        b: cx.base,
        queue: queue.clone(),
        payments: Vec::new(),
        events: Vec::new(),
        findings: Vec::new(),
        outbox: Vec::new(),
    };
    let r = match queue.as_str() {
        "stuck" => data::stuck(db, bo.billing.now() - data::stuck_after(&bo.billing))
            .await
            .map(|p| page.payments = p),
        "unmatched" => data::unmatched(db).await.map(|e| page.events = e),
        "mismatches" => data::findings(db, true, None, None)
            .await
            .map(|f| page.findings = f),
        "dead-outbox" => data::dead_outbox(db).await.map(|o| page.outbox = o),
        _ => return not_found(page.b.t),
    };
    match r {
        Ok(()) => render(&page),
        Err(e) => failed(e),
    }
}

#[derive(Template)]
#[template(path = "admin/approvals.html")]
struct ApprovalsPage {
    b: Base,
    rows: Vec<data::ApprovalRow>,
}

async fn approvals(
    State(bo): State<Backoffice>,
    Extension(s): S,
    Extension(c): C,
    headers: HeaderMap,
    Query(q): Q,
) -> Response {
    let cx = page_ctx!(s, c, headers, q, "attention", here("/approvals", &q));
    match data::approvals(bo.billing.db(), None, true).await {
        Ok(rows) => render(&ApprovalsPage { b: cx.base, rows }),
        Err(e) => failed(e),
    }
}

#[derive(Template)]
#[template(path = "admin/notifications.html")]
struct NotificationsPage {
    b: Base,
    rows: Vec<data::ReceiptRow>,
    next: Option<i64>,
    failed_only: bool,
}

async fn notifications(
    State(bo): State<Backoffice>,
    Extension(s): S,
    Extension(c): C,
    headers: HeaderMap,
    Query(q): Q,
) -> Response {
    let cx = page_ctx!(
        s,
        c,
        headers,
        q,
        "notifications",
        here("/notifications", &q)
    );
    let before = opt(&q, "before").and_then(|b| b.parse().ok());
    let failed_only = opt(&q, "hmac_failed").is_some();
    let mut rows = match data::receipts(bo.billing.db(), before, failed_only).await {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let next = if rows.len() as i64 > PAGE {
        rows.truncate(PAGE as usize);
        rows.last().map(|r| r.id)
    } else {
        None
    };
    render(&NotificationsPage {
        b: cx.base,
        rows,
        next,
        failed_only,
    })
}

// ---- Reports ----

#[derive(Template)]
#[template(path = "admin/reports.html")]
struct ReportsPage {
    b: Base,
    from: NaiveDate,
    to: NaiveDate,
    monthly: bool,
    rows: Vec<data::ReportRow>,
    findings: Vec<data::FindingRow>,
}

fn report_range(
    bo: &Backoffice,
    q: &HashMap<String, String>,
) -> Result<(NaiveDate, NaiveDate, bool), &'static str> {
    let today = bo
        .billing
        .now()
        .with_timezone(&format::moscow())
        .date_naive();
    let monthly = opt(q, "unit").as_deref() == Some("monthly");
    let from = match opt(q, "from") {
        Some(v) => data::parse_day(&v).ok_or("from")?,
        None if monthly => today
            .with_day(1)
            .and_then(|d| d.with_month(1))
            .unwrap_or(today),
        None => today - chrono::Duration::days(30),
    };
    let to = match opt(q, "to") {
        Some(v) => data::parse_day(&v).ok_or("to")?,
        None => today,
    };
    if to < from || (to - from).num_days() > 3700 {
        return Err("to");
    }
    Ok((from, to, monthly))
}

async fn reports(
    State(bo): State<Backoffice>,
    Extension(s): S,
    Extension(c): C,
    headers: HeaderMap,
    Query(q): Q,
) -> Response {
    let cx = page_ctx!(s, c, headers, q, "reports", here("/reports", &q));
    let (from, to, monthly) = match report_range(&bo, &q) {
        Ok(r) => r,
        Err(field) => return bad_filter(cx.base.t, field),
    };
    let db = bo.billing.db();
    let rows = match data::report(db, from, to, monthly).await {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let findings = match data::findings(db, false, Some(from), Some(to)).await {
        Ok(f) => f,
        Err(e) => return failed(e),
    };
    render(&ReportsPage {
        b: cx.base,
        from,
        to,
        monthly,
        rows,
        findings,
    })
}

async fn reports_csv(
    State(bo): State<Backoffice>,
    Extension(s): S,
    Extension(c): C,
    headers: HeaderMap,
    Query(q): Q,
) -> Response {
    let cx = page_ctx!(s, c, headers, q, "reports", String::new());
    let (from, to, monthly) = match report_range(&bo, &q) {
        Ok(r) => r,
        Err(field) => return bad_filter(cx.base.t, field),
    };
    let rows = match data::report(bo.billing.db(), from, to, monthly).await {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let mut out = String::from(
        "period,tariff,currency,payments,charged_kopecks,charged_roubles,refunds,refunded_kopecks,refunded_roubles,net_kopecks,net_roubles\r\n",
    );
    for r in &rows {
        out.push_str(&staff_auth::audit::csv_line(&[
            &r.period.to_string(),
            &r.tariff,
            &r.currency,
            &r.payments.to_string(),
            &r.charged_minor.to_string(),
            &format::decimal(r.charged_minor),
            &r.refunds.to_string(),
            &r.refunded_minor.to_string(),
            &format::decimal(r.refunded_minor),
            &r.net_minor().to_string(),
            &format::decimal(r.net_minor()),
        ]));
    }
    csv_response(
        if monthly { "monthly.csv" } else { "daily.csv" },
        Body::from(out),
    )
}

// ---- Audit log, staff ----

#[derive(Template)]
#[template(path = "admin/audit.html")]
struct AuditPage {
    b: Base,
    rows: Vec<staff_auth::audit::Entry>,
    next: Option<i64>,
}

async fn audit(
    State(bo): State<Backoffice>,
    Extension(s): S,
    Extension(c): C,
    headers: HeaderMap,
    Query(q): Q,
) -> Response {
    let cx = page_ctx!(s, c, headers, q, "audit", here("/audit", &q));
    let before = opt(&q, "before").and_then(|b| b.parse().ok());
    let mut rows = match data::audit(bo.billing.db(), before).await {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let next = if rows.len() as i64 > PAGE {
        rows.truncate(PAGE as usize);
        rows.last().map(|r| r.id)
    } else {
        None
    };
    render(&AuditPage {
        b: cx.base,
        rows,
        next,
    })
}

async fn audit_csv(State(bo): State<Backoffice>) -> Response {
    match staff_auth::audit::csv(bo.billing.db(), None).await {
        Ok(out) => csv_response("audit.csv", Body::from(out)),
        Err(e) => failed(e),
    }
}

#[derive(Template)]
#[template(path = "admin/staff.html")]
struct StaffPage {
    b: Base,
    users: Vec<(String, &'static str)>,
    managed: Vec<super::staff::StaffRow>,
    roles: Vec<&'static str>,
    approval_above: i64,
}

async fn staff(
    State(bo): State<Backoffice>,
    Extension(s): S,
    Extension(c): C,
    headers: HeaderMap,
    Query(q): Q,
) -> Response {
    let cx = page_ctx!(s, c, headers, q, "staff", here("/staff", &q));
    let users = bo.guard.auth().user_roles();
    let managed = match bo.staff_rows().await {
        Ok(m) => m,
        Err(e) => return failed(e),
    };
    render(&StaffPage {
        b: cx.base,
        users: users.into_iter().map(|(u, r)| (u, r.name())).collect(),
        managed,
        roles: StaffRole::ALL.iter().map(|r| r.name()).collect(),
        approval_above: bo.approval_above,
    })
}

// ---- Actions ----

#[derive(Template)]
#[template(path = "admin/result.html")]
struct ResultPage {
    b: Base,
    ok: bool,
    message: String,
    detail: String,
    back: String,
}

#[derive(Debug, Default, serde::Deserialize)]
struct ActionForm {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    note: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    amount: String,
    #[serde(default)]
    currency: String,
    #[serde(default)]
    days: String,
    #[serde(default)]
    when: String,
    #[serde(default)]
    back: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    password: String,
}

impl ActionForm {
    fn why(&self) -> Why {
        Why {
            code: self.reason.trim().to_owned(),
            note: self.note.clone(),
            key: self.key.clone(),
        }
    }

    fn back(&self) -> String {
        if self.back.starts_with(BASE) && !self.back.starts_with("//") {
            self.back.clone()
        } else {
            BASE.to_owned()
        }
    }
}

fn outcome(base: Base, form: &ActionForm, r: Result<Done, Refused>) -> Response {
    let t = base.t;
    // The words in the page's language; what was done (ids, amounts, as the ledger writes
    // them) beside them.
    let (status, ok, message, detail) = match r {
        Ok(Done::Done(m)) => (StatusCode::OK, true, t.get("done").to_owned(), m),
        Ok(Done::Repeated) => (
            StatusCode::OK,
            true,
            t.get("already_done").to_owned(),
            String::new(),
        ),
        Ok(Done::AwaitingApproval(id)) => (
            StatusCode::ACCEPTED,
            true,
            t.get("awaiting_approval").to_owned(),
            id.to_string(),
        ),
        Err(Refused(m)) => (StatusCode::UNPROCESSABLE_ENTITY, false, m, String::new()),
    };
    render_status(
        status,
        &ResultPage {
            b: base,
            ok,
            message,
            detail,
            back: form.back(),
        },
    )
}

fn uuid(id: &str) -> Option<Uuid> {
    Uuid::parse_str(id).ok()
}

macro_rules! action {
    ($name:ident, |$bo:ident, $cx:ident, $id:ident, $form:ident| $body:expr) => {
        async fn $name(
            State($bo): State<Backoffice>,
            Extension(s): S,
            Extension(c): C,
            headers: HeaderMap,
            Query(q): Q,
            Path($id): Path<String>,
            Form($form): Form<ActionForm>,
        ) -> Response {
            let $cx = page_ctx!(s, c, headers, q, "", String::new());
            let r = $body;
            outcome($cx.base, &$form, r)
        }
    };
}

action!(refund, |bo, cx, id, form| match uuid(&id) {
    Some(id) =>
        bo.refund(
            &cx.staff,
            cx.base.t,
            id,
            &form.amount,
            &form.currency,
            &form.why()
        )
        .await,
    None => return not_found(cx.base.t),
});

action!(approve, |bo, cx, id, form| match uuid(&id) {
    Some(id) => bo.decide(&cx.staff, cx.base.t, id, true, &form.why()).await,
    None => return not_found(cx.base.t),
});

action!(reject, |bo, cx, id, form| match uuid(&id) {
    Some(id) =>
        bo.decide(&cx.staff, cx.base.t, id, false, &form.why())
            .await,
    None => return not_found(cx.base.t),
});

action!(
    cancel,
    |bo, cx, id, form| match (uuid(&id), form.when.as_str()) {
        (Some(id), "now") => bo.cancel(&cx.staff, cx.base.t, id, true, &form.why()).await,
        (Some(id), "period_end") =>
            bo.cancel(&cx.staff, cx.base.t, id, false, &form.why())
                .await,
        (Some(_), _) => Err(Refused(
            cx.base.t.get("error").to_owned() + ": when = now | period_end"
        )),
        (None, _) => return not_found(cx.base.t),
    }
);

action!(extend, |bo, cx, id, form| match uuid(&id) {
    Some(id) =>
        bo.extend(&cx.staff, cx.base.t, id, &form.days, &form.why())
            .await,
    None => return not_found(cx.base.t),
});

action!(resend_role, |bo, cx, id, form| match uuid(&id) {
    Some(id) => bo.resend_role(&cx.staff, cx.base.t, id, &form.why()).await,
    None => return not_found(cx.base.t),
});

action!(retry, |bo, cx, id, form| match uuid(&id) {
    Some(id) =>
        bo.retry_renewal(&cx.staff, cx.base.t, id, &form.why())
            .await,
    None => return not_found(cx.base.t),
});

action!(
    resolve_finding,
    |bo, cx, id, form| match id.parse::<i64>() {
        Ok(id) =>
            bo.resolve(&cx.staff, cx.base.t, "finding", id, &form.why())
                .await,
        Err(_) => return not_found(cx.base.t),
    }
);

action!(
    resolve_notification,
    |bo, cx, id, form| match id.parse::<i64>() {
        Ok(id) =>
            bo.resolve(&cx.staff, cx.base.t, "notification", id, &form.why())
                .await,
        Err(_) => return not_found(cx.base.t),
    }
);

action!(redeliver, |bo, cx, id, form| match uuid(&id) {
    Some(id) => bo.redeliver(&cx.staff, cx.base.t, id, &form.why()).await,
    None => return not_found(cx.base.t),
});

async fn staff_add(
    State(bo): State<Backoffice>,
    Extension(s): S,
    Extension(c): C,
    headers: HeaderMap,
    Query(q): Q,
    Form(form): Form<ActionForm>,
) -> Response {
    let cx = page_ctx!(s, c, headers, q, "staff", String::new());
    let r = bo
        .add_staff(
            &cx.staff,
            cx.base.t,
            &form.name,
            &form.role,
            &form.password,
            &form.why(),
        )
        .await;
    outcome(cx.base, &form, r)
}

async fn staff_change(
    State(bo): State<Backoffice>,
    Extension(s): S,
    Extension(c): C,
    headers: HeaderMap,
    Query(q): Q,
    Path((name, change)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Response {
    let cx = page_ctx!(s, c, headers, q, "staff", String::new());
    let change = match change.as_str() {
        "role" => super::staff::Change::Role(form.role.clone()),
        "disable" => super::staff::Change::Disable,
        "enable" => super::staff::Change::Enable,
        "password" => super::staff::Change::Password(form.password.clone()),
        _ => return not_found(cx.base.t),
    };
    let r = bo
        .change_staff(&cx.staff, cx.base.t, &name, change, &form.why())
        .await;
    outcome(cx.base, &form, r)
}

/// Statuses offered by the lists' filters.
pub fn statuses(list: &str) -> &'static [&'static str] {
    match list {
        "payments" => PAYMENT_STATUSES,
        "invoices" => &["open", "paying", "paid", "failed", "void"],
        "refunds" => &["requested", "processing", "succeeded", "failed"],
        _ => &["pending", "active", "past_due", "expired", "abandoned"],
    }
}
