//! Linearizability of a history of registers, checked key by key.
//!
//! **Property:** for each key there is a total order of its operations that
//! 1. respects real time: an operation that returned before another was invoked comes first;
//! 2. is legal for a register: a read returns the value of the last write before it (none if
//!    there was none), a compare-and-swap succeeds exactly when the register holds its
//!    expected value;
//! 3. holds every operation whose outcome is known, while one whose outcome is unknown may be
//!    in it anywhere after its invocation, or not at all.
//!
//! Linearizability is compositional (Herlihy and Wing), so checking each key on its own
//! checks the whole history. The search is Wing and Gong's with Lowe's memoization (the one
//! porcupine uses): walk the calls and returns in time order; linearize a pending call when
//! the register allows its outcome; on reaching the return of an operation not linearized
//! yet, undo the last choice. A (set of linearized operations, register value) pair already
//! explored is not explored again; the set is remembered by a 128-bit Zobrist hash (the XOR
//! of a random number per operation), so that memory does not grow with the history's length
//! at every step (a collision, about 2^-64 likely in a long run, could only make the search
//! miss an order and report a violation that is not one, never hide one). An operation of unknown outcome returns at infinity, so it
//! can always be linearized last, which is "it never took effect". The search is bounded by a
//! number of steps; a key that needs more is reported inconclusive, never as passing.

use std::collections::{BTreeMap, HashSet};

use crate::history::{Call, Op, Outcome, Value};

/// What the check found for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A legal order exists.
    Linearizable,
    /// No legal order exists.
    NotLinearizable,
    /// The search ran out of steps.
    Inconclusive,
}

/// What the check found for a whole history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Keys checked.
    pub keys: usize,
    /// Operations checked (reads without an answer are left out: they saw and did nothing).
    pub ops: usize,
    /// Keys whose history is not linearizable.
    pub violations: Vec<u64>,
    /// Keys whose search ran out of steps.
    pub inconclusive: Vec<u64>,
}

impl Report {
    /// True when every key is linearizable.
    pub fn passed(&self) -> bool {
        self.violations.is_empty() && self.inconclusive.is_empty()
    }
}

/// Checks every key of `history`, each search bounded by `steps_max` steps.
pub fn check(history: &[Op], steps_max: u64) -> Report {
    let mut by_key: BTreeMap<u64, Vec<&Op>> = BTreeMap::new();
    for op in history {
        // A read that did not answer observed nothing and changed nothing.
        if op.call == Call::Read && op.is_unknown() {
            continue;
        }
        by_key.entry(op.key).or_default().push(op);
    }
    let mut report = Report {
        keys: by_key.len(),
        ..Report::default()
    };
    for (key, ops) in by_key {
        report.ops += ops.len();
        match check_key(&ops, steps_max) {
            Verdict::Linearizable => {}
            Verdict::NotLinearizable => report.violations.push(key),
            Verdict::Inconclusive => report.inconclusive.push(key),
        }
    }
    report
}

/// The register after `op` took effect on `state` with the outcome seen; none if it cannot
/// (a read of another value, a swap that should have failed, ...).
pub fn step(state: Value, op: &Op) -> Option<Value> {
    match (op.call, op.outcome) {
        (Call::Read, Outcome::Read(seen)) => (seen == state).then_some(state),
        (Call::Write(v), Outcome::Written | Outcome::Unknown) => Some(Some(v)),
        (Call::Cas { expected, new }, Outcome::Cas(true)) => {
            (state == Some(expected)).then_some(Some(new))
        }
        (Call::Cas { expected, .. }, Outcome::Cas(false)) => {
            (state != Some(expected)).then_some(state)
        }
        (Call::Cas { expected, new }, Outcome::Unknown) => Some(if state == Some(expected) {
            Some(new)
        } else {
            state
        }),
        // An outcome of another kind of operation (or an unanswered read) fits no state.
        _ => None,
    }
}

/// When `op` returned, for the search: never, if its outcome is unknown.
fn return_time(op: &Op) -> u64 {
    if op.is_unknown() {
        u64::MAX
    } else {
        op.returned_ns.max(op.invoked_ns)
    }
}

/// End of the entry list.
const NIL: usize = usize::MAX;

/// The calls and returns of one key's operations as a doubly linked list in time order, from
/// which linearized operations are lifted and put back (in reverse order of lifting).
struct Entries {
    /// Per entry (0 is the head): the operation, and whether this is its call.
    entry: Vec<(usize, bool)>,
    next: Vec<usize>,
    prev: Vec<usize>,
    /// Per operation: its return entry.
    return_of: Vec<usize>,
}

