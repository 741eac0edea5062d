//! FHIR R4 Subscriptions as the Subscriptions R5 Backport IG (STU 1.1)
//! defines them: the `Subscription` a consumer sends, and the notification
//! Bundles and `SubscriptionStatus` Parameters hie sends back.

use hie_domain::subscription::TOPIC;
use hie_domain::{
    NhsNumber, OdsCode, PayloadContent, SnomedCode, Subscription, SubscriptionEvent, SubscriptionFilter, Timestamp,
};
use serde_json::{Map, Value, json};

use crate::{FhirError, NHS_NUMBER_SYSTEM, ODS_SYSTEM, instant, invalid};

const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";
pub const SUBSCRIPTION_PROFILE: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription";
const STATUS_PROFILE: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4";
const NOTIFICATION_PROFILE: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-notification-r4";

/// Filter criteria a subscription may carry.
pub const FILTERS_MAX: usize = 3;
/// The longest heartbeat period and timeout taken, in seconds (a day).
pub const PERIOD_SECS_MAX: u32 = 86_400;
/// The most events in one notification a subscriber may ask for.
pub const MAX_COUNT_MAX: u32 = 1_000;

/// A Subscription as sent, checked: what the node needs to make one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionIn {
    pub reason: String,
    pub filter: SubscriptionFilter,
    pub criteria: Vec<String>,
    pub endpoint: String,
    /// The endpoint's host, for the operator's allow-list.
    pub endpoint_host: String,
    pub content: PayloadContent,
    pub heartbeat_secs: Option<u32>,
    pub timeout_secs: Option<u32>,
    pub max_count: Option<u32>,
}

fn ext_url(name: &str) -> String {
    format!("{BACKPORT}{name}")
}

/// The object at `path`, refusing members other than `allowed`.
fn object<'a>(v: &'a Value, path: &str, allowed: &[&str]) -> Result<&'a Map<String, Value>, FhirError> {
    let o = v.as_object().ok_or_else(|| invalid(format!("{path} must be an object")))?;
    if let Some(k) = o.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(invalid(format!("{path}.{k} is not supported on a Subscription here")));
    }
    Ok(o)
}

fn string<'a>(o: &'a Map<String, Value>, path: &str, key: &str) -> Result<Option<&'a str>, FhirError> {
    match o.get(key) {
        None => Ok(None),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s)),
        Some(_) => Err(invalid(format!("{path}.{key} must be a non-empty string"))),
    }
}

/// The backport extensions on an element: (name without the prefix, value).
fn extensions<'a>(o: &'a Map<String, Value>, path: &str) -> Result<Vec<(&'a str, &'a Value)>, FhirError> {
    let Some(list) = o.get("extension") else { return Ok(vec![]) };
    let list = list.as_array().ok_or_else(|| invalid(format!("{path}.extension must be an array")))?;
    let mut out = vec![];
    for (i, e) in list.iter().enumerate() {
        let p = format!("{path}.extension[{i}]");
        let e = e.as_object().ok_or_else(|| invalid(format!("{p} must be an object")))?;
        let url = e.get("url").and_then(Value::as_str).ok_or_else(|| invalid(format!("{p}.url is required")))?;
        let name = url
            .strip_prefix(BACKPORT)
            .ok_or_else(|| invalid(format!("{p}: extension {url} is not supported on a Subscription here")))?;
        let value = e
            .iter()
            .find(|(k, _)| k.starts_with("value"))
            .map(|(_, v)| v)
            .ok_or_else(|| invalid(format!("{p} has no value")))?;
        out.push((name, value));
    }
    Ok(out)
}

fn unsigned(name: &str, v: &Value, max: u32) -> Result<u32, FhirError> {
    v.as_u64()
        .filter(|n| (1..=u64::from(max)).contains(n))
        .map(|n| n as u32)
        .ok_or_else(|| invalid(format!("{name} must be a whole number from 1 to {max}")))
}

