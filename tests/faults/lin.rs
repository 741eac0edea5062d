//! A linearizability checker for one patient's pointers, modelled as a set
//! of masterIdentifier values: create adds one, delete removes one, a
//! linearizable search reads the whole set.
//!
//! The search is Wing and Gong's, with Lowe's memoisation (the algorithm of
//! Knossos and Porcupine): linearize, one at a time, an operation that could
//! come next (one invoked before every pending operation's completion),
//! backtracking on a result the model contradicts. An operation whose outcome
//! is unknown (a timeout, a 5xx) never completes: it may take effect at any
//! point after it was invoked, or never.

use std::collections::{BTreeSet, HashSet};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Create the pointer with this masterIdentifier.
    Add(String),
    /// Delete it; `present` is false when the delete answered 404.
    Remove { item: String, present: bool },
    /// A linearizable search returned exactly these.
    Read(BTreeSet<String>),
}

#[derive(Debug, Clone)]
pub struct Op {
    pub kind: Kind,
    /// Nanoseconds since the run began.
    pub invoke: u64,
    /// None: the outcome is unknown (a timeout, a 5xx): it may take effect
    /// at any point after its invocation and before `settled`, or never.
    pub complete: Option<u64>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order explains the history; `op` is the earliest completed operation
    /// that no explanation got past.
    Violation {
        op: usize,
    },
    /// The search hit its state budget without an answer.
    Unknown,
}

/// Most distinct search states explored per history.
pub const SEARCH_STATES_MAX: usize = 1_000_000;

/// An operation as the search sees it: items interned, unknown ones bounded.
struct Step {
    kind: StepKind,
    invoke: u64,
    complete: u64,
    /// May be left out (its outcome was unknown).
    optional: bool,
}

enum StepKind {
    Add(usize),
    Remove(usize, bool),
    Read(Vec<u64>),
}

/// Checks `ops`. `settled` is a time by which every operation that was ever
/// going to take effect has (the cluster had converged with no client
/// running); unknown operations take effect before it or never.
pub fn check(ops: &[Op], settled: u64) -> Verdict {
    // An unknown create whose pointer no read ever saw, and that no
    // acknowledged delete found, is left out: taking effect could only
    // contradict reads. This keeps the search small.
    let seen: HashSet<&str> = ops
        .iter()
        .flat_map(|o| match &o.kind {
            Kind::Read(s) => s.iter().map(String::as_str).collect::<Vec<_>>(),
            Kind::Remove { item, present: true } if o.complete.is_some() => vec![item.as_str()],
            _ => vec![],
        })
        .collect();
    let keep: Vec<usize> = (0..ops.len())
        .filter(|&i| !(ops[i].complete.is_none() && matches!(&ops[i].kind, Kind::Add(m) if !seen.contains(m.as_str()))))
        .collect();
    let mut items: Vec<&str> = ops
        .iter()
        .flat_map(|o| match &o.kind {
            Kind::Add(m) | Kind::Remove { item: m, .. } => vec![m.as_str()],
            Kind::Read(s) => s.iter().map(String::as_str).collect(),
        })
        .collect();
    items.sort_unstable();
    items.dedup();
    let words = items.len().div_ceil(64).max(1);
    let index = |m: &str| items.binary_search(&m).expect("interned");
    let bounds = unknown_bounds(ops);
    let steps: Vec<Step> = keep
        .iter()
        .map(|&i| {
            let o = &ops[i];
            let kind = match &o.kind {
                Kind::Add(m) => StepKind::Add(index(m)),
                Kind::Remove { item, present } => StepKind::Remove(index(item), *present),
                Kind::Read(set) => {
                    let mut bits = vec![0u64; words];
                    for m in set {
                        let j = index(m);
                        bits[j / 64] |= 1 << (j % 64);
                    }
                    StepKind::Read(bits)
                }
            };
            // An unknown operation that a later one shows took effect must
            // have taken effect before that one completed (see `unknown_bounds`).
            let complete = o.complete.or(bounds[i].map(|b| b.min(settled.max(o.invoke))));
            Step {
                kind,
                invoke: o.invoke,
                complete: complete.unwrap_or(settled.max(o.invoke)),
                optional: complete.is_none(),
            }
        })
        .collect();
    let mut order: Vec<usize> = (0..steps.len()).collect();
    order.sort_by_key(|&i| steps[i].invoke);
    let mut search = Search {
        steps: &steps,
        order,
        seen: HashSet::new(),
        done: vec![0u64; steps.len().div_ceil(64).max(1)],
        state: vec![0u64; words],
        stuck: None,
    };
    match search.run() {
        Some(true) => Verdict::Linearizable,
        Some(false) => Verdict::Violation { op: search.stuck.map_or(0, |s| keep[s]) },
        None => Verdict::Unknown,
    }
}

