//! An in-memory state, beside the RocksDB one: for fast tests and the
//! deterministic simulation. It implements the same [`StateTxn`].

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;

use crate::apply::StateTxn;
use crate::ids::{NhsNumber, OdsCode, PointerId, SnomedCode};
use crate::model::{
    AssigningAuthority, AuditAnchor, ConsumerEntry, Identifier, PagingKey, PatientEntry, PointerType, ProducerEntry,
    RecordPointer,
};
use crate::query::{Scanned, StateRead};
use crate::subscription::{Subscription, SubscriptionEvent, SubscriptionId};

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemState {
    pub pointers: BTreeMap<PointerId, RecordPointer>,
    pub patients: BTreeMap<NhsNumber, PatientEntry>,
    pub index: BTreeSet<(NhsNumber, PointerId)>,
    pub idempotency: BTreeMap<(OdsCode, String), PointerId>,
    pub types: BTreeMap<SnomedCode, PointerType>,
    pub producers: BTreeMap<OdsCode, ProducerEntry>,
    pub consumers: BTreeMap<OdsCode, ConsumerEntry>,
    /// Past versions of pointers, by id and version.
    pub past: BTreeMap<(PointerId, u64), RecordPointer>,
    pub paging_key: Option<PagingKey>,
    /// Local identifiers to the NHS Numbers they name.
    #[serde(default)]
    pub local_ids: BTreeMap<Identifier, NhsNumber>,
    /// Identifier systems to the organisations that assign them.
    #[serde(default)]
    pub authorities: BTreeMap<String, OdsCode>,
    /// Each node's audit chain head, as last anchored.
    #[serde(default)]
    pub audit_anchors: BTreeMap<u64, AuditAnchor>,
    #[serde(default)]
    pub subscriptions: BTreeMap<SubscriptionId, Subscription>,
    /// `(key, id)`: each subscription under its filter's key and its owner's.
    #[serde(default)]
    pub subscription_keys: BTreeSet<(String, SubscriptionId)>,
    #[serde(default)]
    pub subscription_events: BTreeMap<(SubscriptionId, u64), SubscriptionEvent>,
}

impl MemState {
    /// The current pointers of a patient, in id order.
    pub fn current_pointers(&self, subject: &NhsNumber) -> Vec<&RecordPointer> {
        // A linear scan: this state is for tests and simulation, not scale.
        self.index.iter().filter(|(s, _)| s == subject).filter_map(|(_, id)| self.pointers.get(id)).collect()
    }
}

impl StateTxn for MemState {
    type Error = Infallible;