/// Parses a Subscription of the backport profile: criteria the one topic,
/// `rest-hook` to an `https` endpoint, `application/fhir+json`.
pub fn parse_subscription(body: &[u8]) -> Result<SubscriptionIn, FhirError> {
    let value = crate::parse_resource(body, "Subscription")?;
    let top = object(
        &value,
        "Subscription",
        &[
            "resourceType",
            "id",
            "meta",
            "status",
            "reason",
            "criteria",
            "_criteria",
            "channel",
            "end",
            "contact",
            "error",
        ],
    )?;
    if top.contains_key("end") {
        return Err(invalid("Subscription.end is not supported: delete the subscription when it is no longer needed"));
    }
    match string(top, "Subscription", "status")? {
        None | Some("requested") => {}
        Some(other) => return Err(invalid(format!("Subscription.status must be requested, not {other}"))),
    }
    let reason = string(top, "Subscription", "reason")?.ok_or_else(|| invalid("Subscription.reason is required"))?;
    if reason.len() > Subscription::TEXT_BYTES_MAX {
        return Err(invalid(format!("Subscription.reason is longer than {} bytes", Subscription::TEXT_BYTES_MAX)));
    }
    let topic = string(top, "Subscription", "criteria")?.ok_or_else(|| invalid("Subscription.criteria is required"))?;
    if topic != TOPIC {
        return Err(invalid(format!("Subscription.criteria must be the topic {TOPIC}")));
    }
    let mut criteria = vec![];
    if let Some(ext) = top.get("_criteria") {
        let o = object(ext, "Subscription._criteria", &["extension"])?;
        for (name, v) in extensions(o, "Subscription._criteria")? {
            if name != "backport-filter-criteria" {
                return Err(invalid(format!("Subscription._criteria: extension {name} is not supported")));
            }
            let s = v.as_str().ok_or_else(|| invalid("backport-filter-criteria must be a valueString"))?;
            criteria.push(s.to_owned());
        }
    }
    if criteria.len() > FILTERS_MAX {
        return Err(invalid(format!("a subscription may carry at most {FILTERS_MAX} filter criteria")));
    }
    let filter = parse_filters(&criteria)?;

    let channel = top.get("channel").ok_or_else(|| invalid("Subscription.channel is required"))?;
    let channel = object(channel, "Subscription.channel", &["type", "endpoint", "payload", "_payload", "extension"])?;
    match string(channel, "Subscription.channel", "type")? {
        Some("rest-hook") => {}
        Some(other) => {
            return Err(invalid(format!("Subscription.channel.type {other} is not supported: rest-hook only")));
        }
        None => return Err(invalid("Subscription.channel.type is required")),
    }
    let endpoint = string(channel, "Subscription.channel", "endpoint")?
        .ok_or_else(|| invalid("Subscription.channel.endpoint is required"))?;
    let endpoint_host = https_host(endpoint)?;
    match string(channel, "Subscription.channel", "payload")? {
        Some("application/fhir+json") => {}
        Some(other) => {
            return Err(invalid(format!(
                "Subscription.channel.payload {other} is not supported: application/fhir+json only"
            )));
        }
        None => return Err(invalid("Subscription.channel.payload is required")),
    }
    let mut content = PayloadContent::IdOnly;
    if let Some(ext) = channel.get("_payload") {
        let o = object(ext, "Subscription.channel._payload", &["extension"])?;
        for (name, v) in extensions(o, "Subscription.channel._payload")? {
            if name != "backport-payload-content" {
                return Err(invalid(format!("Subscription.channel._payload: extension {name} is not supported")));
            }
            content = v
                .as_str()
                .and_then(PayloadContent::parse)
                .ok_or_else(|| invalid("backport-payload-content must be one of empty, id-only, full-resource"))?;
        }
    }
    let (mut heartbeat_secs, mut timeout_secs, mut max_count) = (None, None, None);
    for (name, v) in extensions(channel, "Subscription.channel")? {
        match name {
            "backport-heartbeat-period" => heartbeat_secs = Some(unsigned(name, v, PERIOD_SECS_MAX)?),
            "backport-timeout" => timeout_secs = Some(unsigned(name, v, 60)?),
            "backport-max-count" => max_count = Some(unsigned(name, v, MAX_COUNT_MAX)?),
            other => return Err(invalid(format!("Subscription.channel: extension {other} is not supported"))),
        }
    }
    Ok(SubscriptionIn {
        reason: reason.to_owned(),
        filter,
        criteria,
        endpoint: endpoint.to_owned(),
        endpoint_host,
        content,
        heartbeat_secs,
        timeout_secs,
        max_count,
    })
}

