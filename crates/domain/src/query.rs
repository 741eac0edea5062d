//! Typed reads of the replicated state: a search's page and exact total, a
//! pointer by id, a patient's record holders, each filtered by the access
//! rules of [`crate::access`]. Storage supplies a [`StateRead`] (the RocksDB
//! store, or [`crate::mem::MemState`]); callers above the replica never see
//! a storage type.
//!
//! Pages are found by key: a page starts after the last pointer id of the
//! one before, so the 50th page costs what the first does. `total` is
//! counted from the patient index entry (pointers by custodian and type),
//! never by counting pointers, so it is exact however many there are.

use crate::access::{Purpose, ReadScope, Reader, Visibility};
use crate::ids::{NhsNumber, OdsCode, PointerId, SnomedCode};
use crate::model::{AuditAnchor, ConsumerEntry, Identifier, PagingKey, PatientEntry, PointerType, RecordPointer};
use crate::subscription::{Subscription, SubscriptionEvent, SubscriptionId};

/// Reads of the state, the read side of [`crate::apply::StateTxn`].
pub trait StateRead {
    type Error;

    fn pointer(&self, id: &PointerId) -> Result<Option<RecordPointer>, Self::Error>;
    fn patient(&self, subject: &NhsNumber) -> Result<Option<PatientEntry>, Self::Error>;
    fn consumer(&self, ods: &OdsCode) -> Result<Option<ConsumerEntry>, Self::Error>;
    fn pointer_types(&self) -> Result<Vec<PointerType>, Self::Error>;
    fn paging_key(&self) -> Result<Option<PagingKey>, Self::Error>;
    /// Every node's anchored audit chain head, by node id.
    fn audit_anchors(&self) -> Result<Vec<AuditAnchor>, Self::Error>;

    fn subscription(&self, id: &SubscriptionId) -> Result<Option<Subscription>, Self::Error>;
    /// Every subscription, in id order, at most `limit`.
    fn subscriptions(&self, limit: usize) -> Result<Vec<Subscription>, Self::Error>;
    /// The subscription's retained events numbered `from` to `until`
    /// (inclusive), in order, at most `limit`.
    fn subscription_events(
        &self,
        id: &SubscriptionId,
        from: u64,
        until: u64,
        limit: usize,
    ) -> Result<Vec<SubscriptionEvent>, Self::Error>;

    /// A version of a pointer that is no longer its current one.
    fn past_version(&self, id: &PointerId, version: u64) -> Result<Option<RecordPointer>, Self::Error>;
    /// The NHS Number a local identifier names (before any merge redirect).
    fn local_id(&self, id: &Identifier) -> Result<Option<NhsNumber>, Self::Error>;
    /// The organisation that assigns an identifier system.
    fn authority(&self, system: &str) -> Result<Option<OdsCode>, Self::Error>;
    /// The pointer's past versions, newest first, at most `limit`.
    fn past_versions(&self, id: &PointerId, limit: usize) -> Result<Vec<RecordPointer>, Self::Error>;

    /// A patient's current pointers in id order, starting after `after`:
    /// those that `keep` accepts (asked with each index entry's custodian
    /// and type as text, before the pointer is read, so a skipped entry
    /// costs no allocation), at most `limit`, looking at no more than
    /// `scan_max` index entries.
    fn scan(
        &self,
        subject: &NhsNumber,
        after: Option<&PointerId>,
        limit: usize,
        scan_max: usize,
        keep: &mut dyn FnMut(&str, &str) -> bool,
    ) -> Result<Scanned, Self::Error>;
}

/// What a [`StateRead::scan`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scanned {
    pub pointers: Vec<RecordPointer>,
    /// Where the next page starts, when entries after this page may match:
    /// the last pointer returned, or the last index entry looked at when
    /// `scan_max` ran out first.
    pub resume_after: Option<PointerId>,
}

/// Search filters, each "any of" (empty: no filter), combined with AND.
/// A category stands for the registered types of that category.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SearchFilter {
    pub types: Vec<SnomedCode>,
    pub categories: Vec<SnomedCode>,
    pub custodians: Vec<OdsCode>,
}

impl SearchFilter {
    /// Does a pointer of this custodian and type (as text) match? (After
    /// [`SearchFilter::resolve`], which turns categories into types.)
    pub fn matches(&self, custodian: &str, type_code: &str) -> bool {
        (self.types.is_empty() || self.types.iter().any(|t| t.as_str() == type_code))
            && (self.custodians.is_empty() || self.custodians.iter().any(|c| c.as_str() == custodian))
    }

