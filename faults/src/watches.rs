//! Watch guarantees, checked on what one watcher of every key received during a campaign
//! against the history of the writes.
//!
//! **Properties** (for a watch opened before the first write and read until it caught up
//! with the final reads):
//! 1. *ordered, unique, atomic*: per range, the revisions of the responses strictly increase,
//!    and every event of a response has the response's revision, so each revision comes
//!    once, whole, in order;
//! 2. *bookmarked*: after a progress notification at revision R of a range, no response of
//!    that range at a revision ≤ R follows;
//! 3. *reliable*: every acknowledged write (a put, or a swap that succeeded) is an event of
//!    its key carrying its value, and every event carries a value some write wrote (no
//!    phantom); the last event of each key carries the value the final read returned;
//! 4. the watch never ends with an error (the client library resumes it across node
//!    failures);
//! 5. *resumable*: a second watch, opened once the campaign is over from a revision R the
//!    first one saw (chosen by the seed), delivers for every register exactly the events at or
//!    above R that the first one delivered, in the same order, and 1, 2 and 4 hold of it too.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::history::{Call, Op, Outcome};

/// An event as the watcher saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenEvent {
    /// The register.
    pub key: u64,
    /// The event's revision (the key's modification revision).
    pub mod_revision: u64,
    /// The value put (none: a deletion, or a value that is not a number).
    pub value: Option<u64>,
}

/// A response as the watcher saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// The range it came from.
    pub range: u64,
    /// Its revision.
    pub revision: u64,
    /// A progress notification (no events).
    pub progress: bool,
    /// Its events.
    pub events: Vec<SeenEvent>,
}

/// A broken guarantee.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Violation {
    /// A response of a range at or below the revision of an earlier one.
    OutOfOrder {
        /// The range.
        range: u64,
        /// The earlier revision.
        after: u64,
        /// The revision that came after it.
        revision: u64,
    },
    /// A response at or below a bookmark of its range.
    BehindBookmark {
        /// The range.
        range: u64,
        /// The bookmark.
        bookmark: u64,
        /// The revision that came after it.
        revision: u64,
    },
    /// An event whose revision is not its response's.
    SplitRevision {
        /// The range.
        range: u64,
        /// The response's revision.
        revision: u64,
        /// The event's.
        event_revision: u64,
    },
    /// An acknowledged write that never came.
    Missing {
        /// The register.
        key: u64,
        /// Its value.
        value: u64,
    },
    /// An event of a value nobody wrote.
    Phantom {
        /// The register.
        key: u64,
        /// The value.
        value: Option<u64>,
    },
    /// The last event of a key differs from the final read.
    FinalMismatch {
        /// The register.
        key: u64,
        /// The last event's value.
        last_event: Option<u64>,
        /// The final read's.
        final_read: Option<u64>,
    },
    /// The watch ended with an error.
    Ended(String),
    /// A watch resumed from a revision did not deliver a register's events from there as the
    /// first watch did.
    NotResumed {
        /// The register.
        key: u64,
        /// The revision the watch was resumed from.
        from: u64,
        /// The revisions of the first watch's events of it at or above `from`.
        expected: Vec<u64>,
        /// The revisions of the resumed watch's.
        got: Vec<u64>,
    },
}

/// Each register's events in a stream: revision and value, in arrival order.
type ByKey = BTreeMap<u64, Vec<(u64, Option<u64>)>>;

/// Properties 1, 2 and 4 of one stream; returns its events by register.
fn check_stream(seen: &[Seen], ended: Option<&str>, violations: &mut Vec<Violation>) -> ByKey {
    if let Some(e) = ended {
        violations.push(Violation::Ended(e.to_string()));
    }
    let mut last: HashMap<u64, u64> = HashMap::new();
    let mut bookmark: HashMap<u64, u64> = HashMap::new();
    let mut by_key = ByKey::new();
    for s in seen {
        if let Some(&b) = bookmark.get(&s.range) {
            if s.revision <= b && !s.progress {
                violations.push(Violation::BehindBookmark {
                    range: s.range,
                    bookmark: b,
                    revision: s.revision,
                });
            }
        }
        if s.progress {
            let b = bookmark.entry(s.range).or_insert(0);
            *b = (*b).max(s.revision);
            continue;
        }
        if let Some(&after) = last.get(&s.range) {
            if s.revision <= after {
                violations.push(Violation::OutOfOrder {
                    range: s.range,
                    after,
                    revision: s.revision,
                });
            }
        }
        last.insert(s.range, s.revision);
        for e in &s.events {
            if e.mod_revision != s.revision {
                violations.push(Violation::SplitRevision {
                    range: s.range,
                    revision: s.revision,
                    event_revision: e.mod_revision,
                });
            }
            by_key
                .entry(e.key)
                .or_default()
                .push((e.mod_revision, e.value));
        }
    }
    by_key
}

