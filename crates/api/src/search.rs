//! Searches of a patient's pointers: `GET /DocumentReference`, `POST
//! /DocumentReference/_search` (a form, keeping NHS Numbers out of URLs),
//! and `GET /DocumentReference/_count`; pages by key with continuation
//! tokens that never carry the NHS Number.

use std::collections::HashMap;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use hie_audit::Action;
use hie_domain::query::{Search, SearchFilter, SearchPage};
use hie_domain::{NhsNumber, OdsCode, PointerId};
use hie_fhir::{self as fhir, SearchLimits, parse_query, parse_search};
use serde_json::json;

use crate::envelope::RequestCtx;
use crate::error::ApiError;
use crate::respond::{BodyKind, consistency, fhir_json, fhir_text, read_body, with_freshness};
use crate::router::{AppState, St};

/// Continuation tokens: opaque ids standing for a search and the position
/// after its last page, so no NHS Number ever appears in a URL. Held on
/// this node for `cursor_ttl`, at most `cursors_max`.
#[derive(Default)]
pub(crate) struct Cursors {
    entries: HashMap<String, (Instant, Cursor)>,
}

/// A search and where its next page starts.
#[derive(Clone)]
struct Cursor {
    subject: NhsNumber,
    filter: SearchFilter,
    count: usize,
    /// The last pointer id of the page before (none: the first page).
    after: Option<PointerId>,
    /// Only the organisation that searched may continue.
    owner: OdsCode,
}

impl Cursors {
    /// The search a token stands for (once: a token is spent by its use).
    fn take(&mut self, token: &str, owner: &OdsCode, ttl: std::time::Duration) -> Option<Cursor> {
        let live = self.entries.get(token).is_some_and(|(at, c)| at.elapsed() < ttl && &c.owner == owner);
        if !live {
            return None;
        }
        self.entries.remove(token).map(|(_, c)| c)
    }

    /// Holds `cursor` under a new token; when full, forgets expired ones,
    /// then the oldest.
    fn put(&mut self, cursor: Cursor, max: usize, ttl: std::time::Duration) -> String {
        if self.entries.len() >= max {
            self.entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if self.entries.len() >= max
                && let Some(oldest) = self.entries.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| k.clone())
            {
                self.entries.remove(&oldest);
            }
        }
        let token = uuid::Uuid::new_v4().simple().to_string();
        self.entries.insert(token.clone(), (Instant::now(), cursor));
        token
    }
}

pub(crate) async fn search_get(
    State(st): St,
    ctx: RequestCtx,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let pairs = parse_query(uri.query().unwrap_or(""))?;
    run_search(&st, &ctx, &headers, pairs, false).await
}

pub(crate) async fn search_post(
    State(st): St,
    ctx: RequestCtx,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(body, &headers, &st.config.limits, BodyKind::Form).await?;
    let mut pairs = parse_query(uri.query().unwrap_or(""))?;
    let form = std::str::from_utf8(&body).map_err(|_| ApiError::NotWellFormed("form is not UTF-8".into()))?;
    pairs.extend(parse_query(form)?);
    run_search(&st, &ctx, &headers, pairs, false).await
}

pub(crate) async fn count(State(st): St, ctx: RequestCtx, headers: HeaderMap, uri: Uri) -> Result<Response, ApiError> {
    let pairs = parse_query(uri.query().unwrap_or(""))?;
    run_search(&st, &ctx, &headers, pairs, true).await
}

/// The search the parameters ask for: new, or continued from a token.
fn search_of(st: &AppState, ctx: &RequestCtx, pairs: Vec<(String, String)>) -> Result<Cursor, ApiError> {
    let limits = &st.config.limits;
    let params = parse_search(
        pairs,
        SearchLimits { page_size_default: limits.page_size_default, page_size_max: limits.page_size_max },
    )?;
    match (params.cursor, params.subject) {
        (Some(token), _) => {
            let mut cursors = st.cursors.lock().expect("cursor lock");
            cursors
                .take(&token, &ctx.caller.ods, limits.cursor_ttl)
                .ok_or_else(|| ApiError::InvalidParameter("the next token is unknown or expired; search again".into()))
        }
        (None, Some(subject)) => Ok(Cursor {
            subject,
            filter: SearchFilter {
                types: params.type_code.into_iter().collect(),
                custodians: params.custodian.into_iter().collect(),
            },
            count: params.count,
            after: None,
            owner: ctx.caller.ods.clone(),
        }),
        (None, None) => unreachable!("parse_search requires a subject or a token"),
    }
}

async fn run_search(
    st: &AppState,
    ctx: &RequestCtx,
    headers: &HeaderMap,
    pairs: Vec<(String, String)>,
    count_only: bool,
) -> Result<Response, ApiError> {
    let reader = ctx.reader()?;
    let purpose = ctx.read_purpose(st)?;
    let cursor = search_of(st, ctx, pairs)?;
    ctx.audit.set(&cursor.subject, Action::Read, "search-type", &purpose);
    consistency(headers, &st.replica).await?;
    let query = Search {
        subject: cursor.subject,
        filter: cursor.filter.clone(),
        after: cursor.after.clone(),
        count: if count_only { 0 } else { cursor.count },
        scan_max: st.config.limits.search_scan_max,
    };
    let page = st.replica.search(&reader, &purpose, query).await?;
    if count_only {
        let body = json!({ "resourceType": "Bundle", "type": "searchset", "total": page.total });
        return Ok(with_freshness(fhir_json(StatusCode::OK, &body), &st.replica));
    }
    let next = next_link(st, cursor, &page);
    let body = fhir::searchset(&st.config.base_url, page.total, &page.pointers, next.as_deref());
    Ok(with_freshness(fhir_text(StatusCode::OK, body), &st.replica))
}

/// The `next` link of a page that has one.
fn next_link(st: &AppState, cursor: Cursor, page: &SearchPage) -> Option<String> {
    let after = page.next_after.clone()?;
    let limits = &st.config.limits;
    let token = st.cursors.lock().expect("cursor lock").put(
        Cursor { after: Some(after), ..cursor },
        limits.cursors_max,
        limits.cursor_ttl,
    );
    Some(format!("{}/DocumentReference?next={token}", st.config.base_url))
}