    /// The filter with its categories turned into the types the registry
    /// files under them (intersected with `types` when both are given). A
    /// category with no registered type matches nothing.
    fn resolve<R: StateRead>(&self, r: &R) -> Result<Option<SearchFilter>, R::Error> {
        if self.categories.is_empty() {
            return Ok(Some(self.clone()));
        }
        let in_categories: Vec<SnomedCode> = r
            .pointer_types()?
            .into_iter()
            .filter(|t| self.categories.contains(&t.category))
            .map(|t| t.code)
            .filter(|c| self.types.is_empty() || self.types.contains(c))
            .collect();
        if in_categories.is_empty() {
            return Ok(None);
        }
        Ok(Some(SearchFilter { types: in_categories, categories: vec![], custodians: self.custodians.clone() }))
    }
}

/// The reader's consumer registry entry, if it is a consumer with one.
fn restriction<R: StateRead>(r: &R, reader: &Reader) -> Result<Option<ConsumerEntry>, R::Error> {
    if reader.is_consumer() { r.consumer(reader.ods()) } else { Ok(None) }
}

/// May `reader` break the glass, as the replicated registry says now?
/// (The read side's rule, [`Reader::may_break_glass`]; asked before a
/// break-glass read so that a caller without the permission is refused
/// rather than quietly shown nothing.)
pub fn may_break_glass<R: StateRead>(r: &R, reader: &Reader) -> Result<bool, R::Error> {
    Ok(reader.may_break_glass(restriction(r, reader)?.as_ref()))
}

/// One page of a patient's current pointers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Search {
    pub subject: NhsNumber,
    pub filter: SearchFilter,
    /// Start after this pointer id (from the page before).
    pub after: Option<PointerId>,
    /// Pointers on the page; 0 asks for the total only.
    pub count: usize,
    /// Index entries one page looks at, at most (a bound on its work when
    /// filters skip most of a patient's pointers).
    pub scan_max: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchPage {
    /// Set when the NHS Number searched was retired by a merge: the
    /// surviving number, whose pointers the page holds.
    pub merged_into: Option<NhsNumber>,
    /// Every pointer the search matches and the reader may see, on every page.
    pub total: u64,
    pub pointers: Vec<RecordPointer>,
    /// The `after` of the next page, when there is one.
    pub next_after: Option<PointerId>,
}

/// A page of a search, as `reader` may see it.
pub fn search<R: StateRead>(r: &R, reader: &Reader, purpose: &Purpose, q: &Search) -> Result<SearchPage, R::Error> {
    let (subject, patient) = survivor(r, &q.subject)?;
    let merged_into = (subject != q.subject).then_some(subject);
    let Some(filter) = q.filter.resolve(r)? else {
        return Ok(SearchPage { merged_into, total: 0, pointers: Vec::new(), next_after: None });
    };
    let scope = reader.scope(patient.as_ref(), purpose, restriction(r, reader)?.as_ref());
    let mut keep = |c: &str, t: &str| scope.allows(c, t) && filter.matches(c, t);
    let total = patient.as_ref().map_or(0, |p| p.count_where(|c, t| keep(c.as_str(), t.as_str())));
    if q.count == 0 || total == 0 {
        return Ok(SearchPage { merged_into, total, pointers: Vec::new(), next_after: None });
    }
    let scanned = r.scan(&subject, q.after.as_ref(), q.count, q.scan_max, &mut keep)?;
    Ok(SearchPage { merged_into, total, pointers: scanned.pointers, next_after: scanned.resume_after })
}

/// The number `subject` stands for now (itself, or the survivor of the
/// merge that retired it), with that number's entry.
pub fn survivor<R: StateRead>(r: &R, subject: &NhsNumber) -> Result<(NhsNumber, Option<PatientEntry>), R::Error> {
    let entry = r.patient(subject)?;
    match entry.as_ref().and_then(|e| e.merged_into) {
        Some(target) => Ok((target, r.patient(&target)?)),
        None => Ok((*subject, entry)),
    }
}

/// What an identifier (an NHS Number or a registered local one) names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubjectOf {
    /// The patient's current NHS Number, and the one asked for when a
    /// merge retired it (`retired`).
    Found { nhs: NhsNumber, retired: Option<NhsNumber> },
    /// The identifier names no patient here.
    NotFound,
    /// The identifier's system is neither the NHS Number's nor registered.
    UnknownSystem,
}