    fn pointer(&mut self, id: &PointerId) -> Result<Option<RecordPointer>, Infallible> {
        Ok(self.pointers.get(id).cloned())
    }
    fn put_pointer(&mut self, pointer: &RecordPointer) {
        self.pointers.insert(pointer.id.clone(), pointer.clone());
    }
    fn delete_pointer(&mut self, id: &PointerId) {
        self.pointers.remove(id);
    }
    fn patient(&mut self, subject: &NhsNumber) -> Result<Option<PatientEntry>, Infallible> {
        Ok(self.patients.get(subject).cloned())
    }
    fn put_patient(&mut self, subject: &NhsNumber, entry: &PatientEntry) {
        self.patients.insert(*subject, entry.clone());
    }
    fn delete_patient(&mut self, subject: &NhsNumber) {
        self.patients.remove(subject);
    }
    fn index_add(&mut self, pointer: &RecordPointer) {
        self.index.insert((pointer.subject, pointer.id.clone()));
    }
    fn index_remove(&mut self, subject: &NhsNumber, id: &PointerId) {
        self.index.remove(&(*subject, id.clone()));
    }
    fn index_ids(&mut self, subject: &NhsNumber, limit: usize) -> Result<Vec<PointerId>, Infallible> {
        Ok(self.index.iter().filter(|(s, _)| s == subject).map(|(_, id)| id.clone()).take(limit).collect())
    }
    fn local_id(&mut self, id: &Identifier) -> Result<Option<NhsNumber>, Infallible> {
        Ok(self.local_ids.get(id).copied())
    }
    fn put_local_id(&mut self, id: &Identifier, subject: &NhsNumber) {
        self.local_ids.insert(id.clone(), *subject);
    }
    fn delete_local_id(&mut self, id: &Identifier) {
        self.local_ids.remove(id);
    }
    fn authority(&mut self, system: &str) -> Result<Option<OdsCode>, Infallible> {
        Ok(self.authorities.get(system).cloned())
    }
    fn put_authority(&mut self, entry: &AssigningAuthority) {
        self.authorities.insert(entry.system.clone(), entry.ods.clone());
    }
    fn delete_authority(&mut self, system: &str) {
        self.authorities.remove(system);
    }
    fn idempotency(&mut self, custodian: &OdsCode, key: &str) -> Result<Option<PointerId>, Infallible> {
        Ok(self.idempotency.get(&(custodian.clone(), key.to_owned())).cloned())
    }
    fn put_idempotency(&mut self, custodian: &OdsCode, key: &str, id: &PointerId) {
        self.idempotency.insert((custodian.clone(), key.to_owned()), id.clone());
    }
    fn delete_idempotency(&mut self, custodian: &OdsCode, key: &str) {
        self.idempotency.remove(&(custodian.clone(), key.to_owned()));
    }
    fn pointer_type(&mut self, code: &SnomedCode) -> Result<Option<PointerType>, Infallible> {
        Ok(self.types.get(code).cloned())
    }
    fn put_pointer_type(&mut self, entry: &PointerType) {
        self.types.insert(entry.code.clone(), entry.clone());
    }
    fn producer(&mut self, ods: &OdsCode) -> Result<Option<ProducerEntry>, Infallible> {
        Ok(self.producers.get(ods).cloned())
    }
    fn put_producer(&mut self, ods: &OdsCode, entry: &ProducerEntry) {
        self.producers.insert(ods.clone(), entry.clone());
    }
    fn consumer(&mut self, ods: &OdsCode) -> Result<Option<ConsumerEntry>, Infallible> {
        Ok(self.consumers.get(ods).cloned())
    }
    fn put_consumer(&mut self, ods: &OdsCode, entry: &ConsumerEntry) {
        self.consumers.insert(ods.clone(), entry.clone());
    }
    fn delete_consumer(&mut self, ods: &OdsCode) {
        self.consumers.remove(ods);
    }
    fn put_past_version(&mut self, pointer: &RecordPointer) {
        self.past.insert((pointer.id.clone(), pointer.version), pointer.clone());
    }
    fn delete_past_version(&mut self, id: &PointerId, version: u64) {
        self.past.remove(&(id.clone(), version));
    }
    fn delete_past_versions(&mut self, id: &PointerId) {
        self.past.retain(|(i, _), _| i != id);
    }
    fn paging_key(&mut self) -> Result<Option<PagingKey>, Infallible> {
        Ok(self.paging_key.clone())
    }
    fn put_paging_key(&mut self, key: &PagingKey) {
        self.paging_key = Some(key.clone());
    }
    fn audit_anchor(&mut self, node: u64) -> Result<Option<AuditAnchor>, Infallible> {
        Ok(self.audit_anchors.get(&node).cloned())
    }
    fn put_audit_anchor(&mut self, anchor: &AuditAnchor) {
        self.audit_anchors.insert(anchor.node, anchor.clone());
    }
    fn subscription(&mut self, id: &SubscriptionId) -> Result<Option<Subscription>, Infallible> {
        Ok(self.subscriptions.get(id).cloned())
    }
    fn put_subscription(&mut self, subscription: &Subscription) {
        self.subscriptions.insert(subscription.id.clone(), subscription.clone());
    }
    fn delete_subscription(&mut self, id: &SubscriptionId) {
        self.subscriptions.remove(id);
    }
    fn subscription_keys(&mut self, key: &str) -> Result<Vec<SubscriptionId>, Infallible> {
        Ok(self.subscription_keys.iter().filter(|(k, _)| k == key).map(|(_, id)| id.clone()).collect())
    }
    fn put_subscription_key(&mut self, key: &str, id: &SubscriptionId) {
        self.subscription_keys.insert((key.to_owned(), id.clone()));
    }
    fn delete_subscription_key(&mut self, key: &str, id: &SubscriptionId) {
        self.subscription_keys.remove(&(key.to_owned(), id.clone()));
    }
    fn put_subscription_event(&mut self, id: &SubscriptionId, event: &SubscriptionEvent) {
        self.subscription_events.insert((id.clone(), event.number), event.clone());
    }
    fn delete_subscription_event(&mut self, id: &SubscriptionId, number: u64) {
        self.subscription_events.remove(&(id.clone(), number));
    }
}

impl StateRead for MemState {
    type Error = Infallible;