/// The host of an `https` URL (lower case, IPv6 without brackets).
pub fn https_host(url: &str) -> Result<String, FhirError> {
    if url.len() > Subscription::TEXT_BYTES_MAX {
        return Err(invalid(format!("the endpoint is longer than {} bytes", Subscription::TEXT_BYTES_MAX)));
    }
    let rest =
        url.strip_prefix("https://").ok_or_else(|| invalid("Subscription.channel.endpoint must be an https URL"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') || authority.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid("Subscription.channel.endpoint is not a usable https URL"));
    }
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority
            .rsplit_once(':')
            .map_or(authority, |(h, port)| if port.bytes().all(|b| b.is_ascii_digit()) { h } else { authority })
    };
    if host.is_empty() {
        return Err(invalid("Subscription.channel.endpoint has no host"));
    }
    Ok(host.to_ascii_lowercase())
}

/// The topic's filters: `subject:identifier`, `type`, `custodian:identifier`
/// (each at most once), from `DocumentReference?a=..&b=..` strings.
pub fn parse_filters(criteria: &[String]) -> Result<SubscriptionFilter, FhirError> {
    let mut filter = SubscriptionFilter::default();
    let bad = |m: String| FhirError::InvalidParameter(m);
    for c in criteria {
        let query = c
            .strip_prefix("DocumentReference?")
            .ok_or_else(|| bad("a filter criterion must begin DocumentReference?".into()))?;
        for (name, value) in crate::parse_query(query)? {
            if value.contains(',') {
                return Err(bad(format!("filter {name} takes one value")));
            }
            match name.as_str() {
                "subject:identifier" | "subject.identifier" | "patient:identifier" => {
                    if filter.subject.is_some() {
                        return Err(bad("filter subject:identifier given twice".into()));
                    }
                    let v = value.strip_prefix(NHS_NUMBER_SYSTEM).and_then(|r| r.strip_prefix('|')).unwrap_or(&value);
                    if v.contains('|') {
                        return Err(FhirError::InvalidIdentifierSystem(format!(
                            "filter subject:identifier must be of the system {NHS_NUMBER_SYSTEM}"
                        )));
                    }
                    filter.subject = Some(NhsNumber::parse(v).map_err(FhirError::InvalidNhsNumber)?);
                }
                "type" => {
                    if filter.type_code.is_some() {
                        return Err(bad("filter type given twice".into()));
                    }
                    let v = value.strip_prefix(SnomedCode::SYSTEM).and_then(|r| r.strip_prefix('|')).unwrap_or(&value);
                    if v.contains('|') {
                        return Err(FhirError::InvalidCodeSystem(format!(
                            "filter type must be of the system {}",
                            SnomedCode::SYSTEM
                        )));
                    }
                    filter.type_code = Some(SnomedCode::parse(v).map_err(|e| bad(format!("filter type: {e}")))?);
                }
                "custodian:identifier" | "custodian.identifier" => {
                    if filter.custodian.is_some() {
                        return Err(bad("filter custodian:identifier given twice".into()));
                    }
                    let v = value.strip_prefix(ODS_SYSTEM).and_then(|r| r.strip_prefix('|')).unwrap_or(&value);
                    filter.custodian =
                        Some(OdsCode::parse(v).map_err(|e| bad(format!("filter custodian:identifier: {e}")))?);
                }
                other => {
                    return Err(bad(format!(
                        "filter {} is not supported: subject:identifier, type and custodian:identifier are",
                        crate::search::printable(other)
                    )));
                }
            }
        }
    }
    Ok(filter)
}