/// Property 5: what a watch resumed from revision `from` saw (`resumed`, `ended`) against
/// what the first watch saw (`first`, already checked by [`check`]).
pub fn check_resumed(
    first: &[Seen],
    from: u64,
    resumed: &[Seen],
    ended: Option<&str>,
) -> Vec<Violation> {
    let mut violations = Vec::new();
    let got = check_stream(resumed, ended, &mut violations);
    let expected = check_stream(first, None, &mut Vec::new());
    let keys: BTreeSet<u64> = got.keys().chain(expected.keys()).copied().collect();
    for key in keys {
        // Everything the resumed watch delivered counts: an event below `from` is wrong too.
        let want: Vec<(u64, Option<u64>)> = expected
            .get(&key)
            .into_iter()
            .flatten()
            .filter(|(revision, _)| *revision >= from)
            .copied()
            .collect();
        let have = got.get(&key).cloned().unwrap_or_default();
        if want != have {
            let revisions = |events: &[(u64, Option<u64>)]| events.iter().map(|e| e.0).collect();
            violations.push(Violation::NotResumed {
                key,
                from,
                expected: revisions(&want),
                got: revisions(&have),
            });
        }
    }
    violations
}

/// Checks what the watcher saw (`seen`, in arrival order; `ended`: its error, if it ended)
/// against `history`, whose reads by `final_reader` are the final reads.
pub fn check(
    seen: &[Seen],
    ended: Option<&str>,
    history: &[Op],
    final_reader: u32,
) -> Vec<Violation> {
    let mut violations = Vec::new();
    let by_key = check_stream(seen, ended, &mut violations);

    let mut written: HashSet<(u64, u64)> = HashSet::new();
    let mut acknowledged: Vec<(u64, u64)> = Vec::new();
    let mut final_reads: BTreeMap<u64, Option<u64>> = BTreeMap::new();
    for op in history {
        let value = match op.call {
            Call::Write(v) => Some((v, op.outcome == Outcome::Written)),
            Call::Cas { new, .. } => Some((new, op.outcome == Outcome::Cas(true))),
            Call::Read => None,
        };
        if let Some((v, acked)) = value {
            // Failed swaps wrote nothing; unknown ones may have.
            if op.outcome != Outcome::Cas(false) {
                written.insert((op.key, v));
            }
            if acked {
                acknowledged.push((op.key, v));
            }
        }
        if let (Call::Read, Outcome::Read(v), true) =
            (op.call, op.outcome, op.client == final_reader)
        {
            final_reads.insert(op.key, v);
        }
    }
    let delivered: HashSet<(u64, u64)> = by_key
        .iter()
        .flat_map(|(k, events)| events.iter().filter_map(move |(_, v)| v.map(|v| (*k, v))))
        .collect();
    for &(key, value) in &acknowledged {
        if !delivered.contains(&(key, value)) {
            violations.push(Violation::Missing { key, value });
        }
    }
    for (&key, events) in &by_key {
        for &(_, value) in events {
            if !value.is_some_and(|v| written.contains(&(key, v))) {
                violations.push(Violation::Phantom { key, value });
            }
        }
    }
    for (&key, &final_read) in &final_reads {
        let last_event = by_key
            .get(&key)
            .and_then(|events| events.iter().max_by_key(|(r, _)| *r))
            .and_then(|(_, v)| *v);
        if last_event != final_read {
            violations.push(Violation::FinalMismatch {
                key,
                last_event,
                final_read,
            });
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    const FINAL: u32 = u32::MAX;

    fn write(key: u64, value: u64, outcome: Outcome) -> Op {
        Op {
            client: 0,
            key,
            call: Call::Write(value),
            outcome,
            invoked_ns: 0,
            returned_ns: 1,
        }
    }

    fn final_read(key: u64, value: Option<u64>) -> Op {
        Op {
            client: FINAL,
            key,
            call: Call::Read,
            outcome: Outcome::Read(value),
            invoked_ns: 2,
            returned_ns: 3,
        }
    }

    fn response(range: u64, revision: u64, events: &[(u64, u64)]) -> Seen {
        Seen {
            range,
            revision,
            progress: false,
            events: events
                .iter()
                .map(|&(key, value)| SeenEvent {
                    key,
                    mod_revision: revision,
                    value: Some(value),
                })
                .collect(),
        }
    }

    fn bookmark(range: u64, revision: u64) -> Seen {
        Seen {
            range,
            revision,
            progress: true,
            events: Vec::new(),
        }
    }

    fn history() -> Vec<Op> {
        vec![
            write(1, 10, Outcome::Written),
            write(1, 11, Outcome::Unknown),
            write(2, 20, Outcome::Written),
            final_read(1, Some(10)),
            final_read(2, Some(20)),
        ]
    }

    #[test]
    fn a_complete_ordered_stream_passes() {
        let seen = [
            response(1, 5, &[(1, 10)]),
            bookmark(1, 5),
            response(2, 3, &[(2, 20)]),
        ];
        assert_eq!(check(&seen, None, &history(), FINAL), vec![]);
    }

    #[test]
    fn a_missing_acknowledged_write_is_caught() {
        let seen = [response(1, 5, &[(1, 10)])];
        assert_eq!(
            check(&seen, None, &history(), FINAL),
            vec![
                Violation::Missing { key: 2, value: 20 },
                Violation::FinalMismatch {
                    key: 2,
                    last_event: None,
                    final_read: Some(20)
                }
            ]
        );
    }

    #[test]
    fn duplicates_reorders_and_bookmark_breaks_are_caught() {
        let seen = [
            response(2, 3, &[(2, 20)]),
            response(1, 5, &[(1, 10)]),
            response(1, 5, &[(1, 10)]),
        ];
        let found = check(&seen, None, &history(), FINAL);
        assert_eq!(
            found,
            vec![Violation::OutOfOrder {
                range: 1,
                after: 5,
                revision: 5
            }]
        );
        let seen = [
            response(1, 5, &[(1, 10)]),
            bookmark(2, 4),
            response(2, 3, &[(2, 20)]),
        ];
        let found = check(&seen, None, &history(), FINAL);
        assert_eq!(
            found,
            vec![Violation::BehindBookmark {
                range: 2,
                bookmark: 4,
                revision: 3
            }]
        );
    }

    #[test]
    fn phantoms_and_a_wrong_last_value_are_caught() {
        // 11 may have been written (unknown outcome); 12 never was.
        let seen = [
            response(1, 5, &[(1, 10)]),
            response(1, 6, &[(1, 11)]),
            response(1, 7, &[(1, 12)]),
            response(2, 3, &[(2, 20)]),
        ];
        let found = check(&seen, None, &history(), FINAL);
        assert_eq!(
            found,
            vec![
                Violation::Phantom {
                    key: 1,
                    value: Some(12)
                },
                Violation::FinalMismatch {
                    key: 1,
                    last_event: Some(12),
                    final_read: Some(10)
                }
            ]
        );
    }

    #[test]
    fn an_event_split_from_its_revision_and_an_ended_watch_are_caught() {
        let mut split = response(1, 5, &[(1, 10)]);
        split.events[0].mod_revision = 4;
        let seen = [split, response(2, 3, &[(2, 20)])];
        let found = check(&seen, Some("EXHAUSTED"), &history(), FINAL);
        assert_eq!(
            found,
            vec![
                Violation::Ended("EXHAUSTED".into()),
                Violation::SplitRevision {
                    range: 1,
                    revision: 5,
                    event_revision: 4
                }
            ]
        );
    }

    #[test]
    fn a_watch_resumed_from_a_revision_must_replay_exactly_what_followed() {
        // Range 1 writes keys 1 and 2 at revisions 3, 5, 8; range 2 key 3 at 4 and 6.
        let first = [
            response(1, 3, &[(1, 10)]),
            response(2, 4, &[(3, 30)]),
            bookmark(2, 4),
            response(1, 5, &[(1, 11), (2, 20)]),
            response(2, 6, &[(3, 31)]),
            response(1, 8, &[(2, 21)]),
        ];
        // From 5 on, in another interleaving of the ranges: fine.
        let resumed = [
            response(2, 6, &[(3, 31)]),
            response(1, 5, &[(1, 11), (2, 20)]),
            response(1, 8, &[(2, 21)]),
        ];
        assert_eq!(check_resumed(&first, 5, &resumed, None), vec![]);
        // A revision skipped, one from before the start, and an ended watch.
        let gappy = [
            response(1, 3, &[(1, 10)]),
            response(1, 8, &[(2, 21)]),
            response(2, 6, &[(3, 31)]),
        ];
        assert_eq!(
            check_resumed(&first, 5, &gappy, Some("EXHAUSTED")),
            vec![
                Violation::Ended("EXHAUSTED".into()),
                Violation::NotResumed {
                    key: 1,
                    from: 5,
                    expected: vec![5],
                    got: vec![3]
                },
                Violation::NotResumed {
                    key: 2,
                    from: 5,
                    expected: vec![5, 8],
                    got: vec![8]
                },
            ]
        );
        // The resumed stream's own order is checked as the first one's is.
        let backwards = [
            response(1, 8, &[(2, 21)]),
            response(1, 5, &[(1, 11), (2, 20)]),
            response(2, 6, &[(3, 31)]),
        ];
        let found = check_resumed(&first, 5, &backwards, None);
        assert!(
            found.contains(&Violation::OutOfOrder {
                range: 1,
                after: 8,
                revision: 5
            }),
            "{found:?}"
        );
    }
}