impl Entries {
    fn new(ops: &[&Op]) -> Entries {
        // Calls before returns at the same instant: operations that touch are concurrent,
        // the weaker order, which raises no false alarm.
        let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
        for (i, op) in ops.iter().enumerate() {
            events.push((op.invoked_ns, false, i));
            events.push((return_time(op), true, i));
        }
        events.sort_unstable();
        let len = events.len() + 1;
        let mut entries = Entries {
            entry: Vec::with_capacity(len),
            next: (1..=len).map(|n| if n == len { NIL } else { n }).collect(),
            prev: (0..len).map(|n| n.wrapping_sub(1)).collect(),
            return_of: vec![0; ops.len()],
        };
        entries.prev[0] = NIL;
        entries.entry.push((usize::MAX, false));
        for (at, (_, is_return, op)) in events.into_iter().enumerate() {
            entries.entry.push((op, !is_return));
            if is_return {
                entries.return_of[op] = at + 1;
            }
        }
        entries
    }

    fn first(&self) -> usize {
        self.next[0]
    }

    fn unlink(&mut self, e: usize) {
        self.next[self.prev[e]] = self.next[e];
        if self.next[e] != NIL {
            self.prev[self.next[e]] = self.prev[e];
        }
    }

    fn relink(&mut self, e: usize) {
        self.next[self.prev[e]] = e;
        if self.next[e] != NIL {
            self.prev[self.next[e]] = e;
        }
    }

    /// Takes the operation whose call is entry `call` out of the list.
    fn lift(&mut self, call: usize) {
        let ret = self.return_of[self.entry[call].0];
        self.unlink(call);
        self.unlink(ret);
    }

    /// Puts back the operation lifted last.
    fn unlift(&mut self, call: usize) {
        let ret = self.return_of[self.entry[call].0];
        self.relink(ret);
        self.relink(call);
    }
}

/// The Zobrist number of operation `i`: splitmix64 of `i`, twice.
fn zobrist(i: usize) -> u128 {
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let i = (i as u64)
        .wrapping_mul(2)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    (u128::from(mix(i)) << 64) | u128::from(mix(i.wrapping_add(1)))
}