/// A subscription as FHIR R4 (the backport profile).
pub fn subscription_resource(s: &Subscription) -> Value {
    let mut channel = json!({
        "type": "rest-hook",
        "endpoint": s.endpoint,
        "payload": "application/fhir+json",
        "_payload": { "extension": [{ "url": ext_url("backport-payload-content"), "valueCode": s.content.as_str() }] },
    });
    let mut ext = vec![];
    if let Some(h) = s.heartbeat_secs {
        ext.push(json!({ "url": ext_url("backport-heartbeat-period"), "valueUnsignedInt": h }));
    }
    if let Some(t) = s.timeout_secs {
        ext.push(json!({ "url": ext_url("backport-timeout"), "valueUnsignedInt": t }));
    }
    if let Some(m) = s.max_count {
        ext.push(json!({ "url": ext_url("backport-max-count"), "valuePositiveInt": m }));
    }
    if !ext.is_empty() {
        channel["extension"] = Value::Array(ext);
    }
    let mut out = json!({
        "resourceType": "Subscription",
        "id": s.id.as_str(),
        "meta": { "profile": [SUBSCRIPTION_PROFILE] },
        "status": s.status.as_str(),
        "reason": s.reason,
        "criteria": TOPIC,
        "channel": channel,
    });
    if !s.criteria.is_empty() {
        let filters: Vec<Value> = s
            .criteria
            .iter()
            .map(|c| json!({ "url": ext_url("backport-filter-criteria"), "valueString": c }))
            .collect();
        out["_criteria"] = json!({ "extension": filters });
    }
    if let Some(e) = &s.error {
        out["error"] = json!(e);
    }
    out
}

/// The kinds of notification (the backport's notification types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotificationType {
    Handshake,
    Heartbeat,
    EventNotification,
    QueryStatus,
    QueryEvent,
}

impl NotificationType {
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationType::Handshake => "handshake",
            NotificationType::Heartbeat => "heartbeat",
            NotificationType::EventNotification => "event-notification",
            NotificationType::QueryStatus => "query-status",
            NotificationType::QueryEvent => "query-event",
        }
    }
}

/// One event as a notification carries it: its focus's reference (absent
/// for `empty` content, or when it is withheld) and, for `full-resource`,
/// the focus as it is now (absent once deleted).
pub struct EventOut<'a> {
    pub event: &'a SubscriptionEvent,
    pub focus: bool,
    pub resource: Option<String>,
}