/// For each operation of unknown outcome, the time by which it must have
/// taken effect if a later operation shows that it did: a read that found
/// the pointer (or a delete that found it) for an unknown create, a read
/// made after the create that no longer found it for an unknown delete.
/// Each masterIdentifier is created at most once and deleted at most once
/// (the clients draw new ones from a counter and never delete one twice),
/// so the operation that shows it is the only one that could have caused
/// what it shows. Bounding these operations, rather than leaving them free
/// to the end of the run, leaves the set of valid orders as it was and
/// keeps the search small: an unbounded operation is pending over the whole
/// history and doubles the states at every step.
fn unknown_bounds(ops: &[Op]) -> Vec<Option<u64>> {
    let mut found: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for o in ops {
        let (shown, t): (Vec<&str>, u64) = match (&o.kind, o.complete) {
            (Kind::Read(set), Some(t)) => (set.iter().map(String::as_str).collect(), t),
            (Kind::Remove { item, present: true }, Some(t)) => (vec![item.as_str()], t),
            _ => continue,
        };
        for m in shown {
            let e = found.entry(m).or_insert(t);
            *e = (*e).min(t);
        }
    }
    let mut bounds: Vec<Option<u64>> = vec![None; ops.len()];
    // When each create had taken effect at the latest (known or bounded).
    let mut added: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for (i, o) in ops.iter().enumerate() {
        if let Kind::Add(m) = &o.kind {
            let by = o.complete.or_else(|| found.get(m.as_str()).copied());
            bounds[i] = if o.complete.is_none() { by } else { None };
            if let Some(t) = by {
                added.insert(m.as_str(), t);
            }
        }
    }
    for (i, o) in ops.iter().enumerate() {
        if let (Kind::Remove { item, .. }, None) = (&o.kind, o.complete) {
            let Some(&after) = added.get(item.as_str()) else { continue };
            bounds[i] = ops
                .iter()
                .filter_map(|r| match (&r.kind, r.complete) {
                    (Kind::Read(set), Some(t)) if r.invoke > after && !set.contains(item) => Some(t),
                    _ => None,
                })
                .min();
        }
    }
    bounds
}

struct Search<'a> {
    steps: &'a [Step],
    order: Vec<usize>,
    seen: HashSet<(Vec<u64>, Vec<u64>)>,
    done: Vec<u64>,
    state: Vec<u64>,
    stuck: Option<usize>,
}

/// What applying a step did to the model's state.
enum Applied {
    /// The step's result is impossible in this state.
    Refused,
    /// Allowed, and the state is as it was.
    Unchanged,
    /// Allowed, and member `m` was flipped: flip it back to undo.
    Flipped(usize),
}

fn bit(v: &[u64], i: usize) -> bool {
    v[i / 64] & (1 << (i % 64)) != 0
}

fn flip(v: &mut [u64], i: usize) {
    v[i / 64] ^= 1 << (i % 64);
}

