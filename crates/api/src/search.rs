//! Searches of a patient's pointers: `GET /DocumentReference`, `POST
//! /DocumentReference/_search` (a form, or NRLF's JSON object, keeping NHS
//! Numbers out of URLs), and `GET /DocumentReference/_count`; pages by key
//! with sealed paging tokens (see [`crate::paging`]) that any node
//! continues and that never carry the NHS Number in clear.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::Response;
use hie_audit::Action;
use hie_domain::query::{Search, SearchFilter, SearchPage, SubjectOf};
use hie_domain::{CommandV1, NhsNumber, OdsCode, PointerId, SnomedCode};
use hie_fhir::{self as fhir, SearchLimits, SearchParams, parse_json_search, parse_query, parse_search};
use serde_json::json;

use crate::audit_slot::now;
use crate::break_glass::ReadOf;
use crate::envelope::RequestCtx;
use crate::error::ApiError;
use crate::paging::{self, Cursor, TokenError};
use crate::respond::{BodyKind, consistency, fhir_json, fhir_text, read_body, with_freshness};
use crate::router::{AppState, St};

pub(crate) async fn search_get(
    State(st): St,
    ctx: RequestCtx,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let pairs = parse_query(uri.query().unwrap_or(""))?;
    let self_url = format!("{}/DocumentReference{}", st.config.base_url, query_suffix(&uri));
    run_search(&st, &ctx, &headers, pairs, false, self_url).await
}

/// `POST /DocumentReference/_search`: a form (FHIR's way) or a JSON object
/// (NRLF's), told apart by the Content-Type.
pub(crate) async fn search_post(
    State(st): St,
    ctx: RequestCtx,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Result<Response, ApiError> {
    let json_body = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.split(';').next().is_some_and(|t| t.trim().ends_with("json")));
    let kind = if json_body { BodyKind::Json } else { BodyKind::Form };
    let body = read_body(body, &headers, &st.config.limits, kind).await?;
    let mut pairs = parse_query(uri.query().unwrap_or(""))?;
    if json_body {
        pairs.extend(parse_json_search(&body)?);
    } else {
        let form = std::str::from_utf8(&body).map_err(|_| ApiError::NotWellFormed("form is not UTF-8".into()))?;
        pairs.extend(parse_query(form)?);
    }
    // The self link of a POSTed search names no parameters: they were
    // posted to keep the NHS Number out of URLs.
    let self_url = format!("{}/DocumentReference/_search", st.config.base_url);
    run_search(&st, &ctx, &headers, pairs, false, self_url).await
}

pub(crate) async fn count(State(st): St, ctx: RequestCtx, headers: HeaderMap, uri: Uri) -> Result<Response, ApiError> {
    let pairs = parse_query(uri.query().unwrap_or(""))?;
    let self_url = format!("{}/DocumentReference/_count{}", st.config.base_url, query_suffix(&uri));
    run_search(&st, &ctx, &headers, pairs, true, self_url).await
}

fn query_suffix(uri: &Uri) -> String {
    uri.query().map(|q| format!("?{q}")).unwrap_or_default()
}

/// A search to run: its parameters, and where it starts.
struct Planned {
    subject: NhsNumber,
    filter: SearchFilter,
    count: usize,
    after: Option<PointerId>,
    summary_count: bool,
}

fn codes(v: &[SnomedCode]) -> Vec<String> {
    v.iter().map(|c| c.as_str().to_owned()).collect()
}

fn filter_of(params: &SearchParams) -> SearchFilter {
    SearchFilter {
        types: params.types.clone(),
        categories: params.categories.clone(),
        custodians: params.custodians.clone(),
    }
}

/// The parameters a cursor was made from.
fn params_of(c: &Cursor) -> Result<SearchParams, ApiError> {
    let invalid = || ApiError::InvalidParameter("the paging token is not valid; search again".into());
    let snomed = |v: &[String]| -> Result<Vec<SnomedCode>, ApiError> {
        v.iter().map(|c| SnomedCode::parse(c).map_err(|_| invalid())).collect()
    };
    Ok(SearchParams {
        subject: Some(NhsNumber::parse(&c.subject).map_err(|_| invalid())?),
        types: snomed(&c.types)?,
        categories: snomed(&c.categories)?,
        custodians: c.custodians.iter().map(|o| OdsCode::parse(o).map_err(|_| invalid())).collect::<Result<_, _>>()?,
        count: c.count,
        local_subject: None,
        summary_count: false,
        cursor: None,
    })
}

/// The NHS Number a search's local identifier names (`None`: nobody).
async fn resolve_local(st: &AppState, params: &mut SearchParams) -> Result<Option<()>, ApiError> {
    let Some(local) = params.local_subject.take() else { return Ok(Some(())) };
    match st.replica.subject_of(&local).await? {
        SubjectOf::Found { nhs, .. } => {
            params.subject = Some(nhs);
            Ok(Some(()))
        }
        SubjectOf::NotFound => Ok(None),
        SubjectOf::UnknownSystem => Err(ApiError::UnknownSystem(
            "subject:identifier names a system that is neither the NHS Number's nor a registered local system".into(),
        )),
    }
}