    fn pointer(&self, id: &PointerId) -> Result<Option<RecordPointer>, Infallible> {
        Ok(self.pointers.get(id).cloned())
    }
    fn patient(&self, subject: &NhsNumber) -> Result<Option<PatientEntry>, Infallible> {
        Ok(self.patients.get(subject).cloned())
    }
    fn consumer(&self, ods: &OdsCode) -> Result<Option<ConsumerEntry>, Infallible> {
        Ok(self.consumers.get(ods).cloned())
    }
    fn pointer_types(&self) -> Result<Vec<PointerType>, Infallible> {
        Ok(self.types.values().cloned().collect())
    }
    fn paging_key(&self) -> Result<Option<PagingKey>, Infallible> {
        Ok(self.paging_key.clone())
    }
    fn subscription(&self, id: &SubscriptionId) -> Result<Option<Subscription>, Infallible> {
        Ok(self.subscriptions.get(id).cloned())
    }
    fn subscriptions(&self, limit: usize) -> Result<Vec<Subscription>, Infallible> {
        Ok(self.subscriptions.values().take(limit).cloned().collect())
    }
    fn subscription_events(
        &self,
        id: &SubscriptionId,
        from: u64,
        until: u64,
        limit: usize,
    ) -> Result<Vec<SubscriptionEvent>, Infallible> {
        if from > until {
            return Ok(vec![]);
        }
        Ok(self
            .subscription_events
            .range((id.clone(), from)..=(id.clone(), until))
            .map(|(_, e)| e.clone())
            .take(limit)
            .collect())
    }
    fn audit_anchors(&self) -> Result<Vec<AuditAnchor>, Infallible> {
        Ok(self.audit_anchors.values().cloned().collect())
    }
    fn past_version(&self, id: &PointerId, version: u64) -> Result<Option<RecordPointer>, Infallible> {
        Ok(self.past.get(&(id.clone(), version)).cloned())
    }
    fn local_id(&self, id: &Identifier) -> Result<Option<NhsNumber>, Infallible> {
        Ok(self.local_ids.get(id).copied())
    }
    fn authority(&self, system: &str) -> Result<Option<OdsCode>, Infallible> {
        Ok(self.authorities.get(system).cloned())
    }
    fn past_versions(&self, id: &PointerId, limit: usize) -> Result<Vec<RecordPointer>, Infallible> {
        let range = (id.clone(), 0)..=(id.clone(), u64::MAX);
        Ok(self.past.range(range).rev().take(limit).map(|(_, p)| p.clone()).collect())
    }
    fn scan(
        &self,
        subject: &NhsNumber,
        after: Option<&PointerId>,
        limit: usize,
        scan_max: usize,
        keep: &mut dyn FnMut(&str, &str) -> bool,
    ) -> Result<Scanned, Infallible> {
        // A linear scan, as in `current_pointers`.
        let mut out = Scanned::default();
        let mut looked: Option<&PointerId> = None;
        let entries = self.index.iter().filter(|(s, id)| s == subject && after.is_none_or(|a| id > a));
        for (n, (_, id)) in entries.enumerate() {
            if n == scan_max.max(1) {
                out.resume_after = looked.cloned();
                return Ok(out);
            }
            looked = Some(id);
            let p = &self.pointers[id];
            if keep(p.custodian.as_str(), p.type_code.as_str()) {
                if out.pointers.len() == limit {
                    out.resume_after = out.pointers.last().map(|p| p.id.clone());
                    return Ok(out);
                }
                out.pointers.push(p.clone());
            }
        }
        Ok(out)
    }
}

/// Builders of sample data for tests in every crate (test NHS Numbers begin with 9).
pub mod testkit {
    use std::collections::BTreeSet;

    use crate::command::{Caller, Command, CommandV1, Role};
    use crate::ids::{NhsNumber, OdsCode, PointerId, SnomedCode};
    use crate::model::{Identifier, PointerBody, PointerStatus, PointerType, RecordPointer, Timestamp};

    pub const MENTAL_HEALTH_CRISIS_PLAN: &str = "736253002";
    pub const END_OF_LIFE_CARE_PLAN: &str = "736373009";
    pub const CARE_PLAN_CATEGORY: &str = "734163000";
    pub const NEWS2_CHART: &str = "1363501000000100";
    pub const OBSERVATIONS_CATEGORY: &str = "1102421000000108";

    /// The i-th valid test NHS Number (all begin with 9; distinct for i below ten million).
    pub fn nhs(i: u32) -> NhsNumber {
        assert!(i < 10_000_000, "testkit numbers run out at ten million");
        // Eight digits from i, then whichever ninth digit has a check digit:
        // the ninth has weight 2, so of two neighbouring choices one works.
        let prefix = 90_000_000 + i;
        (0..10)
            .find_map(|d| NhsNumber::from_stem(prefix * 10 + d))
            .expect("one of ten ninth digits gives a valid number")
    }

    pub fn ods(s: &str) -> OdsCode {
        OdsCode::parse(s).unwrap()
    }

    pub fn snomed(s: &str) -> SnomedCode {
        SnomedCode::parse(s).unwrap()
    }

    pub fn caller(ods_code: &str, roles: &[Role]) -> Caller {
        Caller { ods: ods(ods_code), roles: roles.iter().copied().collect::<BTreeSet<_>>() }
    }

    pub fn operator() -> Caller {
        caller("X26", &[Role::Operator])
    }