/// The backport's SubscriptionStatus as R4 Parameters.
pub fn status_parameters(s: &Subscription, kind: NotificationType, events: &[EventOut<'_>], base: &str) -> Value {
    let mut params = vec![
        json!({ "name": "subscription", "valueReference": { "reference": format!("{base}/Subscription/{}", s.id) } }),
        json!({ "name": "topic", "valueCanonical": TOPIC }),
        json!({ "name": "status", "valueCode": s.status.as_str() }),
        json!({ "name": "type", "valueCode": kind.as_str() }),
        json!({ "name": "events-since-subscription-start", "valueString": s.events.to_string() }),
    ];
    for e in events {
        let mut parts = vec![
            json!({ "name": "event-number", "valueString": e.event.number.to_string() }),
            json!({ "name": "timestamp", "valueInstant": instant(e.event.at) }),
        ];
        if e.focus {
            parts.push(json!({
                "name": "focus",
                "valueReference": { "reference": format!("{base}/DocumentReference/{}", e.event.focus) },
            }));
        }
        params.push(json!({ "name": "notification-event", "part": parts }));
    }
    if let Some(err) = &s.error {
        params.push(json!({ "name": "error", "valueCodeableConcept": { "text": err } }));
    }
    json!({
        "resourceType": "Parameters",
        "meta": { "profile": [STATUS_PROFILE] },
        "parameter": params,
    })
}

/// A notification Bundle (`history`): the status first, then, for
/// `full-resource`, each focus still present.
pub fn notification_bundle(
    s: &Subscription,
    kind: NotificationType,
    events: &[EventOut<'_>],
    base: &str,
    now: Timestamp,
    bundle_id: &str,
) -> String {
    let status = status_parameters(s, kind, events, base);
    let mut entries = vec![
        json!({
            "fullUrl": format!("urn:uuid:{bundle_id}"),
            "resource": status,
            "request": { "method": "GET", "url": format!("{base}/Subscription/{}/$status", s.id) },
            "response": { "status": "200" },
        })
        .to_string(),
    ];
    for e in events {
        if let Some(text) = &e.resource {
            let url = format!("{base}/DocumentReference/{}", e.event.focus);
            entries.push(format!(
                "{{\"fullUrl\":{},\"resource\":{text},\"request\":{{\"method\":\"GET\",\"url\":{}}},\"response\":{{\"status\":\"200\"}}}}",
                Value::String(url.clone()),
                Value::String(url)
            ));
        }
    }
    format!(
        "{{\"resourceType\":\"Bundle\",\"id\":{},\"meta\":{{\"profile\":[{}]}},\"type\":\"history\",\"timestamp\":{},\"entry\":[{}]}}",
        Value::String(bundle_id.to_owned()),
        Value::String(NOTIFICATION_PROFILE.to_owned()),
        Value::String(instant(now)),
        entries.join(",")
    )
}

/// `$status`: a searchset holding the subscription's status.
pub fn status_searchset(s: &Subscription, base: &str) -> Value {
    json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 1,
        "entry": [{
            "fullUrl": format!("{base}/Subscription/{}/$status", s.id),
            "resource": status_parameters(s, NotificationType::QueryStatus, &[], base),
            "search": { "mode": "match" },
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    pub(crate) fn sample(endpoint: &str, criteria: &[&str]) -> Value {
        let filters: Vec<Value> =
            criteria.iter().map(|c| json!({ "url": ext_url("backport-filter-criteria"), "valueString": c })).collect();
        json!({
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "Crisis plans for patients in our care",
            "criteria": TOPIC,
            "_criteria": { "extension": filters },
            "channel": {
                "type": "rest-hook",
                "endpoint": endpoint,
                "payload": "application/fhir+json",
                "_payload": { "extension": [{ "url": ext_url("backport-payload-content"), "valueCode": "full-resource" }] },
                "extension": [{ "url": ext_url("backport-heartbeat-period"), "valueUnsignedInt": 30 }],
            },
        })
    }

    #[test]
    fn a_backport_subscription_parses_and_renders_back() {
        let s = parse_subscription(&body(sample(
            "https://hooks.example.nhs.uk:8443/fhir/notify",
            &["DocumentReference?subject:identifier=https://fhir.nhs.uk/Id/nhs-number|9000000009&type=http://snomed.info/sct|736253002"],
        )))
        .unwrap();
        assert_eq!(s.endpoint_host, "hooks.example.nhs.uk");
        assert_eq!(s.filter.subject.unwrap().as_str(), "9000000009");
        assert_eq!(s.filter.type_code.as_ref().unwrap().as_str(), "736253002");
        assert_eq!((s.content, s.heartbeat_secs), (PayloadContent::FullResource, Some(30)));
    }

    #[test]
    fn what_is_refused_is_named() {
        let refused = |v: Value, needle: &str| {
            let e = parse_subscription(&body(v)).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} should name {needle}");
        };
        refused(sample("http://hooks.example.nhs.uk/n", &[]), "https");
        let mut v = sample("https://h.example/n", &[]);
        v["criteria"] = json!("urn:other:topic");
        refused(v, "topic");
        refused(sample("https://h.example/n", &["DocumentReference?status=current"]), "not supported");
        refused(sample("https://h.example/n", &["DocumentReference?subject:identifier=12"]), "NHS");
        let mut v = sample("https://h.example/n", &[]);
        v["channel"]["type"] = json!("websocket");
        refused(v, "rest-hook");
        let mut v = sample("https://h.example/n", &[]);
        v["channel"]["header"] = json!(["Authorization: x"]);
        refused(v, "header");
        assert!(matches!(parse_subscription(b"{"), Err(FhirError::NotWellFormed(_))));
        assert!(https_host("https://user@h/").is_err());
        assert_eq!(https_host("https://[::1]:9/x").unwrap(), "::1");
        assert_eq!(https_host("https://127.0.0.1:9443/x").unwrap(), "127.0.0.1");
    }
}