/// The search the parameters ask for: new, or continued from a token
/// (with which the request may repeat the search's parameters, as NRLF's
/// clients do, but not change them). `None`: the search names a local
/// identifier that names nobody, so it finds nothing.
async fn plan(st: &AppState, ctx: &RequestCtx, pairs: Vec<(String, String)>) -> Result<Option<Planned>, ApiError> {
    let limits = &st.config.limits;
    let mut params = parse_search(
        pairs,
        SearchLimits { page_size_default: limits.page_size_default, page_size_max: limits.page_size_max },
    )?;
    if resolve_local(st, &mut params).await?.is_none() {
        return Ok(None);
    }
    let Some(token) = &params.cursor else {
        let subject =
            params.subject.ok_or_else(|| ApiError::InvalidParameter("subject:identifier is required".into()))?;
        return Ok(Some(Planned {
            subject,
            filter: filter_of(&params),
            count: params.count,
            after: None,
            summary_count: params.summary_count,
        }));
    };
    let key = paging_key(st, ctx).await?;
    let cursor = key.open(token, ctx.caller.ods.as_str(), now().0, limits.cursor_ttl).map_err(|e| match e {
        TokenError::Invalid | TokenError::Expired => ApiError::InvalidParameter(e.to_string()),
        TokenError::NotYours => ApiError::Forbidden(e.to_string()),
    })?;
    let first = params_of(&cursor)?;
    if params.names_a_search() && !params.same_search(&first) {
        return Err(ApiError::InvalidParameter("the search parameters differ from the paging token's".into()));
    }
    let after = PointerId::parse(&cursor.after)
        .map_err(|_| ApiError::InvalidParameter("the paging token is not valid; search again".into()))?;
    Ok(Some(Planned {
        subject: first.subject.expect("a cursor names its patient"),
        filter: filter_of(&first),
        count: first.count,
        after: Some(after),
        summary_count: params.summary_count,
    }))
}

async fn run_search(
    st: &AppState,
    ctx: &RequestCtx,
    headers: &HeaderMap,
    pairs: Vec<(String, String)>,
    count_route: bool,
    self_url: String,
) -> Result<Response, ApiError> {
    let reader = ctx.reader()?;
    consistency(headers, &st.replica).await?;
    let planned = plan(st, ctx, pairs).await?;
    let of = ReadOf { subject: planned.as_ref().map(|p| p.subject), interaction: "search-type", resource: None };
    let purpose = ctx.read_purpose(st, of).await?;
    let Some(planned) = planned else {
        // A local identifier that names nobody: nothing found, and no
        // patient's data touched.
        let page = SearchPage { merged_into: None, total: 0, pointers: Vec::new(), next_after: None };
        let body = fhir::searchset(&st.config.base_url, 0, &page.pointers, &self_url, None, None);
        return Ok(with_freshness(fhir_text(StatusCode::OK, body), &st.replica));
    };
    ctx.audit.set(&planned.subject, Action::Read, "search-type", &purpose);
    let count_only = count_route || planned.summary_count;
    let query = Search {
        subject: planned.subject,
        filter: planned.filter.clone(),
        after: planned.after.clone(),
        count: if count_only { 0 } else { planned.count },
        scan_max: st.config.limits.search_scan_max,
    };
    let mut page = st.replica.search(&reader, &purpose, query).await?;
    if page.total == 0 {
        crate::pointers::consumer_without_types(st, ctx).await?;
    }
    // A retired number answers for its survivor: the audit names the
    // patient whose pointers were disclosed, and so does a next page.
    let notice = page.merged_into.map(|n| {
        ctx.audit.set(&n, Action::Read, "search-type", &purpose);
        fhir::merged_notice(&n)
    });
    if count_only {
        let mut body = json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "total": page.total,
            "link": [{ "relation": "self", "url": self_url }],
        });
        if let Some(n) = &notice {
            body["entry"] = json!([{ "resource": fhir::warning_outcome(n), "search": { "mode": "outcome" } }]);
        }
        return Ok(with_freshness(fhir_json(StatusCode::OK, &body), &st.replica));
    }
    let planned = Planned { subject: page.merged_into.take().unwrap_or(planned.subject), ..planned };
    let next = next_link(st, ctx, &planned, &page).await?;
    let body =
        fhir::searchset(&st.config.base_url, page.total, &page.pointers, &self_url, next.as_deref(), notice.as_deref());
    Ok(with_freshness(fhir_text(StatusCode::OK, body), &st.replica))
}

/// The `next` link of a page that has one.
async fn next_link(
    st: &AppState,
    ctx: &RequestCtx,
    planned: &Planned,
    page: &SearchPage,
) -> Result<Option<String>, ApiError> {
    let Some(after) = &page.next_after else { return Ok(None) };
    let cursor = Cursor {
        subject: planned.subject.as_str().to_owned(),
        types: codes(&planned.filter.types),
        categories: codes(&planned.filter.categories),
        custodians: planned.filter.custodians.iter().map(|o| o.as_str().to_owned()).collect(),
        count: planned.count,
        after: after.as_str().to_owned(),
        owner: ctx.caller.ods.as_str().to_owned(),
        issued_ms: now().0,
    };
    let token = paging_key(st, ctx).await?.seal(&cursor);
    Ok(Some(format!("{}/DocumentReference?next={token}", st.config.base_url)))
}

/// The cluster's paging key: read from the replicated state once, and
/// cached. If the cluster has none yet, this node proposes one (the first
/// proposed wins on every node) and waits until its replica has it.
async fn paging_key<'a>(st: &'a AppState, ctx: &RequestCtx) -> Result<&'a paging::PagingKey, ApiError> {
    if let Some(k) = st.paging_key.get() {
        return Ok(k);
    }
    let key = match st.replica.paging_key().await? {
        Some(k) => k,
        None => {
            let proposed = hie_domain::PagingKey(paging::random_key());
            let cmd = hie_domain::Command::V1(CommandV1::SetPagingKey { key: proposed });
            st.replica.write(&ctx.caller, cmd, &ctx.request_id).await?;
            st.replica.linearizable_barrier().await?;
            st.replica
                .paging_key()
                .await?
                .ok_or_else(|| ApiError::Internal("the paging key was set but is not in the state".into()))?
        }
    };
    Ok(st.paging_key.get_or_init(|| paging::PagingKey::new(&key.0)))
}
