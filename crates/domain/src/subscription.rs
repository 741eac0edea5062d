//! Change notifications: subscriptions to the `pointer-changed` topic and
//! the events they are owed.
//!
//! Events are made when a change is applied, so every replica numbers them
//! the same way (from 1, without gaps, per subscription) and any node can
//! deliver them from its own replica: a deliverer that dies loses nothing,
//! its successor resumes after the last event the endpoint acknowledged
//! (`acked`, replicated by [`CommandV1::SubscriptionProgress`]).

use serde::{Deserialize, Serialize};

use crate::apply::{ApplyError, ApplyResult, StateTxn, forbidden, survivor};
use crate::command::{Caller, Outcome, Rejection, Role};
use crate::ids::{NhsNumber, OdsCode, PointerId, SnomedCode};
use crate::model::{RecordPointer, Timestamp};

/// The one topic.
pub const TOPIC: &str = "urn:hie:SubscriptionTopic:pointer-changed";

/// A subscription's id: FHIR's id alphabet, chosen by the node that accepted it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SubscriptionId(String);

impl SubscriptionId {
    pub fn parse(s: &str) -> Option<SubscriptionId> {
        let ok =
            !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        ok.then(|| SubscriptionId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SubscriptionId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        SubscriptionId::parse(&s).ok_or_else(|| "not a subscription id".to_owned())
    }
}

impl From<SubscriptionId> for String {
    fn from(id: SubscriptionId) -> String {
        id.0
    }
}

impl std::fmt::Display for SubscriptionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the topic's filters ask for, combined with AND; none: every change
/// the owner may read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionFilter {
    pub subject: Option<NhsNumber>,
    pub type_code: Option<SnomedCode>,
    pub custodian: Option<OdsCode>,
}

impl SubscriptionFilter {
    fn matches(&self, pointer: &RecordPointer, also_subject: Option<&NhsNumber>) -> bool {
        self.subject.as_ref().is_none_or(|s| *s == pointer.subject || Some(s) == also_subject)
            && self.type_code.as_ref().is_none_or(|t| *t == pointer.type_code)
            && self.custodian.as_ref().is_none_or(|c| *c == pointer.custodian)
    }

    /// The one key the subscription is found by: its most selective filter.
    fn key(&self) -> String {
        match (&self.subject, &self.custodian, &self.type_code) {
            (Some(s), _, _) => subject_key(s),
            (None, Some(c), _) => format!("c:{c}"),
            (None, None, Some(t)) => format!("t:{t}"),
            (None, None, None) => ALL_KEY.to_owned(),
        }
    }
}

fn subject_key(subject: &NhsNumber) -> String {
    format!("s:{}", subject.as_str())
}

fn owner_key(owner: &OdsCode) -> String {
    format!("o:{owner}")
}

const ALL_KEY: &str = "*";

/// How much of the focus a notification carries (the backport's
/// `backport-payload-content`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PayloadContent {
    Empty,
    #[default]
    IdOnly,
    FullResource,
}

impl PayloadContent {
    pub fn as_str(self) -> &'static str {
        match self {
            PayloadContent::Empty => "empty",
            PayloadContent::IdOnly => "id-only",
            PayloadContent::FullResource => "full-resource",
        }
    }

    pub fn parse(s: &str) -> Option<PayloadContent> {
        [PayloadContent::Empty, PayloadContent::IdOnly, PayloadContent::FullResource]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

/// FHIR's subscription status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SubscriptionStatus {
    /// Waiting for its handshake.
    #[default]
    Requested,
    Active,
    /// Delivery is failing (it is still tried), or events were dropped
    /// before the endpoint acknowledged them.
    Error,
    Off,
}

impl SubscriptionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Requested => "requested",
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::Error => "error",
            SubscriptionStatus::Off => "off",
        }
    }
}

/// A subscription as replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub id: SubscriptionId,
    /// The consumer organisation that made it: the only one that may read or
    /// delete it, and whose read rules decide which changes it hears of.
    pub owner: OdsCode,
    pub reason: String,
    pub filter: SubscriptionFilter,
    /// The filter criteria as sent (rendered back on a read).
    pub criteria: Vec<String>,
    pub endpoint: String,
    pub content: PayloadContent,
    pub heartbeat_secs: Option<u32>,
    pub timeout_secs: Option<u32>,
    /// Most events in one notification.
    pub max_count: Option<u32>,
    pub status: SubscriptionStatus,
    pub created: Timestamp,
    /// Events made so far (the number of the newest).
    pub events: u64,
    /// The newest event the endpoint acknowledged (as last replicated).
    pub acked: u64,
    /// Why the status is `error`, when it is.
    pub error: Option<String>,
}