/// The patient `id` names: an NHS Number stands for itself (or its
/// survivor) whether or not anything is held for it; a local identifier
/// only when it has been fed.
pub fn subject_of<R: StateRead>(r: &R, id: &Identifier) -> Result<SubjectOf, R::Error> {
    let asked = if id.system == NhsNumber::SYSTEM {
        match NhsNumber::parse(&id.value) {
            Ok(n) => n,
            Err(_) => return Ok(SubjectOf::NotFound),
        }
    } else {
        if r.authority(&id.system)?.is_none() {
            return Ok(SubjectOf::UnknownSystem);
        }
        match r.local_id(id)? {
            Some(n) => n,
            None => return Ok(SubjectOf::NotFound),
        }
    };
    let (nhs, _) = survivor(r, &asked)?;
    Ok(SubjectOf::Found { nhs, retired: (nhs != asked).then_some(asked) })
}

/// The answer to a PIXm query (ITI-83).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PixAnswer {
    /// The patient's NHS Number and their other identifiers (the source
    /// itself left out), only those of the target system when one was asked.
    Found { nhs: NhsNumber, identifiers: Vec<Identifier> },
    /// No patient has the source identifier.
    NotFound,
    /// The source identifier's system is not registered.
    UnknownSourceSystem,
    /// The target system is not registered.
    UnknownTargetSystem,
}

/// PIXm's cross-reference query: the identifiers of the patient `source`
/// names, only those of `targets` when any are given. An NHS Number with
/// nothing recorded for it names no patient.
pub fn pix<R: StateRead>(r: &R, source: &Identifier, targets: &[String]) -> Result<PixAnswer, R::Error> {
    for t in targets {
        if t != NhsNumber::SYSTEM && r.authority(t)?.is_none() {
            return Ok(PixAnswer::UnknownTargetSystem);
        }
    }
    let nhs = match subject_of(r, source)? {
        SubjectOf::UnknownSystem => return Ok(PixAnswer::UnknownSourceSystem),
        SubjectOf::NotFound => return Ok(PixAnswer::NotFound),
        SubjectOf::Found { nhs, .. } => nhs,
    };
    let Some(entry) = r.patient(&nhs)? else { return Ok(PixAnswer::NotFound) };
    let nhs_id = Identifier { system: NhsNumber::SYSTEM.to_owned(), value: nhs.as_str().to_owned() };
    let identifiers = std::iter::once(nhs_id)
        .chain(entry.local_ids.iter().cloned())
        .filter(|i| i != source)
        .filter(|i| targets.is_empty() || targets.contains(&i.system))
        .collect();
    Ok(PixAnswer::Found { nhs, identifiers })
}

/// A pointer read by id, and what `reader` may know of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointerRead {
    pub pointer: RecordPointer,
    pub visibility: Visibility,
}

/// The pointer `id`, if it exists, with whether `reader` may see it (a
/// hidden pointer's subject still names the patient for the audit).
pub fn pointer<R: StateRead>(
    r: &R,
    reader: &Reader,
    purpose: &Purpose,
    id: &PointerId,
) -> Result<Option<PointerRead>, R::Error> {
    let Some(pointer) = r.pointer(id)? else { return Ok(None) };
    let patient = r.patient(&pointer.subject)?;
    let visibility = reader.sees(&pointer, patient.as_ref(), purpose, restriction(r, reader)?.as_ref());
    Ok(Some(PointerRead { pointer, visibility }))
}

/// A pointer's versions, newest first: the current one, then past ones,
/// at most `limit` in all; with what `reader` may know of the pointer
/// (decided on the current version, so a history shows no more than a read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRead {
    pub versions: Vec<RecordPointer>,
    pub visibility: Visibility,
}

/// The history of `id` (`version`: one version only), if the pointer exists.
pub fn history<R: StateRead>(
    r: &R,
    reader: &Reader,
    purpose: &Purpose,
    id: &PointerId,
    version: Option<u64>,
    limit: usize,
) -> Result<Option<HistoryRead>, R::Error> {
    let Some(current) = pointer(r, reader, purpose, id)? else { return Ok(None) };
    let visibility = current.visibility;
    let versions = match version {
        Some(v) if v == current.pointer.version => vec![current.pointer],
        Some(v) => r.past_version(id, v)?.into_iter().collect(),
        None => {
            let mut all = vec![current.pointer];
            all.extend(r.past_versions(id, limit.saturating_sub(1))?);
            all
        }
    };
    Ok(Some(HistoryRead { versions, visibility }))
}