/// Checks one key's operations (unanswered reads already left out).
pub fn check_key(ops: &[&Op], steps_max: u64) -> Verdict {
    let mut entries = Entries::new(ops);
    let numbers: Vec<u128> = (0..ops.len()).map(zobrist).collect();
    // The Zobrist hash of the set of linearized operations.
    let mut linearized: u128 = 0;
    let mut explored: HashSet<(u128, Value)> = HashSet::new();
    // The calls linearized, with the register before each.
    let mut chosen: Vec<(usize, Value)> = Vec::new();
    let mut state: Value = None;
    let mut at = entries.first();
    let mut steps = 0u64;
    while entries.first() != NIL {
        steps += 1;
        if steps > steps_max {
            return Verdict::Inconclusive;
        }
        let (op, is_call) = entries.entry[at];
        if is_call {
            if let Some(after) = step(state, ops[op]) {
                if explored.insert((linearized ^ numbers[op], after)) {
                    linearized ^= numbers[op];
                    chosen.push((at, state));
                    state = after;
                    entries.lift(at);
                    at = entries.first();
                    continue;
                }
            }
            at = entries.next[at];
        } else {
            // The return of an operation not linearized yet: undo the last choice.
            let Some((call, before)) = chosen.pop() else {
                return Verdict::NotLinearizable;
            };
            let op = entries.entry[call].0;
            linearized ^= numbers[op];
            state = before;
            entries.unlift(call);
            at = entries.next[call];
        }
    }
    Verdict::Linearizable
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const STEPS: u64 = 1_000_000;

    fn op(client: u32, call: Call, outcome: Outcome, invoked: u64, returned: u64) -> Op {
        Op {
            client,
            key: 0,
            call,
            outcome,
            invoked_ns: invoked,
            returned_ns: returned,
        }
    }

    fn w(v: u64, from: u64, to: u64) -> Op {
        op(0, Call::Write(v), Outcome::Written, from, to)
    }

    fn r(v: Value, from: u64, to: u64) -> Op {
        op(1, Call::Read, Outcome::Read(v), from, to)
    }

    fn verdict(ops: &[Op]) -> Verdict {
        let refs: Vec<&Op> = ops.iter().collect();
        check_key(&refs, STEPS)
    }

    #[test]
    fn a_read_after_a_write_returned_sees_it() {
        assert_eq!(
            verdict(&[w(1, 0, 10), r(Some(1), 20, 30)]),
            Verdict::Linearizable
        );
        assert_eq!(
            verdict(&[w(1, 0, 10), r(None, 20, 30)]),
            Verdict::NotLinearizable
        );
    }

    #[test]
    fn a_read_concurrent_with_a_write_sees_either_value() {
        assert_eq!(
            verdict(&[w(1, 0, 10), r(None, 5, 15)]),
            Verdict::Linearizable
        );
        assert_eq!(
            verdict(&[w(1, 0, 10), r(Some(1), 5, 15)]),
            Verdict::Linearizable
        );
    }

    #[test]
    fn a_value_never_written_cannot_be_read() {
        assert_eq!(
            verdict(&[w(1, 0, 10), r(Some(2), 5, 15)]),
            Verdict::NotLinearizable
        );
    }

    #[test]
    fn values_do_not_go_back_in_time() {
        // Two reads in sequence, both concurrent with the write: new then old is impossible.
        let history = [w(1, 0, 100), r(Some(1), 10, 20), r(None, 30, 40)];
        assert_eq!(verdict(&history), Verdict::NotLinearizable);
        let history = [w(1, 0, 100), r(None, 10, 20), r(Some(1), 30, 40)];
        assert_eq!(verdict(&history), Verdict::Linearizable);
    }

    #[test]
    fn a_write_of_unknown_outcome_may_or_may_not_have_happened() {
        let lost = op(0, Call::Write(1), Outcome::Unknown, 0, 10);
        assert_eq!(
            verdict(&[lost.clone(), r(Some(1), 20, 30)]),
            Verdict::Linearizable
        );
        assert_eq!(
            verdict(&[lost.clone(), r(None, 20, 30)]),
            Verdict::Linearizable
        );
        // ... even long after the client gave up on it, but not before it was invoked.
        assert_eq!(
            verdict(&[lost.clone(), r(None, 20, 30), r(Some(1), 40, 50)]),
            Verdict::Linearizable
        );
        let later = op(0, Call::Write(1), Outcome::Unknown, 10, 20);
        assert_eq!(
            verdict(&[r(Some(1), 0, 5), later]),
            Verdict::NotLinearizable
        );
    }

    #[test]
    fn compare_and_swap_succeeds_only_on_its_expected_value() {
        let cas = |expected, new, ok, from, to| {
            op(2, Call::Cas { expected, new }, Outcome::Cas(ok), from, to)
        };
        let history = [w(1, 0, 10), cas(1, 2, true, 20, 30), r(Some(2), 40, 50)];
        assert_eq!(verdict(&history), Verdict::Linearizable);
        // Two swaps from the same value cannot both succeed one after the other.
        let history = [
            w(1, 0, 10),
            cas(1, 2, true, 20, 30),
            cas(1, 3, true, 40, 50),
        ];
        assert_eq!(verdict(&history), Verdict::NotLinearizable);
        // A swap that failed although the value matched is a violation too.
        let history = [w(1, 0, 10), cas(1, 2, false, 20, 30)];
        assert_eq!(verdict(&history), Verdict::NotLinearizable);
        // A swap of unknown outcome explains a later read of its value.
        let unknown = op(
            2,
            Call::Cas {
                expected: 1,
                new: 2,
            },
            Outcome::Unknown,
            20,
            30,
        );
        let history = [w(1, 0, 10), unknown, r(Some(2), 40, 50)];
        assert_eq!(verdict(&history), Verdict::Linearizable);
    }

    #[test]
    fn a_lost_acknowledged_write_is_caught() {
        // Acknowledged, then the register reads as if it never happened.
        let history = [w(1, 0, 10), w(2, 20, 30), r(Some(1), 40, 50)];
        assert_eq!(verdict(&history), Verdict::NotLinearizable);
    }

    #[test]
    fn keys_are_checked_apart_and_unanswered_reads_are_left_out() {
        let mut other = r(None, 20, 30);
        other.key = 7;
        let unanswered = op(1, Call::Read, Outcome::Unknown, 0, 100);
        let report = check(&[w(1, 0, 10), other, unanswered], STEPS);
        assert_eq!(report.keys, 2);
        assert_eq!(report.ops, 2);
        assert!(report.passed());
        let report = check(&[w(1, 0, 10), r(None, 20, 30)], STEPS);
        assert_eq!(report.violations, vec![0]);
    }

    #[test]
    fn a_search_out_of_steps_is_inconclusive_not_passed() {
        let history: Vec<Op> = (0..20).map(|i| w(i, 0, 100)).collect();
        let refs: Vec<&Op> = history.iter().collect();
        assert_eq!(check_key(&refs, 3), Verdict::Inconclusive);
    }

    #[test]
    fn a_long_history_with_unknown_outcomes_is_checked_in_bounded_steps() {
        // 20,000 operations of 4 overlapping clients on one register, 1 in 50 writes of
        // unknown outcome (half of which took effect): the shape of a campaign's key.
        let mut ops = Vec::new();
        let mut state: Value = None;
        let mut seed = 7u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..20_000u64 {
            // Each operation takes effect at 10 i + 5, within [10 i - 12, 10 i + 17].
            let (from, to) = (10 * i + 100 - 12, 10 * i + 100 + 17);
            let dice = next() % 100;
            let o = if dice < 45 {
                op(1, Call::Read, Outcome::Read(state), from, to)
            } else if dice < 47 {
                if next() % 2 == 0 {
                    state = Some(i + 1);
                }
                op(0, Call::Write(i + 1), Outcome::Unknown, from, to)
            } else {
                state = Some(i + 1);
                op(0, Call::Write(i + 1), Outcome::Written, from, to)
            };
            ops.push(o);
        }
        let refs: Vec<&Op> = ops.iter().collect();
        assert_eq!(check_key(&refs, 50_000_000), Verdict::Linearizable);
    }

    /// The naive reference: tries every order (with every subset of the unknown operations
    /// left out) that respects real time.
    fn naive(ops: &[&Op]) -> bool {
        fn search(state: Value, remaining: &[usize], ops: &[&Op]) -> bool {
            if remaining.iter().all(|&i| ops[i].is_unknown()) {
                return true;
            }
            remaining.iter().any(|&i| {
                let blocked = remaining
                    .iter()
                    .any(|&j| j != i && return_time(ops[j]) < ops[i].invoked_ns);
                !blocked
                    && step(state, ops[i]).is_some_and(|after| {
                        let rest: Vec<usize> =
                            remaining.iter().copied().filter(|&j| j != i).collect();
                        search(after, &rest, ops)
                    })
            })
        }
        let all: Vec<usize> = (0..ops.len()).collect();
        search(None, &all, ops)
    }

    /// A history of up to 7 operations produced by a real register (each taking effect at a
    /// random instant of its interval), then possibly damaged: outcomes made unknown, reads
    /// changed.
    fn history() -> impl Strategy<Value = Vec<Op>> {
        let one = (
            0u8..3,
            0u64..100,
            0u64..30,
            0u64..1000,
            any::<bool>(),
            0u8..10,
            0u64..4,
        );
        proptest::collection::vec(one, 1..=7).prop_map(|specs| {
            let mut ops: Vec<(u64, Op)> = specs
                .iter()
                .enumerate()
                .map(|(i, &(kind, from, len, at, _, _, expect))| {
                    let call = match kind {
                        0 => Call::Read,
                        1 => Call::Write(i as u64 + 1),
                        _ => Call::Cas {
                            expected: expect + 1,
                            new: i as u64 + 1,
                        },
                    };
                    let point = from * 1000 + at * len;
                    let o = op(
                        i as u32,
                        call,
                        Outcome::Unknown,
                        from * 1000,
                        (from + len) * 1000,
                    );
                    (point, o)
                })
                .collect();
            ops.sort_by_key(|(point, _)| *point);
            let mut state: Value = None;
            for (i, (_, o)) in ops.iter_mut().enumerate() {
                let (_, _, _, _, happens, damage, _) = specs[i];
                let unknown = damage == 0;
                if unknown && !happens {
                    continue; // never took effect
                }
                let outcome = match o.call {
                    Call::Read => Outcome::Read(state),
                    Call::Write(v) => {
                        state = Some(v);
                        Outcome::Written
                    }
                    Call::Cas { expected, new } => {
                        let ok = state == Some(expected);
                        if ok {
                            state = Some(new);
                        }
                        Outcome::Cas(ok)
                    }
                };
                o.outcome = match (unknown, o.call, damage) {
                    (true, Call::Read, _) => outcome,
                    (true, _, _) => Outcome::Unknown,
                    (false, Call::Read, 1) => Outcome::Read(Some(3)),
                    (false, Call::Read, 2) => Outcome::Read(None),
                    _ => outcome,
                };
            }
            // Unanswered reads are left out, as `check` does.
            ops.into_iter()
                .map(|(_, o)| o)
                .filter(|o| !(o.call == Call::Read && o.is_unknown()))
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn the_search_agrees_with_the_naive_reference(history in history()) {
            let refs: Vec<&Op> = history.iter().collect();
            let fast = check_key(&refs, STEPS);
            prop_assert_ne!(fast, Verdict::Inconclusive);
            prop_assert_eq!(fast == Verdict::Linearizable, naive(&refs), "{:?}", history);
        }
    }
}