impl Subscription {
    /// Events kept per subscription for delivery and `$events`; an older
    /// one is removed as a new one is made (and if it was not yet
    /// acknowledged, the subscription says so: status `error`).
    pub const EVENTS_RETAINED: u64 = 1_000;
    /// Subscriptions one organisation may hold.
    pub const PER_OWNER_MAX: usize = 10_000;
    /// A reason or an endpoint longer than this is refused.
    pub const TEXT_BYTES_MAX: usize = 1_024;
    /// Most events in one notification when the subscriber asks for none.
    pub const MAX_COUNT_DEFAULT: u32 = 100;
    /// The least heartbeat period honoured, in seconds.
    pub const HEARTBEAT_SECS_MIN: u32 = 1;

    /// The oldest event still retained (1 when none was dropped).
    pub fn first_retained(&self) -> u64 {
        self.events.saturating_sub(Self::EVENTS_RETAINED) + 1
    }
}

/// What happened to the focus pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    Created,
    Updated,
    Superseded,
    Deleted,
    /// Moved to the surviving NHS Number by a merge.
    Merged,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Created => "created",
            Change::Updated => "updated",
            Change::Superseded => "superseded",
            Change::Deleted => "deleted",
            Change::Merged => "merged",
        }
    }
}

/// One event a subscription is owed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionEvent {
    pub number: u64,
    pub at: Timestamp,
    pub focus: PointerId,
    /// The patient the focus belongs to (after the change).
    pub subject: NhsNumber,
    pub change: Change,
}

/// A deliverer's report of one subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub id: SubscriptionId,
    /// The newest event the endpoint acknowledged.
    pub acked: u64,
    pub status: SubscriptionStatus,
    pub error: Option<String>,
}

pub(crate) fn create<T: StateTxn>(txn: &mut T, caller: &Caller, sent: &Subscription) -> ApplyResult<Outcome, T::Error> {
    if !caller.has(Role::Consumer) {
        return Ok(forbidden("only a consumer may subscribe"));
    }
    if sent.owner != caller.ods {
        return Ok(forbidden("a subscription belongs to the organisation that makes it"));
    }
    if txn.subscription(&sent.id).map_err(ApplyError::Storage)?.is_some() {
        return Ok(Outcome::Rejected(Rejection::Invalid {
            reason: format!("subscription {} already exists", sent.id),
        }));
    }
    let owned = txn.subscription_keys(&owner_key(&sent.owner)).map_err(ApplyError::Storage)?.len();
    if owned >= Subscription::PER_OWNER_MAX {
        return Ok(Outcome::Rejected(Rejection::Invalid {
            reason: format!("an organisation may hold at most {} subscriptions", Subscription::PER_OWNER_MAX),
        }));
    }
    let mut sub = sent.clone();
    // A retired number is followed to its survivor.
    if let Some(subject) = &sub.filter.subject {
        sub.filter.subject = Some(survivor(txn, subject)?.0);
    }
    sub.status = SubscriptionStatus::Requested;
    sub.events = 0;
    sub.acked = 0;
    sub.error = None;
    txn.put_subscription(&sub);
    txn.put_subscription_key(&sub.filter.key(), &sub.id);
    txn.put_subscription_key(&owner_key(&sub.owner), &sub.id);
    Ok(Outcome::SubscriptionCreated { subscription: sub })
}

pub(crate) fn delete<T: StateTxn>(txn: &mut T, caller: &Caller, id: &SubscriptionId) -> ApplyResult<Outcome, T::Error> {
    let Some(sub) = txn.subscription(id).map_err(ApplyError::Storage)? else {
        return Ok(Outcome::Rejected(Rejection::SubscriptionNotFound));
    };
    if sub.owner != caller.ods {
        // The same answer as for one that does not exist.
        return Ok(Outcome::Rejected(Rejection::SubscriptionNotFound));
    }
    txn.delete_subscription(id);
    txn.delete_subscription_key(&sub.filter.key(), id);
    txn.delete_subscription_key(&owner_key(&sub.owner), id);
    // One point delete per retained event (at most EVENTS_RETAINED): a
    // range delete would leave a tombstone that every later lookup of
    // subscriptions has to step over.
    for n in sub.first_retained()..=sub.events {
        txn.delete_subscription_event(id, n);
    }
    Ok(Outcome::Done)
}