/// A patient's record holders as a reader may see them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HoldersRead {
    /// The organisations, with how many pointers each, in ODS order.
    pub holders: Vec<(OdsCode, u64)>,
    /// Set when the number asked was retired by a merge: the survivor,
    /// whose holders these are.
    pub merged_into: Option<NhsNumber>,
}

/// The organisations holding pointers of a patient that `reader` may see,
/// with how many each, in ODS order.
pub fn record_holders<R: StateRead>(
    r: &R,
    reader: &Reader,
    purpose: &Purpose,
    subject: &NhsNumber,
) -> Result<HoldersRead, R::Error> {
    let (nhs, patient) = survivor(r, subject)?;
    let merged_into = (nhs != *subject).then_some(nhs);
    let Some(patient) = patient else { return Ok(HoldersRead { holders: Vec::new(), merged_into }) };
    let scope = reader.scope(Some(&patient), purpose, restriction(r, reader)?.as_ref());
    Ok(HoldersRead { holders: visible_holders(&patient, &scope), merged_into })
}

fn visible_holders(patient: &PatientEntry, scope: &ReadScope) -> Vec<(OdsCode, u64)> {
    patient
        .held
        .iter()
        .filter_map(|(ods, types)| {
            let n: u64 =
                types.iter().filter(|(t, _)| scope.allows(ods.as_str(), t.as_str())).map(|(_, &n)| u64::from(n)).sum();
            (n > 0).then(|| (ods.clone(), n))
        })
        .collect()
}

/// One conformance suite for every [`StateRead`]: the in-memory state and
/// the RocksDB store must answer these reads alike.
pub mod conformance {
    use super::*;
    use crate::command::{Command, CommandV1, Role};
    use crate::mem::testkit::{self, caller, create, nhs, ods, snomed};
    use crate::model::PointerStatus;

    const PATIENT_POINTERS: u32 = 45;

    /// The commands the suite's state is built from: patient 1 with
    /// pointers of two custodians and two types (a few superseded), patient
    /// 2 opted out.
    pub fn commands() -> Vec<Command> {
        let mut cmds = testkit::registry_commands(&["A81001", "RV3"]);
        for i in 0..PATIENT_POINTERS {
            let custodian = if i % 3 == 0 { "RV3" } else { "A81001" };
            let mut p = testkit::pointer(custodian, &format!("p{i:03}"), nhs(1), i64::from(i));
            if i % 5 == 0 {
                p = testkit::with_type(p, testkit::END_OF_LIFE_CARE_PLAN);
            } else if i % 7 == 0 {
                p = testkit::with_type(p, testkit::NEWS2_CHART);
            }
            cmds.push(create(custodian, p));
        }
        // Three of A81001's pointers replaced: the old ones drop out.
        for i in [1u32, 2, 4] {
            let mut p = testkit::pointer("A81001", &format!("r{i:03}"), nhs(1), 100);
            p.replaces = Some(PointerId::parse(&format!("A81001-p{i:03}")).expect("an id"));
            p.master_identifier = None;
            cmds.push(create("A81001", p));
        }
        for i in 0..4u32 {
            let custodian = if i == 0 { "RV3" } else { "A81001" };
            cmds.push(create(custodian, testkit::pointer(custodian, &format!("o{i}"), nhs(2), 0)));
        }
        cmds.push(Command::V1(CommandV1::SetConsent {
            caller: caller("X09", &[Role::ConsentAuthority]),
            subject: nhs(2),
            opted_out: true,
            at: crate::model::Timestamp(1),
        }));
        // Pointer p008 updated twice: versions 1 and 2 past, 3 current.
        for at in [200, 201] {
            let mut p = testkit::pointer("A81001", "p008", nhs(1), at);
            p.body.members = p.body.members.replace("/records/", &format!("/records/v{at}/"));
            cmds.push(testkit::put("A81001", p, None));
        }
        // Consumer Y02 may read mental health crisis plans only; Y01 every
        // type, and may break the glass (Y03, with no entry, may not).
        cmds.push(Command::V1(CommandV1::SetConsumerTypes {
            caller: testkit::operator(),
            ods: ods("Y02"),
            types: Some(vec![snomed(testkit::MENTAL_HEALTH_CRISIS_PLAN)]),
            permissions: Default::default(),
        }));
        cmds.push(Command::V1(CommandV1::SetConsumerTypes {
            caller: testkit::operator(),
            ods: ods("Y01"),
            types: None,
            permissions: [crate::model::ConsumerPermission::BreakGlass].into(),
        }));
        cmds.extend(identity_commands());
        cmds
    }

