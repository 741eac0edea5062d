//! Breaking the glass (`X-HIE-Purpose-Of-Use: emergency` with a reason):
//! who may, how often, and what is recorded.
//!
//! - **Who:** a consumer whose organisation holds the `break-glass`
//!   permission in the replicated registry (`hie_domain::access`'s rule,
//!   asked of this node's replica). Any other caller is refused with 403
//!   `ACCESS_DENIED` before anything is read.
//! - **How often:** at most `api.break_glass_per_org_per_hour` uses per
//!   organisation in any hour, counted by each node on its own (a sliding
//!   hour). Beyond it: 429 `BREAK_GLASS_LIMIT_REACHED` with `Retry-After`.
//!   The count is per node, not cluster-wide, on purpose: an emergency read
//!   must keep working on a node cut off from the quorum, so it cannot wait
//!   for a Raft write or another node. A client calls its nearest node, so
//!   the cluster-wide figure is in practice the node's; at worst it is the
//!   limit times the nodes an organisation reaches.
//! - **Recorded:** every use is in the audit (purposeOfEvent ETREAT, with
//!   the reason) and in `hie_break_glass_total`; every refused attempt is in
//!   the audit too (same purpose, outcome 4 with the error code) and in
//!   `hie_break_glass_refused_total{reason}`. `hie audit break-glass
//!   --since` lists them for the privacy officer. Log lines name the
//!   organisation and the request, never the reason (free text) or the
//!   patient.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hie_domain::{NhsNumber, OdsCode, Purpose, Reader};

use crate::envelope::RequestCtx;
use crate::error::ApiError;
use crate::router::AppState;

/// Break-glass uses one organisation may make on one node in any hour (the
/// default of `api.break_glass_per_org_per_hour`): well above what one
/// service's emergencies need, far below a harvest of opted-out patients.
pub const BREAK_GLASS_PER_ORG_PER_HOUR: u32 = 30;
/// The most `api.break_glass_per_org_per_hour` may be set to: the limiter
/// keeps one instant per use in the hour (16 bytes).
pub const BREAK_GLASS_PER_ORG_PER_HOUR_MAX: u32 = 1_000;
/// The window the limit counts in.
const BREAK_GLASS_WINDOW: Duration = Duration::from_secs(3600);
/// Organisations tracked before those with no use in the last hour are
/// forgotten. (Only organisations with the permission reach the limiter.)
const BREAK_GLASS_ORGS_PRUNE_AT: usize = 10_000;

const _: () = assert!(BREAK_GLASS_PER_ORG_PER_HOUR >= 1);
const _: () = assert!(BREAK_GLASS_PER_ORG_PER_HOUR <= BREAK_GLASS_PER_ORG_PER_HOUR_MAX);

/// The `reason` label values of `hie_break_glass_refused_total`.
const REFUSAL_REASONS: [&str; 2] = ["not_permitted", "limit"];

/// What a read is of, for the audit record of a break-glass attempt that
/// is refused before anything is read: the patient when the request names
/// one, the resource otherwise.
pub(crate) struct ReadOf {
    pub(crate) subject: Option<NhsNumber>,
    pub(crate) interaction: &'static str,
    pub(crate) resource: Option<String>,
}

/// The uses of the last hour, per organisation (a sliding hour, exact).
pub(crate) struct BreakGlassLimiter {
    per_hour: usize,
    uses: Mutex<HashMap<OdsCode, VecDeque<Instant>>>,
}

impl BreakGlassLimiter {
    /// A limiter of `per_hour` uses; `metrics` gets its refusal series at
    /// zero, so an alert sees the first one.
    pub(crate) fn new(per_hour: u32, metrics: &hie_metrics::Metrics) -> Self {
        for reason in REFUSAL_REASONS {
            metrics.break_glass_refused_total.with_label_values(&[reason]);
        }
        BreakGlassLimiter { per_hour: per_hour as usize, uses: Mutex::new(HashMap::new()) }
    }

    /// Takes one use for `org` now, or says how long until one is free.
    pub(crate) fn take(&self, org: &OdsCode) -> Result<(), Duration> {
        self.take_at(org, Instant::now())
    }