pub(crate) fn progress<T: StateTxn>(txn: &mut T, updates: &[Progress]) -> ApplyResult<Outcome, T::Error> {
    for p in updates {
        let Some(mut sub) = txn.subscription(&p.id).map_err(ApplyError::Storage)? else {
            continue;
        };
        let acked = sub.acked.max(p.acked.min(sub.events));
        let dropped = dropped_unacked(&sub);
        let (status, error) = match dropped {
            // Events lost before delivery stay visible until delivery catches up past them.
            Some(e) if acked < sub.first_retained() => (SubscriptionStatus::Error, Some(e)),
            _ => (p.status, p.error.clone()),
        };
        if sub.status == SubscriptionStatus::Off || (acked, status, &error) == (sub.acked, sub.status, &sub.error) {
            continue;
        }
        sub.acked = acked;
        sub.status = status;
        sub.error = error;
        txn.put_subscription(&sub);
    }
    Ok(Outcome::Done)
}

/// Why events are missing, if some were dropped before the endpoint took them.
fn dropped_unacked(sub: &Subscription) -> Option<String> {
    let first = sub.first_retained();
    (sub.acked + 1 < first).then(|| {
        format!(
            "events {} to {} were dropped before the endpoint acknowledged them: at most {} are kept",
            sub.acked + 1,
            first - 1,
            Subscription::EVENTS_RETAINED
        )
    })
}

/// Makes an event for every subscription that hears of `pointer`'s change:
/// its filters match (`also_subject`: the number a merge retired), the
/// patient has not opted out, and its owner may read the pointer's type.
pub(crate) fn pointer_changed<T: StateTxn>(
    txn: &mut T,
    pointer: &RecordPointer,
    also_subject: Option<&NhsNumber>,
    change: Change,
    at: Timestamp,
) -> ApplyResult<(), T::Error> {
    let mut keys = vec![
        subject_key(&pointer.subject),
        format!("c:{}", pointer.custodian),
        format!("t:{}", pointer.type_code),
        ALL_KEY.to_owned(),
    ];
    if let Some(s) = also_subject {
        keys.push(subject_key(s));
    }
    let mut ids = std::collections::BTreeSet::new();
    for key in &keys {
        ids.extend(txn.subscription_keys(key).map_err(ApplyError::Storage)?);
    }
    if ids.is_empty() {
        return Ok(());
    }
    let opted_out = txn.patient(&pointer.subject).map_err(ApplyError::Storage)?.is_some_and(|p| p.opted_out);
    if opted_out {
        return Ok(());
    }
    for id in ids {
        let Some(mut sub) = txn.subscription(&id).map_err(ApplyError::Storage)? else {
            return Err(crate::apply::InvariantBroken(format!("the subscription index names a missing {id}")).into());
        };
        if sub.status == SubscriptionStatus::Off || !sub.filter.matches(pointer, also_subject) {
            continue;
        }
        let consumer = txn.consumer(&sub.owner).map_err(ApplyError::Storage)?.unwrap_or_default();
        if !consumer.allowed_types.as_ref().is_none_or(|t| t.contains(&pointer.type_code)) {
            continue;
        }
        sub.events += 1;
        let event =
            SubscriptionEvent { number: sub.events, at, focus: pointer.id.clone(), subject: pointer.subject, change };
        txn.put_subscription_event(&id, &event);
        if sub.events > Subscription::EVENTS_RETAINED {
            txn.delete_subscription_event(&id, sub.events - Subscription::EVENTS_RETAINED);
        }
        if let Some(e) = dropped_unacked(&sub) {
            sub.status = SubscriptionStatus::Error;
            sub.error = Some(e);
        }
        txn.put_subscription(&sub);
    }
    Ok(())
}