    /// Patients 4 to 6: RV3 assigns local identifiers; 6 is merged into 5
    /// and then 5 into 4 (a chain), 5 having opted out; a create for 6
    /// after the merges is stored under 4.
    fn identity_commands() -> Vec<Command> {
        let mut cmds = vec![testkit::authority("RV3")];
        for (patient, n) in [(4u32, 6u32), (5, 3), (6, 2)] {
            for i in 0..n {
                let custodian = if i % 2 == 0 { "A81001" } else { "RV3" };
                let p = testkit::pointer(custodian, &format!("m{patient}-{i}"), nhs(patient), 10);
                cmds.push(create(custodian, p));
            }
            cmds.push(testkit::local_id("RV3", &format!("MRN{patient}"), nhs(patient)));
        }
        cmds.push(Command::V1(CommandV1::SetConsent {
            caller: caller("X09", &[Role::ConsentAuthority]),
            subject: nhs(5),
            opted_out: true,
            at: crate::model::Timestamp(2),
        }));
        cmds.push(testkit::merge(nhs(6), nhs(5), 20));
        cmds.push(testkit::merge(nhs(5), nhs(4), 30));
        cmds.push(testkit::merge(nhs(5), nhs(4), 31));
        cmds.push(create("A81001", testkit::pointer("A81001", "late6", nhs(6), 40)));
        cmds
    }

    /// The identity part of the suite (see [`identity_commands`]).
    fn check_identity<R: StateRead>(state: &R)
    where
        R::Error: std::fmt::Debug,
    {
        let consumer = Reader::new(&caller("Y01", &[Role::Consumer])).expect("reads");
        let glass = Purpose::BreakGlass { reason: "unconscious".into() };
        // Every pointer of the three numbers is the survivor's, found under each.
        let mut all = None;
        for asked in [nhs(4), nhs(5), nhs(6)] {
            let page = search(state, &consumer, &glass, &query(asked, 100)).unwrap();
            assert_eq!(page.total, 6 + 3 + 2 + 1, "every pointer of the chain and the late create");
            assert_eq!(page.merged_into, (asked != nhs(4)).then_some(nhs(4)));
            assert!(page.pointers.iter().all(|p| p.subject == nhs(4)));
            assert!(page.pointers.iter().all(|p| p.body.members.contains(nhs(4).as_str())));
            let ids: Vec<_> = page.pointers.iter().map(|p| p.id.clone()).collect();
            assert_eq!(*all.get_or_insert(ids.clone()), ids);
        }
        // A moved pointer has a new version, its old one kept.
        let moved = PointerId::parse("RV3-m5-1").unwrap();
        let h = history(state, &consumer, &glass, &moved, None, 10).unwrap().unwrap();
        assert_eq!(h.versions.iter().map(|p| (p.version, p.subject)).collect::<Vec<_>>(), [(2, nhs(4)), (1, nhs(5))]);
        let twice = PointerId::parse("A81001-m6-0").unwrap();
        let h = history(state, &consumer, &glass, &twice, None, 10).unwrap().unwrap();
        assert_eq!(h.versions.iter().map(|p| p.subject).collect::<Vec<_>>(), [nhs(4), nhs(5), nhs(6)]);
        // The opt-out of 5 holds for the survivor.
        assert_eq!(search(state, &consumer, &Purpose::DirectCare, &query(nhs(4), 10)).unwrap().total, 0);
        let holders = record_holders(state, &consumer, &glass, &nhs(6)).unwrap();
        assert_eq!(holders.merged_into, Some(nhs(4)));
        assert_eq!(holders.holders, [(ods("A81001"), 7), (ods("RV3"), 5)]);
        // Local identifiers moved with their patients; PIXm answers for the survivor.
        let local = |v: &str| Identifier { system: testkit::local_system("RV3"), value: v.into() };
        for v in ["MRN4", "MRN5", "MRN6"] {
            assert_eq!(subject_of(state, &local(v)).unwrap(), SubjectOf::Found { nhs: nhs(4), retired: None });
        }
        let nhs_id = |n: NhsNumber| Identifier { system: NhsNumber::SYSTEM.into(), value: n.as_str().into() };
        assert_eq!(
            subject_of(state, &nhs_id(nhs(6))).unwrap(),
            SubjectOf::Found { nhs: nhs(4), retired: Some(nhs(6)) }
        );
        assert_eq!(subject_of(state, &local("MRN9")).unwrap(), SubjectOf::NotFound);
        let unknown = Identifier { system: "https://nobody.example/id".into(), value: "1".into() };
        assert_eq!(subject_of(state, &unknown).unwrap(), SubjectOf::UnknownSystem);
        let PixAnswer::Found { nhs: n, identifiers } = pix(state, &local("MRN5"), &[]).unwrap() else {
            panic!("found")
        };
        assert_eq!(n, nhs(4));
        assert_eq!(identifiers, [nhs_id(nhs(4)), local("MRN4"), local("MRN6")]);
        let only_nhs = pix(state, &nhs_id(nhs(5)), &[NhsNumber::SYSTEM.to_owned()]).unwrap();
        assert_eq!(only_nhs, PixAnswer::Found { nhs: nhs(4), identifiers: vec![nhs_id(nhs(4))] });
        assert_eq!(pix(state, &unknown, &[]).unwrap(), PixAnswer::UnknownSourceSystem);
        assert_eq!(
            pix(state, &local("MRN4"), std::slice::from_ref(&unknown.system)).unwrap(),
            PixAnswer::UnknownTargetSystem
        );
        assert_eq!(pix(state, &local("MRN9"), &[]).unwrap(), PixAnswer::NotFound);
        assert_eq!(pix(state, &nhs_id(nhs(3)), &[]).unwrap(), PixAnswer::NotFound, "nothing recorded");
    }