impl Search<'_> {
    /// Applies step `i` if the model allows its result; says what to undo.
    fn apply(&mut self, i: usize) -> Applied {
        match &self.steps[i].kind {
            StepKind::Add(m) => {
                if bit(&self.state, *m) {
                    return Applied::Unchanged;
                }
                flip(&mut self.state, *m);
                Applied::Flipped(*m)
            }
            StepKind::Remove(m, present) => {
                if bit(&self.state, *m) != *present {
                    return Applied::Refused;
                }
                if *present {
                    flip(&mut self.state, *m);
                    return Applied::Flipped(*m);
                }
                Applied::Unchanged
            }
            StepKind::Read(bits) => {
                if *bits == self.state {
                    Applied::Unchanged
                } else {
                    Applied::Refused
                }
            }
        }
    }

    /// Some(true): the rest linearizes. Some(false): it cannot. None: budget spent.
    fn run(&mut self) -> Option<bool> {
        let pending: Vec<usize> = self.order.iter().copied().filter(|&i| !bit(&self.done, i)).collect();
        if pending.iter().all(|&i| self.steps[i].optional) {
            return Some(true);
        }
        if !self.seen.insert((self.done.clone(), self.state.clone())) {
            return Some(false);
        }
        if self.seen.len() > SEARCH_STATES_MAX {
            return None;
        }
        // An operation may go next only if it was invoked before every
        // pending operation completed.
        let horizon = pending.iter().map(|&i| self.steps[i].complete).min().unwrap_or(u64::MAX);
        for &i in &pending {
            if self.steps[i].invoke > horizon {
                break;
            }
            // Take effect now...
            let applied = self.apply(i);
            if !matches!(applied, Applied::Refused) {
                flip(&mut self.done, i);
                let r = self.run();
                flip(&mut self.done, i);
                if let Applied::Flipped(m) = applied {
                    flip(&mut self.state, m);
                }
                if r != Some(false) {
                    return r;
                }
            }
            // ...or, for an unknown outcome, never.
            if self.steps[i].optional {
                flip(&mut self.done, i);
                let r = self.run();
                flip(&mut self.done, i);
                if r != Some(false) {
                    return r;
                }
            }
        }
        let first =
            pending.iter().copied().filter(|&i| !self.steps[i].optional).min_by_key(|&i| self.steps[i].complete);
        if self.stuck.is_none_or(|s| first.is_some_and(|f| self.steps[f].complete > self.steps[s].complete)) {
            self.stuck = first;
        }
        Some(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }
    fn op(kind: Kind, invoke: u64, complete: Option<u64>) -> Op {
        Op { kind, invoke, complete }
    }
    fn add(s: &str) -> Kind {
        Kind::Add(s.into())
    }

    #[test]
    fn an_unknown_operation_is_bounded_by_the_first_operation_that_shows_it() {
        let remove = |m: &str| Kind::Remove { item: m.into(), present: true };
        let h = [
            op(add("a"), 0, None),    // seen by the reads at 20 and 40: by 21
            op(add("b"), 1, None),    // never seen: free
            op(add("c"), 2, Some(3)), // known
            op(Kind::Read(set(&["a", "c"])), 20, Some(21)),
            op(remove("a"), 25, None), // gone from the read invoked at 50: by 51
            op(remove("c"), 26, None), // the read at 10 was before c's create completed: free
            op(Kind::Read(set(&["a", "c"])), 40, Some(41)),
            op(Kind::Read(set(&["c"])), 50, Some(51)),
            op(Kind::Read(set(&[])), 2, Some(10)),
        ];
        assert_eq!(unknown_bounds(&h), vec![Some(21), None, None, None, Some(51), None, None, None, None]);
    }

    #[test]
    fn unknown_operations_explained_by_later_reads_linearize_and_a_lost_one_is_still_caught() {
        // As the fault clients make them: 40 creates with unknown outcomes,
        // each seen by the next read, and unknown deletes of every fourth,
        // seen gone by a later read. The bounds must keep every valid order
        // (this linearizes) and still catch a lost pointer. (This history is
        // small enough that the search decides it without the bounds too.)
        let n = 40;
        let name = |i: usize| format!("a{i}");
        let mut h = Vec::new();
        for i in 0..n {
            let t = 100 * i as u64;
            h.push(op(add(&name(i)), t, None));
            let seen = (0..=i).filter(|&j| !(j % 4 == 0 && j + 1 < i)).map(name);
            h.push(op(Kind::Read(seen.collect()), t + 50, Some(t + 60)));
            if i % 4 == 0 {
                h.push(op(Kind::Remove { item: name(i), present: true }, t + 70, None));
            }
        }
        assert_eq!(check(&h, 100_000), Verdict::Linearizable);
        // The same with one pointer missing from the last read and present
        // again in none: a create that was seen and then lost.
        let last = h.len() - 1;
        let Kind::Read(set) = &mut h[last].kind else { unreachable!() };
        set.remove("a1");
        assert!(matches!(check(&h, 100_000), Verdict::Violation { .. }));
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = [
            op(add("a"), 0, Some(1)),
            op(Kind::Read(set(&["a"])), 2, Some(3)),
            op(Kind::Remove { item: "a".into(), present: true }, 4, Some(5)),
            op(Kind::Read(set(&[])), 6, Some(7)),
        ];
        assert_eq!(check(&h, 1000), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_after_an_acknowledged_write_is_a_violation() {
        let h = [op(add("a"), 0, Some(1)), op(Kind::Read(set(&[])), 2, Some(3))];
        assert!(matches!(check(&h, 1000), Verdict::Violation { .. }));
    }

    #[test]
    fn a_lost_write_is_a_violation_and_a_reappearing_one_too() {
        let lost =
            [op(add("a"), 0, Some(1)), op(Kind::Read(set(&["a"])), 2, Some(3)), op(Kind::Read(set(&[])), 4, Some(5))];
        assert!(matches!(check(&lost, 1000), Verdict::Violation { .. }));
        let invented = [op(Kind::Read(set(&["b"])), 0, Some(1))];
        assert!(matches!(check(&invented, 1000), Verdict::Violation { .. }));
    }

    #[test]
    fn concurrent_operations_may_take_either_order() {
        let h =
            [op(add("a"), 0, Some(10)), op(Kind::Read(set(&[])), 1, Some(2)), op(Kind::Read(set(&["a"])), 3, Some(4))];
        assert_eq!(check(&h, 1000), Verdict::Linearizable);
    }

    #[test]
    fn an_unknown_operation_may_have_happened_or_not_but_only_once() {
        let happened = [op(add("a"), 0, None), op(Kind::Read(set(&["a"])), 5, Some(6))];
        assert_eq!(check(&happened, 1000), Verdict::Linearizable);
        let not = [op(add("a"), 0, None), op(Kind::Read(set(&[])), 5, Some(6))];
        assert_eq!(check(&not, 1000), Verdict::Linearizable);
        // Seen, then gone with no delete: not explained by any order.
        let flicker =
            [op(add("a"), 0, None), op(Kind::Read(set(&["a"])), 5, Some(6)), op(Kind::Read(set(&[])), 7, Some(8))];
        assert!(matches!(check(&flicker, 1000), Verdict::Violation { .. }));
        // An unknown op takes effect before the history settles, or never.
        let late = [
            op(add("a"), 0, None),
            op(Kind::Read(set(&[])), 2000, Some(2001)),
            op(Kind::Read(set(&["a"])), 2002, Some(2003)),
        ];
        assert!(matches!(check(&late, 1000), Verdict::Violation { .. }));
        // An unknown op cannot take effect before it was invoked.
        let early = [op(Kind::Read(set(&["a"])), 0, Some(1)), op(add("a"), 2, None)];
        assert!(matches!(check(&early, 1000), Verdict::Violation { .. }));
    }
}