/// A merge retired `source` into `target`: subscriptions on the retired
/// number follow the survivor.
pub(crate) fn subject_merged<T: StateTxn>(
    txn: &mut T,
    source: &NhsNumber,
    target: &NhsNumber,
) -> ApplyResult<(), T::Error> {
    let (from, to) = (subject_key(source), subject_key(target));
    for id in txn.subscription_keys(&from).map_err(ApplyError::Storage)? {
        let Some(mut sub) = txn.subscription(&id).map_err(ApplyError::Storage)? else {
            return Err(crate::apply::InvariantBroken(format!("the subscription index names a missing {id}")).into());
        };
        sub.filter.subject = Some(*target);
        txn.put_subscription(&sub);
        txn.delete_subscription_key(&from, &id);
        txn.put_subscription_key(&to, &id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{
        Change, PayloadContent, Progress, Subscription, SubscriptionFilter, SubscriptionId, SubscriptionStatus,
    };
    use crate::apply::apply;
    use crate::command::{Command, CommandV1, Outcome, Rejection, Role};
    use crate::ids::{OdsCode, PointerId};
    use crate::mem::MemState;
    use crate::mem::testkit::*;
    use crate::model::Timestamp;

    fn state() -> MemState {
        let mut s = MemState::default();
        for c in registry_commands(&["A81001", "RR8"]) {
            assert_eq!(apply(&mut s, &c).unwrap(), Outcome::Done);
        }
        s
    }

    fn subscribe(s: &mut MemState, id: &str, owner: &str, filter: SubscriptionFilter) -> Subscription {
        let sub = Subscription {
            id: SubscriptionId::parse(id).unwrap(),
            owner: OdsCode::parse(owner).unwrap(),
            reason: "test".into(),
            filter,
            criteria: vec![],
            endpoint: "https://127.0.0.1:1/hook".into(),
            content: PayloadContent::IdOnly,
            heartbeat_secs: None,
            timeout_secs: None,
            max_count: None,
            status: SubscriptionStatus::Requested,
            created: Timestamp(0),
            events: 0,
            acked: 0,
            error: None,
        };
        let c =
            Command::V1(CommandV1::CreateSubscription { caller: caller(owner, &[Role::Consumer]), subscription: sub });
        match apply(s, &c).unwrap() {
            Outcome::SubscriptionCreated { subscription } => subscription,
            other => panic!("{other:?}"),
        }
    }

    fn events(s: &MemState, id: &str) -> Vec<(u64, String, Change)> {
        s.subscription_events
            .iter()
            .filter(|((i, _), _)| i.as_str() == id)
            .map(|(_, e)| (e.number, e.focus.as_str().to_owned(), e.change))
            .collect()
    }

    #[test]
    fn events_are_numbered_per_subscription_for_the_subjects_changes_only() {
        let mut s = state();
        subscribe(&mut s, "one", "Y01", SubscriptionFilter { subject: Some(nhs(1)), ..Default::default() });
        subscribe(&mut s, "all", "Y01", SubscriptionFilter::default());
        apply(&mut s, &create("A81001", pointer("A81001", "a", nhs(1), 1))).unwrap();
        apply(&mut s, &create("A81001", pointer("A81001", "b", nhs(2), 2))).unwrap();
        let mut replacing = pointer("A81001", "c", nhs(1), 3);
        replacing.replaces = Some(PointerId::parse("A81001-a").unwrap());
        apply(&mut s, &create("A81001", replacing)).unwrap();
        apply(&mut s, &delete("A81001", "A81001-c", 4)).unwrap();
        assert_eq!(
            events(&s, "one"),
            vec![
                (1, "A81001-a".into(), Change::Created),
                (2, "A81001-c".into(), Change::Created),
                (3, "A81001-a".into(), Change::Superseded),
                (4, "A81001-c".into(), Change::Deleted),
            ]
        );
        // Every event in order, from 1, without gaps.
        let numbers: Vec<u64> = events(&s, "all").iter().map(|e| e.0).collect();
        assert_eq!(numbers, vec![1, 2, 3, 4, 5]);
        assert_eq!(s.subscriptions[&SubscriptionId::parse("one").unwrap()].events, 4);
    }

    #[test]
    fn an_opted_out_patient_and_an_unreadable_type_make_no_event() {
        let mut s = state();
        subscribe(&mut s, "one", "Y01", SubscriptionFilter { subject: Some(nhs(1)), ..Default::default() });
        apply(&mut s, &consent(nhs(1), true, 0)).unwrap();
        apply(&mut s, &create("A81001", pointer("A81001", "a", nhs(1), 1))).unwrap();
        assert!(events(&s, "one").is_empty());
        // A consumer allowed only one type hears nothing of another.
        apply(&mut s, &consumer_types("Y02", &["736373009"])).unwrap();
        subscribe(&mut s, "two", "Y02", SubscriptionFilter { subject: Some(nhs(2)), ..Default::default() });
        apply(&mut s, &create("A81001", pointer("A81001", "b", nhs(2), 2))).unwrap();
        assert!(events(&s, "two").is_empty());
    }

    #[test]
    fn a_merge_makes_events_and_the_subscription_follows_the_survivor() {
        let mut s = state();
        apply(&mut s, &create("A81001", pointer("A81001", "a", nhs(1), 1))).unwrap();
        subscribe(&mut s, "one", "Y01", SubscriptionFilter { subject: Some(nhs(1)), ..Default::default() });
        assert_eq!(apply(&mut s, &merge(nhs(1), nhs(2), 2)).unwrap(), Outcome::Merged { moved: 1 });
        assert_eq!(events(&s, "one"), vec![(1, "A81001-a".into(), Change::Merged)]);
        assert_eq!(s.subscriptions[&SubscriptionId::parse("one").unwrap()].filter.subject, Some(nhs(2)));
        apply(&mut s, &create("A81001", pointer("A81001", "b", nhs(2), 3))).unwrap();
        assert_eq!(events(&s, "one").len(), 2, "a change under the survivor is heard");
    }

    #[test]
    fn retention_drops_the_oldest_and_says_so_when_unacknowledged() {
        let mut s = state();
        subscribe(&mut s, "one", "Y01", SubscriptionFilter::default());
        let n = Subscription::EVENTS_RETAINED + 2;
        for i in 0..n {
            apply(&mut s, &create("A81001", pointer("A81001", &format!("p{i}"), nhs(1), i as i64))).unwrap();
        }
        let sub = &s.subscriptions[&SubscriptionId::parse("one").unwrap()];
        assert_eq!(sub.events, n);
        assert_eq!(events(&s, "one").first().map(|e| e.0), Some(3));
        assert_eq!(sub.status, SubscriptionStatus::Error);
        assert!(sub.error.as_deref().unwrap().contains("events 1 to 2"));
        // Progress past the gap clears the error.
        let progress = Command::V1(CommandV1::SubscriptionProgress {
            updates: vec![Progress { id: sub.id.clone(), acked: n, status: SubscriptionStatus::Active, error: None }],
        });
        apply(&mut s, &progress).unwrap();
        let sub = &s.subscriptions[&SubscriptionId::parse("one").unwrap()];
        assert_eq!((sub.acked, sub.status, sub.error.clone()), (n, SubscriptionStatus::Active, None));
    }

    #[test]
    fn only_the_owner_deletes_and_only_a_consumer_subscribes() {
        let mut s = state();
        subscribe(&mut s, "one", "Y01", SubscriptionFilter::default());
        let id = SubscriptionId::parse("one").unwrap();
        let by_other =
            Command::V1(CommandV1::DeleteSubscription { caller: caller("Y02", &[Role::Consumer]), id: id.clone() });
        assert_eq!(apply(&mut s, &by_other).unwrap(), Outcome::Rejected(Rejection::SubscriptionNotFound));
        let by_owner = Command::V1(CommandV1::DeleteSubscription { caller: caller("Y01", &[Role::Consumer]), id });
        assert_eq!(apply(&mut s, &by_owner).unwrap(), Outcome::Done);
        assert!(s.subscriptions.is_empty() && s.subscription_keys.is_empty());
        let mut sub = subscribe(&mut s, "two", "Y01", SubscriptionFilter::default());
        sub.id = SubscriptionId::parse("three").unwrap();
        sub.owner = OdsCode::parse("A81001").unwrap();
        let c = Command::V1(CommandV1::CreateSubscription {
            caller: caller("A81001", &[Role::Producer]),
            subscription: sub,
        });
        assert!(matches!(apply(&mut s, &c).unwrap(), Outcome::Rejected(Rejection::Forbidden { .. })));
    }
}
