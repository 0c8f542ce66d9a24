//! Leader balancing: which range leaders to move so that every live node leads about as many
//! ranges as the others.
//!
//! A range's leader does the work of its writes (it appends, replicates and answers), so a node
//! that leads every range carries the cluster's write load alone while the others idle. This
//! module decides the moves; the node's shell carries them out with openraft's leader transfer
//! (see ARCHITECTURE.md, "Leader balancing").
//!
//! [`plan_leader_moves`] is a pure function of what the caller observed: the ranges with their
//! voters and current leader, and the nodes it believes live. It moves a leader only from a
//! node leading at least two more ranges than the receiver, so every move strictly lowers the
//! sum of squared leader counts: a plan never oscillates, and applying plans repeatedly reaches
//! a state where no single move helps ([`is_settled`], the naive reference the property tests
//! compare against).

use std::collections::{BTreeMap, BTreeSet};

use crate::{NodeId, RangeId};

/// One range as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeLeadership {
    /// The range.
    pub range: RangeId,
    /// The nodes that may lead it (the group's voters).
    pub voters: Vec<NodeId>,
    /// Its leader now, if one is known.
    pub leader: Option<NodeId>,
}

/// Move the leadership of `range` from node `from` to node `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LeaderMove {
    /// The range.
    pub range: RangeId,
    /// Its leader now.
    pub from: NodeId,
    /// Its leader after the move.
    pub to: NodeId,
}

/// Leader counts of the `live` nodes (0 for a live node that leads nothing). Ranges without a
/// leader, or led by a node not in `live`, are not counted.
pub fn leader_counts(
    ranges: &[RangeLeadership],
    live: &BTreeSet<NodeId>,
) -> BTreeMap<NodeId, usize> {
    let mut counts: BTreeMap<NodeId, usize> = live.iter().map(|n| (*n, 0)).collect();
    for leader in ranges.iter().filter_map(|r| r.leader) {
        if let Some(c) = counts.get_mut(&leader) {
            *c += 1;
        }
    }
    counts
}

/// Plans at most `moves_max` leader moves that even out the leader counts of the `live` nodes.
///
/// Each move takes a range from the node leading the most (ties: the lower id) and gives it to
/// the live voter of that range leading the fewest (ties: the lower id), provided the receiver
/// leads at least two fewer ranges than the giver; ranges are tried in id order and each range
/// moves at most once per plan. The counts are updated after each move, so the plan as a whole
/// is what applying its moves one by one would do.
pub fn plan_leader_moves(
    ranges: &[RangeLeadership],
    live: &BTreeSet<NodeId>,
    moves_max: usize,
) -> Vec<LeaderMove> {
    let mut counts = leader_counts(ranges, live);
    let mut leaders: BTreeMap<RangeId, &RangeLeadership> =
        ranges.iter().map(|r| (r.range, r)).collect();
    let mut moves = Vec::new();
    while moves.len() < moves_max {
        // Givers from the most loaded down; the first that has a useful move gives.
        let mut givers: Vec<(NodeId, usize)> = counts.iter().map(|(n, c)| (*n, *c)).collect();
        givers.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let next = givers.iter().find_map(|&(from, from_count)| {
            leaders
                .values()
                .filter(|r| r.leader == Some(from))
                .find_map(|r| {
                    let to = r
                        .voters
                        .iter()
                        .filter(|v| **v != from)
                        .filter_map(|v| counts.get(v).map(|c| (*v, *c)))
                        .filter(|(_, c)| c + 2 <= from_count)
                        .min_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)))?
                        .0;
                    Some(LeaderMove {
                        range: r.range,
                        from,
                        to,
                    })
                })
        });
        let Some(step) = next else { break };
        *counts.get_mut(&step.from).expect("giver is live") -= 1;
        *counts.get_mut(&step.to).expect("receiver is live") += 1;
        leaders.remove(&step.range);
        moves.push(step);
    }
    moves
}