    fn take_at(&self, org: &OdsCode, now: Instant) -> Result<(), Duration> {
        let in_window = |t: &Instant| now.saturating_duration_since(*t) < BREAK_GLASS_WINDOW;
        let mut uses = self.uses.lock().expect("break-glass limiter lock");
        if uses.len() >= BREAK_GLASS_ORGS_PRUNE_AT && !uses.contains_key(org) {
            uses.retain(|_, q| q.back().is_some_and(in_window));
        }
        let q = uses.entry(org.clone()).or_default();
        while q.front().is_some_and(|t| !in_window(t)) {
            q.pop_front();
        }
        if q.len() >= self.per_hour {
            let oldest = q.front().copied().unwrap_or(now);
            return Err(BREAK_GLASS_WINDOW.saturating_sub(now.saturating_duration_since(oldest)));
        }
        q.push_back(now);
        Ok(())
    }
}

/// Checks a read's purpose before anything is read. Direct care passes.
/// Breaking the glass needs the permission and a use left this hour; the
/// use is then counted and logged. A refused attempt is put in the
/// request's audit slot (with `of`), so it is recorded like any access.
pub(crate) async fn authorize(st: &AppState, ctx: &RequestCtx, purpose: &Purpose, of: ReadOf) -> Result<(), ApiError> {
    let Purpose::BreakGlass { reason } = purpose else { return Ok(()) };
    let ods = &ctx.caller.ods;
    let m = st.replica.metrics();
    let permitted = match Reader::new(&ctx.caller) {
        Ok(reader) => st.replica.may_break_glass(&reader).await?,
        Err(_) => false,
    };
    let refusal = if !permitted {
        m.break_glass_refused_total.with_label_values(&[REFUSAL_REASONS[0]]).inc();
        tracing::warn!(request_id = %ctx.request_id, ods = %ods, "break-glass refused: the organisation does not hold the break-glass permission");
        Some(ApiError::AccessDenied(format!(
            "organisation {ods} may not break the glass: the registry does not give it the break-glass permission \
             (an operator grants it: hie registry consumer {ods} --permission break-glass)"
        )))
    } else if let Err(wait) = st.break_glass.take(ods) {
        m.break_glass_refused_total.with_label_values(&[REFUSAL_REASONS[1]]).inc();
        let limit = st.config.limits.break_glass_per_org_per_hour;
        tracing::warn!(request_id = %ctx.request_id, ods = %ods, limit, "break-glass refused: the organisation's hourly limit on this node is reached");
        Some(ApiError::BreakGlassLimited { limit, retry_after_secs: wait.as_secs().max(1) })
    } else {
        None
    };
    if let Some(e) = refusal {
        ctx.audit.refused_read(of.subject.as_ref(), of.interaction, of.resource, purpose);
        return Err(e);
    }
    m.break_glass_total.inc();
    // Without the reason, which is free text and could name the patient:
    // it goes to the audit record only.
    tracing::warn!(request_id = %ctx.request_id, ods = %ods, reason_chars = reason.chars().count(), "break-glass access: emergency override");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The (N+1)th use in an hour is refused until the first leaves the
    /// window; organisations are counted apart.
    #[test]
    fn the_limit_is_per_organisation_per_sliding_hour() {
        let limiter = BreakGlassLimiter::new(3, &hie_metrics::Metrics::new());
        let (a, b) = (OdsCode::parse("RX9").unwrap(), OdsCode::parse("NLO10").unwrap());
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        for s in 0..3 {
            assert_eq!(limiter.take_at(&a, at(s * 10)), Ok(()));
        }
        assert_eq!(limiter.take_at(&a, at(100)), Err(Duration::from_secs(3500)), "until the first use is an hour old");
        assert_eq!(limiter.take_at(&b, at(100)), Ok(()), "another organisation");
        assert!(limiter.take_at(&a, at(3599)).is_err());
        assert_eq!(limiter.take_at(&a, at(3600)), Ok(()), "the first use has left the hour");
        assert_eq!(limiter.take_at(&a, at(3605)), Err(Duration::from_secs(5)));
    }
}