    fn query(subject: NhsNumber, count: usize) -> Search {
        Search { subject, filter: SearchFilter::default(), after: None, count, scan_max: 10_000 }
    }

    /// Pages through a search and returns (total, every id), checking that
    /// each page reports the same total and holds at most `count`.
    pub fn page_all<R: StateRead>(r: &R, reader: &Reader, mut q: Search) -> Result<(u64, Vec<PointerId>), R::Error> {
        let mut ids = Vec::new();
        let mut page = search(r, reader, &Purpose::DirectCare, &q)?;
        let total = page.total;
        loop {
            assert_eq!(page.total, total, "total on every page");
            assert!(page.pointers.len() <= q.count);
            ids.extend(page.pointers.iter().map(|p| p.id.clone()));
            match page.next_after.take() {
                Some(after) => {
                    q.after = Some(after);
                    page = search(r, reader, &Purpose::DirectCare, &q)?;
                }
                None => return Ok((total, ids)),
            }
        }
    }

    /// Runs the suite on `state`, built from [`commands`].
    pub fn check<R: StateRead>(state: &R)
    where
        R::Error: std::fmt::Debug,
    {
        let consumer = Reader::new(&caller("Y01", &[Role::Consumer])).expect("reads");
        let producer = Reader::new(&caller("A81001", &[Role::Producer])).expect("reads");
        let current = |ids: &[PointerId]| {
            ids.iter().all(|id| state.pointer(id).unwrap().is_some_and(|p| p.status == PointerStatus::Current))
        };

        // Every current pointer once, in id order, whatever the page size.
        let (total, all) = page_all(state, &consumer, query(nhs(1), 7)).unwrap();
        assert_eq!(total, u64::from(PATIENT_POINTERS), "45 current: 3 replaced, 3 replacements");
        assert_eq!(all.len() as u64, total);
        assert!(all.windows(2).all(|w| w[0] < w[1]), "id order, no repeats");
        assert!(current(&all));
        let (_, by_one) = page_all(state, &consumer, query(nhs(1), 1)).unwrap();
        assert_eq!(by_one, all);

        // Filters: the total counted from the index entry equals what paging finds.
        let eol = snomed(testkit::END_OF_LIFE_CARE_PLAN);
        let mhcp = snomed(testkit::MENTAL_HEALTH_CRISIS_PLAN);
        let news2 = snomed(testkit::NEWS2_CHART);
        let f =
            |types: Vec<SnomedCode>, custodians: Vec<OdsCode>| SearchFilter { types, categories: vec![], custodians };
        for filter in [
            f(vec![eol.clone()], vec![]),
            f(vec![], vec![ods("RV3")]),
            f(vec![eol.clone()], vec![ods("A81001"), ods("RV3")]),
            f(vec![mhcp.clone(), eol.clone()], vec![]),
            f(vec![news2.clone()], vec![]),
        ] {
            let q = Search { filter: filter.clone(), ..query(nhs(1), 4) };
            let (total, ids) = page_all(state, &consumer, q.clone()).unwrap();
            assert_eq!(ids.len() as u64, total, "{filter:?}");
            let expected: Vec<PointerId> = all
                .iter()
                .filter(|id| {
                    let p = state.pointer(id).unwrap().unwrap();
                    filter.matches(p.custodian.as_str(), p.type_code.as_str())
                })
                .cloned()
                .collect();
            assert_eq!(ids, expected, "{filter:?}");
            // A small scan bound gives shorter pages, never a lost pointer.
            let (_, bounded) = page_all(state, &consumer, Search { scan_max: 2, ..q }).unwrap();
            assert_eq!(bounded, expected, "{filter:?} with scan_max 2");
        }
        // A category stands for its registered types.
        let by_category = |categories: Vec<SnomedCode>, types: Vec<SnomedCode>| {
            let q = Search { filter: SearchFilter { types, categories, custodians: vec![] }, ..query(nhs(1), 6) };
            page_all(state, &consumer, q).unwrap()
        };
        let observations = snomed(testkit::OBSERVATIONS_CATEGORY);
        let care_plans = snomed(testkit::CARE_PLAN_CATEGORY);
        assert_eq!(
            by_category(vec![observations.clone()], vec![]),
            page_all(state, &consumer, Search { filter: f(vec![news2.clone()], vec![]), ..query(nhs(1), 6) }).unwrap()
        );
        let (n_care, _) = by_category(vec![care_plans.clone()], vec![]);
        let (n_obs, _) = by_category(vec![observations.clone()], vec![]);
        assert!(n_obs > 0 && n_care > 0);
        assert_eq!(n_care + n_obs, total);
        assert_eq!(by_category(vec![care_plans.clone(), observations.clone()], vec![]).0, total);
        assert_eq!(
            by_category(vec![observations.clone()], vec![eol.clone()]),
            (0, vec![]),
            "category and type disjoint"
        );
        assert_eq!(by_category(vec![snomed("123456789")], vec![]), (0, vec![]), "no type in that category");

        // A consumer restricted to one type sees only that type, and is
        // refused a read by id of another.
        let restricted = Reader::new(&caller("Y02", &[Role::Consumer])).expect("reads");
        let (n_mhcp, mhcp_ids) = page_all(state, &restricted, query(nhs(1), 9)).unwrap();
        assert_eq!(
            (n_mhcp, mhcp_ids.clone()),
            page_all(state, &consumer, Search { filter: f(vec![mhcp.clone()], vec![]), ..query(nhs(1), 9) }).unwrap()
        );
        assert!(n_mhcp < total);
        let eol_id = PointerId::parse("RV3-p000").unwrap();
        assert_eq!(
            pointer(state, &restricted, &Purpose::DirectCare, &eol_id).unwrap().unwrap().visibility,
            Visibility::TypeNotAllowed
        );
        assert_eq!(
            pointer(state, &consumer, &Purpose::DirectCare, &eol_id).unwrap().unwrap().visibility,
            Visibility::Visible
        );
        let holders = record_holders(state, &restricted, &Purpose::DirectCare, &nhs(1)).unwrap().holders;
        assert_eq!(holders.iter().map(|(_, n)| n).sum::<u64>(), n_mhcp);

        // Versions: the current one first, then the past ones, newest first.
        let p008 = PointerId::parse("A81001-p008").unwrap();
        let h = history(state, &consumer, &Purpose::DirectCare, &p008, None, 10).unwrap().unwrap();
        assert_eq!(h.versions.iter().map(|p| p.version).collect::<Vec<_>>(), [3, 2, 1]);
        assert!(h.versions[0].body.members.contains("/records/v201/"));
        assert!(h.versions[1].body.members.contains("/records/v200/"));
        assert_eq!(history(state, &consumer, &Purpose::DirectCare, &p008, None, 2).unwrap().unwrap().versions.len(), 2);
        let v1 = history(state, &consumer, &Purpose::DirectCare, &p008, Some(1), 10).unwrap().unwrap();
        assert_eq!(v1.versions.iter().map(|p| p.version).collect::<Vec<_>>(), [1]);
        assert!(
            history(state, &consumer, &Purpose::DirectCare, &p008, Some(4), 10).unwrap().unwrap().versions.is_empty()
        );
        let superseded = PointerId::parse("A81001-p001").unwrap();
        let h = history(state, &consumer, &Purpose::DirectCare, &superseded, None, 10).unwrap().unwrap();
        assert_eq!(
            h.versions.iter().map(|p| p.status).collect::<Vec<_>>(),
            [PointerStatus::Superseded, PointerStatus::Current]
        );

        let count_only = search(state, &consumer, &Purpose::DirectCare, &query(nhs(1), 0)).unwrap();
        assert_eq!((count_only.total, count_only.pointers.len()), (total, 0));

        // A producer sees its own; a consumer nothing of an opted-out patient
        // unless it breaks the glass.
        let (own, own_ids) = page_all(state, &producer, query(nhs(1), 10)).unwrap();
        assert_eq!(own, all.iter().filter(|id| id.as_str().starts_with("A81001-")).count() as u64);
        assert_eq!(own_ids.len() as u64, own);
        assert_eq!(page_all(state, &consumer, query(nhs(2), 10)).unwrap(), (0, vec![]));
        assert_eq!(page_all(state, &producer, query(nhs(2), 10)).unwrap().0, 3);
        let glass = Purpose::BreakGlass { reason: "collapsed in the street".into() };
        assert_eq!(search(state, &consumer, &glass, &query(nhs(2), 10)).unwrap().total, 4);
        assert!(may_break_glass(state, &consumer).unwrap());
        // Without the break-glass permission the override lifts nothing.
        let unpermitted = Reader::new(&caller("Y03", &[Role::Consumer])).expect("reads");
        assert!(!may_break_glass(state, &unpermitted).unwrap());
        assert!(!may_break_glass(state, &Reader::new(&caller("Y02", &[Role::Consumer])).unwrap()).unwrap());
        assert!(!may_break_glass(state, &producer).unwrap());
        assert_eq!(search(state, &unpermitted, &glass, &query(nhs(2), 10)).unwrap().total, 0);
        assert!(record_holders(state, &unpermitted, &glass, &nhs(2)).unwrap().holders.is_empty());
        let hidden_glass = pointer(state, &unpermitted, &glass, &PointerId::parse("RV3-o0").unwrap()).unwrap();
        assert_eq!(hidden_glass.expect("exists").visibility, Visibility::Hidden);
        assert_eq!(page_all(state, &consumer, query(nhs(3), 10)).unwrap(), (0, vec![]), "no such patient");

        // Record holders and reads by id follow the same rule.
        let holders = record_holders(state, &consumer, &Purpose::DirectCare, &nhs(1)).unwrap().holders;
        assert_eq!(holders.iter().map(|(_, n)| n).sum::<u64>(), total);
        assert_eq!(holders.iter().map(|(o, _)| o.as_str()).collect::<Vec<_>>(), ["A81001", "RV3"]);
        assert!(record_holders(state, &consumer, &Purpose::DirectCare, &nhs(2)).unwrap().holders.is_empty());
        assert_eq!(
            record_holders(state, &producer, &Purpose::DirectCare, &nhs(2)).unwrap().holders,
            [(ods("A81001"), 3)]
        );
        let hidden = PointerId::parse("RV3-o0").unwrap();
        let read = pointer(state, &consumer, &Purpose::DirectCare, &hidden).unwrap().expect("exists");
        assert_eq!(read.visibility, Visibility::Hidden, "opted out");
        assert_eq!(read.pointer.subject, nhs(2), "names the patient for the audit");
        assert_eq!(pointer(state, &consumer, &glass, &hidden).unwrap().unwrap().visibility, Visibility::Visible);
        assert_eq!(
            pointer(state, &producer, &Purpose::DirectCare, &hidden).unwrap().unwrap().visibility,
            Visibility::Hidden,
            "not its own"
        );
        let missing = PointerId::parse("RV3-nothing").unwrap();
        assert_eq!(pointer(state, &consumer, &Purpose::DirectCare, &missing).unwrap(), None);
        check_identity(state);
    }
}