    /// The commands that register three types (two care plans and the
    /// NEWS2 chart, an observation) and allow `producers` all three.
    pub fn registry_commands(producers: &[&str]) -> Vec<Command> {
        let mut out = vec![];
        for (code, display, category, category_display) in [
            (MENTAL_HEALTH_CRISIS_PLAN, "Mental health crisis plan", CARE_PLAN_CATEGORY, "Care plan"),
            (END_OF_LIFE_CARE_PLAN, "End of life care plan", CARE_PLAN_CATEGORY, "Care plan"),
            (NEWS2_CHART, "NEWS2 chart", OBSERVATIONS_CATEGORY, "Observations"),
        ] {
            out.push(Command::V1(CommandV1::PutPointerType {
                caller: operator(),
                entry: PointerType {
                    code: snomed(code),
                    display: display.into(),
                    category: snomed(category),
                    category_display: category_display.into(),
                },
            }));
        }
        for p in producers {
            out.push(Command::V1(CommandV1::SetProducerTypes {
                caller: operator(),
                ods: ods(p),
                types: vec![snomed(MENTAL_HEALTH_CRISIS_PLAN), snomed(END_OF_LIFE_CARE_PLAN), snomed(NEWS2_CHART)],
                permissions: Default::default(),
            }));
        }
        out
    }

    /// A pointer's type and category set together.
    pub fn with_type(mut p: RecordPointer, code: &str) -> RecordPointer {
        p.type_code = snomed(code);
        p.category = snomed(if code == NEWS2_CHART { OBSERVATIONS_CATEGORY } else { CARE_PLAN_CATEGORY });
        let url = p.body.member("content").and_then(|c| c[0]["attachment"]["url"].as_str().map(str::to_owned));
        p.body = body_of(&p, &url.unwrap_or_default());
        p
    }

    pub fn pointer(custodian: &str, local: &str, subject: NhsNumber, at: i64) -> RecordPointer {
        let mut p = RecordPointer {
            id: PointerId::parse(&format!("{custodian}-{local}")).unwrap(),
            version: 1,
            subject,
            custodian: ods(custodian),
            type_code: snomed(MENTAL_HEALTH_CRISIS_PLAN),
            category: snomed(CARE_PLAN_CATEGORY),
            master_identifier: Some(Identifier {
                system: "urn:ietf:rfc:3986".into(),
                value: format!("urn:oid:{local}"),
            }),
            status: PointerStatus::Current,
            replaces: None,
            date: None,
            created: Timestamp(at),
            updated: Timestamp(at),
            body: PointerBody::default(),
        };
        p.body = body_of(&p, &format!("https://{}.example.nhs.uk/records/{local}", custodian.to_lowercase()));
        p
    }

