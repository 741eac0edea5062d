//! Typed reads of the local replica: what the API asks, answered by
//! [`hie_domain::query`] over the store, with the access rules applied. The
//! API never sees a storage type.

use hie_domain::query::{
    self, HistoryRead, HoldersRead, PixAnswer, PointerRead, Search, SearchPage, StateRead, SubjectOf,
};
use hie_domain::{Identifier, NhsNumber, PagingKey, PointerId, Purpose, Reader, RecordPointer};

use crate::error::ReadError;
use crate::replica::Replica;

impl Replica {
    /// A page of a patient's current pointers that `reader` may see, with
    /// the exact total.
    pub async fn search(&self, reader: &Reader, purpose: &Purpose, q: Search) -> Result<SearchPage, ReadError> {
        let (reader, purpose) = (reader.clone(), purpose.clone());
        self.read(move |view| query::search(view, &reader, &purpose, &q)).await
    }

    /// The pointer `id`, with whether `reader` may see it.
    pub async fn pointer(
        &self,
        reader: &Reader,
        purpose: &Purpose,
        id: &PointerId,
    ) -> Result<Option<PointerRead>, ReadError> {
        let (reader, purpose, id) = (reader.clone(), purpose.clone(), id.clone());
        self.read(move |view| query::pointer(view, &reader, &purpose, &id)).await
    }

    /// The organisations holding pointers of `subject` (or of its
    /// survivor) that `reader` may see, with how many each.
    pub async fn record_holders(
        &self,
        reader: &Reader,
        purpose: &Purpose,
        subject: &NhsNumber,
    ) -> Result<HoldersRead, ReadError> {
        let (reader, purpose, subject) = (reader.clone(), purpose.clone(), *subject);
        self.read(move |view| query::record_holders(view, &reader, &purpose, &subject)).await
    }

    /// A pointer as stored, whoever may see it: for the write path only
    /// (the patient a delete's audit record names; a merge may since have
    /// moved the pointer to its survivor, which the audit of a write to a
    /// retired number also names).
    pub async fn stored_pointer(&self, id: &PointerId) -> Result<Option<RecordPointer>, ReadError> {
        let id = id.clone();
        self.read(move |view| view.pointer(&id)).await
    }
}

impl Replica {
    /// The versions of pointer `id` (`version`: that one only), at most
    /// `limit`, with what `reader` may know of the pointer.
    pub async fn history(
        &self,
        reader: &Reader,
        purpose: &Purpose,
        id: &PointerId,
        version: Option<u64>,
        limit: usize,
    ) -> Result<Option<HistoryRead>, ReadError> {
        let (reader, purpose, id) = (reader.clone(), purpose.clone(), id.clone());
        self.read(move |view| query::history(view, &reader, &purpose, &id, version, limit)).await
    }

    /// The cluster's paging-token key, if one has been set.
    pub async fn paging_key(&self) -> Result<Option<PagingKey>, ReadError> {
        self.read(|view| view.paging_key()).await
    }

    /// Every node's anchored audit chain head, as this replica knows them.
    pub async fn audit_anchors(&self) -> Result<Vec<hie_domain::AuditAnchor>, ReadError> {
        self.read(|view| view.audit_anchors()).await
    }
}

impl Replica {
    /// The patient an identifier (an NHS Number or a registered local
    /// identifier) names, as this replica knows it.
    pub async fn subject_of(&self, id: &Identifier) -> Result<SubjectOf, ReadError> {
        let id = id.clone();
        self.read(move |view| query::subject_of(view, &id)).await
    }

    /// PIXm's cross-reference query (ITI-83).
    pub async fn pix(&self, source: &Identifier, targets: &[String]) -> Result<PixAnswer, ReadError> {
        let (source, targets) = (source.clone(), targets.to_vec());
        self.read(move |view| query::pix(view, &source, &targets)).await
    }
}

impl Replica {
    /// The replicated registry: pointer types, producers and consumers.
    pub async fn registry(&self) -> Result<hie_domain::Registry, ReadError> {
        self.read(|view| view.registry()).await
    }
}

impl Replica {
    /// May `reader` break the glass, as this replica's registry says (a
    /// local read: it answers on a node cut off from the quorum too).
    pub async fn may_break_glass(&self, reader: &Reader) -> Result<bool, ReadError> {
        let reader = reader.clone();
        self.read(move |view| query::may_break_glass(view, &reader)).await
    }
}

impl Replica {
    /// A subscription as this replica holds it.
    pub async fn subscription(
        &self,
        id: &hie_domain::SubscriptionId,
    ) -> Result<Option<hie_domain::Subscription>, ReadError> {
        let id = id.clone();
        self.read(move |view| view.subscription(&id)).await
    }

    /// Every subscription, at most `limit` (the deliverer's start).
    pub async fn subscriptions(&self, limit: usize) -> Result<Vec<hie_domain::Subscription>, ReadError> {
        self.read(move |view| view.subscriptions(limit)).await
    }

    /// A subscription's retained events numbered `from` to `until`, at most `limit`.
    pub async fn subscription_events(
        &self,
        id: &hie_domain::SubscriptionId,
        from: u64,
        until: u64,
        limit: usize,
    ) -> Result<Vec<hie_domain::SubscriptionEvent>, ReadError> {
        let id = id.clone();
        self.read(move |view| view.subscription_events(&id, from, until, limit)).await
    }

    /// Whether `subject` has opted out of sharing (as this replica knows it).
    pub async fn opted_out(&self, subject: &NhsNumber) -> Result<bool, ReadError> {
        let subject = *subject;
        self.read(move |view| Ok(view.patient(&subject)?.is_some_and(|p| p.opted_out))).await
    }
}