/// Whether no single leader move would help: no range's leader leads at least two more ranges
/// than a live voter of that range. The naive reference for [`plan_leader_moves`].
pub fn is_settled(ranges: &[RangeLeadership], live: &BTreeSet<NodeId>) -> bool {
    let counts = leader_counts(ranges, live);
    ranges.iter().all(|r| {
        let Some(from) = r.leader.and_then(|l| counts.get(&l)) else {
            return true;
        };
        r.voters
            .iter()
            .filter_map(|v| counts.get(v))
            .all(|to| to + 2 > *from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn range(range: RangeId, voters: &[NodeId], leader: Option<NodeId>) -> RangeLeadership {
        RangeLeadership {
            range,
            voters: voters.to_vec(),
            leader,
        }
    }

    fn mv(range: RangeId, from: NodeId, to: NodeId) -> LeaderMove {
        LeaderMove { range, from, to }
    }

    fn live(nodes: &[NodeId]) -> BTreeSet<NodeId> {
        nodes.iter().copied().collect()
    }

    fn apply(ranges: &mut [RangeLeadership], moves: &[LeaderMove]) {
        for m in moves {
            let r = ranges.iter_mut().find(|r| r.range == m.range).unwrap();
            assert_eq!(
                r.leader,
                Some(m.from),
                "{m:?} moves from the current leader"
            );
            r.leader = Some(m.to);
        }
    }

    #[test]
    fn one_node_leading_all_gives_to_the_least_loaded_in_range_order() {
        let ranges: Vec<_> = (1..=8).map(|id| range(id, &[1, 2, 3], Some(2))).collect();
        let moves = plan_leader_moves(&ranges, &live(&[1, 2, 3]), usize::MAX);
        let expected = [(1, 1), (2, 3), (3, 1), (4, 3), (5, 1)];
        let expected: Vec<_> = expected
            .iter()
            .map(|&(range, to)| mv(range, 2, to))
            .collect();
        assert_eq!(moves, expected);
    }

    #[test]
    fn moves_max_bounds_the_plan() {
        let ranges: Vec<_> = (1..=8).map(|id| range(id, &[1, 2, 3], Some(1))).collect();
        let moves = plan_leader_moves(&ranges, &live(&[1, 2, 3]), 1);
        assert_eq!(moves, vec![mv(1, 1, 2)]);
    }

    #[test]
    fn a_difference_of_one_is_left_alone() {
        let ranges = vec![
            range(1, &[1, 2, 3], Some(1)),
            range(2, &[1, 2, 3], Some(1)),
            range(3, &[1, 2, 3], Some(2)),
            range(4, &[1, 2, 3], Some(3)),
        ];
        assert!(plan_leader_moves(&ranges, &live(&[1, 2, 3]), usize::MAX).is_empty());
    }

    #[test]
    fn dead_nodes_neither_give_nor_receive() {
        // Node 3 is down: its stale leadership is not counted and nothing moves to it.
        let ranges = vec![
            range(1, &[1, 2, 3], Some(1)),
            range(2, &[1, 2, 3], Some(1)),
            range(3, &[1, 2, 3], Some(1)),
            range(4, &[1, 2, 3], Some(3)),
        ];
        let moves = plan_leader_moves(&ranges, &live(&[1, 2]), usize::MAX);
        assert_eq!(moves, vec![mv(1, 1, 2)]);
    }

    #[test]
    fn only_voters_of_the_range_receive() {
        // Node 3 leads nothing but holds no replica of ranges 1 and 2.
        let ranges = vec![range(1, &[1, 2], Some(1)), range(2, &[1, 2], Some(2))];
        assert!(plan_leader_moves(&ranges, &live(&[1, 2, 3]), usize::MAX).is_empty());
    }

    fn sum_of_squares(ranges: &[RangeLeadership], live: &BTreeSet<NodeId>) -> usize {
        leader_counts(ranges, live).values().map(|c| c * c).sum()
    }

    fn cluster() -> impl Strategy<Value = (Vec<RangeLeadership>, BTreeSet<NodeId>)> {
        let nodes = 1..=6u64;
        let ranges = prop::collection::vec(
            (prop::collection::btree_set(nodes.clone(), 1..=4), 0..8usize),
            0..24,
        );
        (ranges, prop::collection::btree_set(nodes, 1..=6)).prop_map(|(ranges, live)| {
            let ranges = ranges
                .into_iter()
                .zip(1..)
                .map(|((voters, pick), id)| {
                    let voters: Vec<NodeId> = voters.into_iter().collect();
                    // Some ranges have no leader (pick past the voters).
                    let leader = voters.get(pick).copied();
                    range(id, &voters, leader)
                })
                .collect();
            (ranges, live)
        })
    }

    proptest! {
        /// Every move goes from the current leader to a live voter, and lowers the sum of
        /// squared leader counts (so plans never oscillate).
        #[test]
        fn every_move_is_legal_and_improves((ranges, live) in cluster()) {
            let mut ranges = ranges;
            for m in plan_leader_moves(&ranges, &live, usize::MAX) {
                let r = ranges.iter().find(|r| r.range == m.range).unwrap();
                prop_assert!(r.voters.contains(&m.to) && live.contains(&m.to) && live.contains(&m.from));
                let before = sum_of_squares(&ranges, &live);
                apply(&mut ranges, &[m]);
                prop_assert!(sum_of_squares(&ranges, &live) < before);
            }
        }

        /// Planning until nothing moves ends where the naive reference says no single move
        /// helps; and a settled cluster plans nothing.
        #[test]
        fn repeated_plans_settle((ranges, live) in cluster()) {
            let mut ranges = ranges;
            for _ in 0..100 {
                let moves = plan_leader_moves(&ranges, &live, usize::MAX);
                prop_assert_eq!(moves.is_empty(), is_settled(&ranges, &live));
                if moves.is_empty() {
                    break;
                }
                apply(&mut ranges, &moves);
            }
            prop_assert!(is_settled(&ranges, &live));
        }

        /// When every live node holds a replica of every range and every range has a live
        /// leader, the counts end at most one apart.
        #[test]
        fn full_replication_balances_to_within_one(ranges in 0..40u64, nodes in 1..=5u64, seed in any::<u64>()) {
            let all: Vec<NodeId> = (1..=nodes).collect();
            let mut table: Vec<_> = (1..=ranges)
                .map(|id| range(id, &all, Some(1 + (seed.rotate_left(id as u32) % nodes))))
                .collect();
            let live = live(&all);
            let moves = plan_leader_moves(&table, &live, usize::MAX);
            apply(&mut table, &moves);
            let counts = leader_counts(&table, &live);
            let max = counts.values().max().copied().unwrap_or(0);
            let min = counts.values().min().copied().unwrap_or(0);
            prop_assert!(max - min <= 1, "counts {:?}", counts);
        }
    }
}