    /// What a producer would have sent for `p` (its typed fields as FHIR
    /// JSON), with one content URL: a body that renders to a whole
    /// DocumentReference.
    pub fn body_of(p: &RecordPointer, url: &str) -> PointerBody {
        let ods_ref = |ods: &OdsCode| serde_json::json!({ "identifier": { "system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": ods.as_str() } });
        let coding =
            |c: &SnomedCode| serde_json::json!({ "coding": [{ "system": SnomedCode::SYSTEM, "code": c.as_str() }] });
        let mut members = serde_json::json!({
            "subject": { "identifier": { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": p.subject.as_str() } },
            "type": coding(&p.type_code),
            "category": [coding(&p.category)],
            "author": [ods_ref(&p.custodian)],
            "custodian": ods_ref(&p.custodian),
            "content": [{ "attachment": { "contentType": "application/pdf", "url": url } }],
        });
        if let Some(m) = &p.master_identifier {
            members["masterIdentifier"] = serde_json::json!({ "system": m.system, "value": m.value });
        }
        let serde_json::Value::Object(members) = members else { unreachable!("an object") };
        PointerBody::of(&serde_json::Map::new(), &members)
    }

    pub fn put(custodian: &str, pointer: RecordPointer, if_match: Option<u64>) -> Command {
        Command::V1(CommandV1::PutPointer { caller: caller(custodian, &[Role::Producer]), pointer, if_match })
    }

    pub fn create(custodian: &str, pointer: RecordPointer) -> Command {
        Command::V1(CommandV1::CreatePointer { caller: caller(custodian, &[Role::Producer]), pointer })
    }

    /// The local identifier system `ods` assigns in tests.
    pub fn local_system(ods_code: &str) -> String {
        format!("https://{}.example.nhs.uk/Id/mrn", ods_code.to_lowercase())
    }

    /// Registers [`local_system`] of `ods` with it as assigning authority.
    pub fn authority(ods_code: &str) -> Command {
        Command::V1(CommandV1::PutAuthority {
            caller: operator(),
            system: local_system(ods_code),
            ods: Some(ods(ods_code)),
        })
    }

    /// `ods` feeds its local identifier `value` for `subject`.
    pub fn local_id(ods_code: &str, value: &str, subject: NhsNumber) -> Command {
        Command::V1(CommandV1::PutLocalId {
            caller: caller(ods_code, &[Role::Producer]),
            id: Identifier { system: local_system(ods_code), value: value.into() },
            subject,
            at: Timestamp(0),
        })
    }

    pub fn delete(custodian: &str, id: &str, at: i64) -> Command {
        Command::V1(CommandV1::DeletePointer {
            caller: caller(custodian, &[Role::Producer]),
            id: PointerId::parse(id).unwrap(),
            at: Timestamp(at),
        })
    }

    /// The consent authority records `subject`'s preference.
    pub fn consent(subject: NhsNumber, opted_out: bool, at: i64) -> Command {
        Command::V1(CommandV1::SetConsent {
            caller: caller("X25", &[Role::ConsentAuthority]),
            subject,
            opted_out,
            at: Timestamp(at),
        })
    }

    /// The operator restricts consumer `ods` to `types`.
    pub fn consumer_types(ods_code: &str, types: &[&str]) -> Command {
        Command::V1(CommandV1::SetConsumerTypes {
            caller: operator(),
            ods: ods(ods_code),
            types: Some(types.iter().map(|t| snomed(t)).collect()),
            permissions: Default::default(),
        })
    }

    /// The identity authority retires `source` into `target`.
    pub fn merge(source: NhsNumber, target: NhsNumber, at: i64) -> Command {
        Command::V1(CommandV1::MergePatients {
            caller: caller("X27", &[Role::IdentityAuthority]),
            source,
            target,
            at: Timestamp(at),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::testkit::*;
    use super::*;
    use crate::apply::apply;
    use crate::command::{Command, CommandV1, Outcome, Rejection, Role};
    use crate::model::{PointerStatus, Timestamp};

    fn state() -> MemState {
        let mut s = MemState::default();
        for c in registry_commands(&["A81001", "RR8"]) {
            assert_eq!(apply(&mut s, &c).unwrap(), Outcome::Done);
        }
        s
    }

    /// The read conformance suite, which the RocksDB store passes too.
    #[test]
    fn reads_conform() {
        let mut s = MemState::default();
        for c in crate::query::conformance::commands() {
            let outcome = apply(&mut s, &c).unwrap();
            assert!(!matches!(outcome, Outcome::Rejected(_)), "{outcome:?}");
        }
        crate::query::conformance::check(&s);
    }

    #[test]
    fn create_indexes_and_counts_holders() {
        let mut s = state();
        let p = pointer("A81001", "p1", nhs(1), 1);
        assert!(matches!(apply(&mut s, &create("A81001", p.clone())).unwrap(), Outcome::Created { .. }));
        let q = pointer("RR8", "q1", nhs(1), 2);
        apply(&mut s, &create("RR8", q)).unwrap();
        let entry = &s.patients[&nhs(1)];
        assert_eq!(entry.holders().count(), 2);
        assert_eq!(entry.pointer_count(), 2);
        assert_eq!(s.current_pointers(&nhs(1)).len(), 2);
    }

    #[test]
    fn duplicate_master_identifier_is_rejected() {
        let mut s = state();
        let p = pointer("A81001", "p1", nhs(1), 1);
        apply(&mut s, &create("A81001", p.clone())).unwrap();
        let mut again = p.clone();
        again.id = PointerId::parse("A81001-p2").unwrap();
        let out = apply(&mut s, &create("A81001", again)).unwrap();
        assert!(matches!(out, Outcome::Rejected(Rejection::Duplicate { .. })), "{out:?}");
    }

    /// A batch applies each command as if it were its own entry, in order,
    /// each with its own outcome; a batch inside a batch is refused.
    #[test]
    fn a_batch_is_each_command_in_turn() {
        let v1 = |c: Command| match c {
            Command::V1(c) => c,
        };
        let p = pointer("A81001", "p1", nhs(1), 1);
        let mut again = p.clone();
        again.id = PointerId::parse("A81001-p2").unwrap();
        let q = pointer("RR8", "q1", nhs(2), 2);
        let commands = vec![create("A81001", p), create("A81001", again), create("RR8", q)];
        let mut one_by_one = state();
        let separately: Vec<Outcome> = commands.iter().map(|c| apply(&mut one_by_one, c).unwrap()).collect();
        let mut batched = state();
        let mut inner: Vec<CommandV1> = commands.into_iter().map(v1).collect();
        inner.push(CommandV1::Batch(vec![]));
        let out = apply(&mut batched, &Command::V1(CommandV1::Batch(inner))).unwrap();
        let Outcome::Batch(outcomes) = out else { panic!("{out:?}") };
        assert_eq!(outcomes[..3], separately[..]);
        assert!(matches!(outcomes[1], Outcome::Rejected(Rejection::Duplicate { .. })));
        assert!(matches!(outcomes[3], Outcome::Rejected(Rejection::Invalid { .. })));
        assert_eq!(batched, one_by_one);
    }

    #[test]
    fn producer_rules() {
        let mut s = state();
        // Custodian must be the caller.
        let p = pointer("A81001", "p1", nhs(1), 1);
        let out = apply(&mut s, &create("RR8", p)).unwrap();
        assert!(matches!(out, Outcome::Rejected(Rejection::Forbidden { .. })));
        // A consumer cannot write.
        let p = pointer("A81001", "p1", nhs(1), 1);
        let cmd = Command::V1(CommandV1::CreatePointer { caller: caller("A81001", &[Role::Consumer]), pointer: p });
        assert!(matches!(apply(&mut s, &cmd).unwrap(), Outcome::Rejected(Rejection::Forbidden { .. })));
        // A type the producer is not allowed.
        let p = with_type(pointer("Y05868", "p1", nhs(1), 1), END_OF_LIFE_CARE_PLAN);
        assert!(matches!(apply(&mut s, &create("Y05868", p)).unwrap(), Outcome::Rejected(Rejection::Forbidden { .. })));
        // Category must match the registry.
        let mut p = pointer("A81001", "p9", nhs(1), 1);
        p.category = snomed("123456789");
        assert!(matches!(
            apply(&mut s, &create("A81001", p)).unwrap(),
            Outcome::Rejected(Rejection::CategoryMismatch { .. })
        ));
        assert!(s.pointers.is_empty());
    }

    #[test]
    fn replaces_supersedes_atomically_and_delete_restores_counts() {
        let mut s = state();
        let old = pointer("A81001", "p1", nhs(1), 1);
        apply(&mut s, &create("A81001", old.clone())).unwrap();
        let mut new = pointer("A81001", "p2", nhs(1), 2);
        new.replaces = Some(old.id.clone());
        apply(&mut s, &create("A81001", new.clone())).unwrap();
        assert_eq!(s.pointers[&old.id].status, PointerStatus::Superseded);
        assert_eq!(s.pointers[&old.id].version, 2, "superseding makes a version");
        assert_eq!(s.past[&(old.id.clone(), 1)].status, PointerStatus::Current);
        assert_eq!(s.current_pointers(&nhs(1)).len(), 1);
        assert_eq!(s.patients[&nhs(1)].pointer_count(), 1);

        let del = Command::V1(CommandV1::DeletePointer {
            caller: caller("A81001", &[Role::Producer]),
            id: new.id.clone(),
            at: Timestamp(3),
        });
        assert!(matches!(apply(&mut s, &del).unwrap(), Outcome::Deleted { .. }));
        assert!(!s.patients.contains_key(&nhs(1)), "an empty patient entry is removed");
        // The superseded history stays readable.
        assert!(s.pointers.contains_key(&old.id));
    }

    /// A changed copy of `p`'s body: another content URL.
    fn with_url(mut p: RecordPointer, url: &str) -> RecordPointer {
        let mut members: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&format!("{{{}}}", p.body.members)).unwrap();
        members["content"][0]["attachment"]["url"] = url.into();
        p.body = crate::model::PointerBody::of(&serde_json::Map::new(), &members);
        p
    }

    #[test]
    fn update_checks_version_and_immutable_fields() {
        let mut s = state();
        let p = pointer("A81001", "p1", nhs(1), 1);
        apply(&mut s, &create("A81001", p.clone())).unwrap();
        let changed = with_url(p.clone(), "https://a81001.example.nhs.uk/v2");
        let out = apply(&mut s, &put("A81001", changed.clone(), Some(7))).unwrap();
        assert_eq!(out, Outcome::Rejected(Rejection::VersionConflict { given: 7, current: 1 }));
        let out = apply(&mut s, &put("A81001", changed.clone(), Some(1))).unwrap();
        assert!(matches!(out, Outcome::Updated { ref pointer } if pointer.version == 2));
        // Without If-Match: an unconditional update, as in NRL.
        let again = with_url(p.clone(), "https://a81001.example.nhs.uk/v3");
        assert!(
            matches!(apply(&mut s, &put("A81001", again, None)).unwrap(), Outcome::Updated { ref pointer } if pointer.version == 3)
        );
        let mut bad = changed.clone();
        bad.subject = nhs(2);
        assert!(matches!(
            apply(&mut s, &put("A81001", bad, None)).unwrap(),
            Outcome::Rejected(Rejection::Invalid { .. })
        ));
        // The author is immutable too, though only the body holds it.
        let mut other_author = changed.clone();
        other_author.body.members = other_author.body.members.replacen("A81001", "A81002", 1);
        assert!(other_author.body.member("author") != p.body.member("author"));
        let out = apply(&mut s, &put("A81001", other_author, None)).unwrap();
        assert!(matches!(out, Outcome::Rejected(Rejection::Invalid { .. })), "{out:?}");

        // Versions 1 and 2 are past, 3 current; a delete takes them all.
        assert_eq!(s.past.keys().map(|(_, v)| *v).collect::<Vec<_>>(), [1, 2]);
        assert!(s.past[&(p.id.clone(), 1)].body.members.contains("/records/p1"));
        let del = Command::V1(CommandV1::DeletePointer {
            caller: caller("A81001", &[Role::Producer]),
            id: p.id.clone(),
            at: Timestamp(9),
        });
        apply(&mut s, &del).unwrap();
        assert!(s.past.is_empty(), "NRL's hard delete removes the history");
    }

    /// A PUT is a create when the pointer does not exist where it is
    /// applied, an update when it does: never decided on a stale view.
    #[test]
    fn put_is_decided_at_apply() {
        let mut s = state();
        let p = pointer("A81001", "own-id", nhs(1), 5);
        let out = apply(&mut s, &put("A81001", p.clone(), None)).unwrap();
        assert!(
            matches!(out, Outcome::Created { ref pointer, superseded: None } if pointer.version == 1 && pointer.created == Timestamp(5))
        );
        let out = apply(&mut s, &put("A81001", with_url(p.clone(), "https://a81001.example.nhs.uk/x"), None)).unwrap();
        assert!(matches!(out, Outcome::Updated { ref pointer } if pointer.version == 2));
        // Another producer's id is refused either way.
        let theirs = pointer("RR8", "own-id", nhs(1), 5);
        assert!(matches!(
            apply(&mut s, &put("A81001", theirs, None)).unwrap(),
            Outcome::Rejected(Rejection::Forbidden { .. })
        ));
    }

    /// Only a producer with the migration permission keeps its own date; an
    /// update never changes it.
    #[test]
    fn dates_follow_the_migration_permission() {
        let mut s = state();
        let mut p = pointer("A81001", "d1", nhs(1), 5);
        p.date = Some("2019-04-01T09:00:00+01:00".into());
        let Outcome::Created { pointer: stored, .. } = apply(&mut s, &create("A81001", p.clone())).unwrap() else {
            panic!()
        };
        assert_eq!(stored.date, None, "server time for an ordinary producer");
        let migrate = Command::V1(CommandV1::SetProducerTypes {
            caller: operator(),
            ods: ods("A81001"),
            types: vec![snomed(MENTAL_HEALTH_CRISIS_PLAN)],
            permissions: [crate::model::ProducerPermission::Migration].into(),
        });
        apply(&mut s, &migrate).unwrap();
        let mut q = pointer("A81001", "d2", nhs(1), 6);
        q.master_identifier = None;
        q.date = p.date.clone();
        let Outcome::Created { pointer: stored, .. } = apply(&mut s, &create("A81001", q.clone())).unwrap() else {
            panic!()
        };
        assert_eq!(stored.date, p.date, "kept for a migration");
        let mut changed = with_url(q, "https://a81001.example.nhs.uk/d2v2");
        changed.date = Some("2020-01-01T00:00:00Z".into());
        let Outcome::Updated { pointer: updated } = apply(&mut s, &put("A81001", changed, None)).unwrap() else {
            panic!()
        };
        assert_eq!(updated.date, p.date, "an update never changes the date");
    }

    /// A consumer may break the glass only once the registry says so: no
    /// entry, or an entry of types alone, holds no permission; an entry of
    /// every type and no permission is removed; only an operator sets it.
    #[test]
    fn break_glass_follows_the_consumer_permission() {
        use crate::model::ConsumerPermission;
        let mut s = state();
        let reader = crate::Reader::new(&caller("RX9", &[Role::Consumer])).unwrap();
        let may = |s: &MemState| crate::query::may_break_glass(s, &reader).unwrap();
        assert!(!may(&s), "default: none");
        let set = |types: Option<Vec<SnomedCode>>, permissions: &[ConsumerPermission]| {
            Command::V1(CommandV1::SetConsumerTypes {
                caller: operator(),
                ods: ods("RX9"),
                types,
                permissions: permissions.iter().copied().collect(),
            })
        };
        apply(&mut s, &set(Some(vec![snomed(MENTAL_HEALTH_CRISIS_PLAN)]), &[])).unwrap();
        assert!(s.consumers[&ods("RX9")].permissions.is_empty());
        assert!(!may(&s), "types alone give no permission");
        apply(&mut s, &set(None, &[ConsumerPermission::BreakGlass])).unwrap();
        assert_eq!(s.consumers[&ods("RX9")].allowed_types, None, "every type");
        assert!(may(&s));
        let by_consumer = Command::V1(CommandV1::SetConsumerTypes {
            caller: caller("RX9", &[Role::Consumer]),
            ods: ods("NLO10"),
            types: None,
            permissions: [ConsumerPermission::BreakGlass].into(),
        });
        assert!(matches!(apply(&mut s, &by_consumer).unwrap(), Outcome::Rejected(Rejection::Forbidden { .. })));
        assert!(!s.consumers.contains_key(&ods("NLO10")));
        apply(&mut s, &set(None, &[])).unwrap();
        assert!(!s.consumers.contains_key(&ods("RX9")), "every type, no permission: the default, no entry");
        assert!(!may(&s));
        assert_eq!(ConsumerPermission::parse("break-glass"), Some(ConsumerPermission::BreakGlass));
        assert_eq!(ConsumerPermission::parse("migration"), None);
    }

    /// Registry data written before consumer permissions existed still
    /// reads: a stored entry of types (no permissions), and a command in
    /// the Raft log without `permissions`.
    #[test]
    fn consumer_entries_stored_before_permissions_still_read() {
        #[derive(serde::Serialize)]
        struct OldEntry {
            allowed_types: Vec<SnomedCode>,
        }
        let old = crate::codec::encode(&OldEntry { allowed_types: vec![snomed(MENTAL_HEALTH_CRISIS_PLAN)] });
        let entry: ConsumerEntry = crate::codec::decode(&old).unwrap();
        assert_eq!(entry.allowed_types, Some(vec![snomed(MENTAL_HEALTH_CRISIS_PLAN)]));
        assert!(entry.permissions.is_empty());
        let new = ConsumerEntry { allowed_types: None, permissions: [crate::ConsumerPermission::BreakGlass].into() };
        assert_eq!(crate::codec::decode::<ConsumerEntry>(&crate::codec::encode(&new)).unwrap(), new);

        #[derive(serde::Serialize)]
        enum OldCommand {
            V1(OldCommandV1),
        }
        #[derive(serde::Serialize)]
        enum OldCommandV1 {
            SetConsumerTypes { caller: crate::Caller, ods: OdsCode, types: Option<Vec<SnomedCode>> },
        }
        let old = crate::codec::encode(&OldCommand::V1(OldCommandV1::SetConsumerTypes {
            caller: operator(),
            ods: ods("RX9"),
            types: None,
        }));
        let Command::V1(CommandV1::SetConsumerTypes { permissions, types, .. }) = crate::codec::decode(&old).unwrap()
        else {
            panic!("not a SetConsumerTypes")
        };
        assert!(permissions.is_empty() && types.is_none());
    }

    #[test]
    fn the_paging_key_is_set_once() {
        let mut s = state();
        let set = |b| Command::V1(CommandV1::SetPagingKey { key: PagingKey([b; 32]) });
        apply(&mut s, &set(1)).unwrap();
        apply(&mut s, &set(2)).unwrap();
        assert_eq!(s.paging_key, Some(PagingKey([1; 32])));
    }

    /// An anchor only moves a node's head forward: a lower or equal
    /// sequence (a chain cut short and grown again) never replaces it, and
    /// a malformed hash is refused.
    #[test]
    fn an_audit_anchor_only_moves_forward() {
        let mut s = state();
        let anchor = |node, seq, c: char| {
            Command::V1(CommandV1::AnchorAudit {
                anchor: AuditAnchor { node, seq, hash: c.to_string().repeat(64), at: Timestamp(seq as i64) },
            })
        };
        assert_eq!(apply(&mut s, &anchor(1, 10, 'a')).unwrap(), Outcome::Done);
        apply(&mut s, &anchor(1, 10, 'b')).unwrap();
        apply(&mut s, &anchor(1, 4, 'c')).unwrap();
        apply(&mut s, &anchor(2, 3, 'd')).unwrap();
        assert_eq!(s.audit_anchors[&1].seq, 10);
        assert_eq!(s.audit_anchors[&1].hash, "a".repeat(64));
        apply(&mut s, &anchor(1, 11, 'e')).unwrap();
        assert_eq!(s.audit_anchors[&1].hash, "e".repeat(64));
        assert_eq!(s.audit_anchors[&2].seq, 3);
        assert!(matches!(apply(&mut s, &anchor(1, 12, 'g')).unwrap(), Outcome::Rejected(Rejection::Invalid { .. })));
        assert!(matches!(apply(&mut s, &anchor(1, 0, 'a')).unwrap(), Outcome::Rejected(Rejection::Invalid { .. })));
        assert_eq!(s.audit_anchors[&1].seq, 11);
    }

    #[test]
    fn consent_needs_the_consent_authority() {
        let mut s = state();
        let cmd = |roles: &[Role]| {
            Command::V1(CommandV1::SetConsent {
                caller: caller("X1234", roles),
                subject: nhs(5),
                opted_out: true,
                at: Timestamp(1),
            })
        };
        assert!(matches!(apply(&mut s, &cmd(&[Role::Consumer])).unwrap(), Outcome::Rejected(_)));
        assert_eq!(apply(&mut s, &cmd(&[Role::ConsentAuthority])).unwrap(), Outcome::Done);
        assert!(s.patients[&nhs(5)].opted_out);
    }

    #[test]
    fn testkit_numbers_are_test_numbers() {
        for i in 0..1000 {
            assert!(nhs(i).as_str().starts_with('9'));
        }
    }
}
