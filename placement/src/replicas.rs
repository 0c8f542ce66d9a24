//! Replica placement: which replicas to move so that no range keeps a replica on a node that is
//! down or being decommissioned, and every live node holds about as many replicas as the others.
//!
//! [`plan_replica_moves`] is a pure function of the placement state the caller observed (the
//! nodes with their state and zone, the ranges with their voters); the placement leader records
//! each move it plans as a Raft entry of the placement group and has the range's leader carry it
//! out with openraft membership changes (add learner, catch up, replace the voter).
//!
//! What a plan minimises, in this order (each planned move strictly lowers it, so plans never
//! oscillate and repeated planning settles):
//! 1. replicas on nodes that are [`NodeState::Down`] or [`NodeState::Decommissioning`]
//!    (*evacuations*; a range moves only while it keeps a quorum of live voters, which the joint
//!    configuration of the move needs to commit);
//! 2. the sum over [`NodeState::Up`] nodes of the square of their replica count divided by
//!    their weight (*balance*: each node ends with replicas in proportion to its capacity,
//!    [`NodeView::weight`]). Moving a replica from `a` to `b` lowers it exactly when
//!    `(2·count_b + 1) / weight_b < (2·count_a − 1) / weight_a`; with equal weights, when `a`
//!    holds at least two more than `b`. The planner decides this in integers.
//!
//! A balance move takes, from its donor, a replica of a range the donor does not lead when there
//! is one (see [`RangeReplicas::leader`]). Among the receivers that qualify, a node in a zone the range does not use yet comes first
//! (spread across zones), then the node a replica costs least (`(2·count + 1) / weight`), then
//! the lower id. [`improving_move_exists`]
//! is the naive reference: it tries every single move, and the property tests check that a plan
//! is empty exactly when no single move improves the objective.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{NodeId, RangeId};

/// How many voters a range has when enough nodes are up.
pub const REPLICATION_FACTOR: usize = 3;

/// A node's state as the placement service sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum NodeState {
    /// Heartbeating; receives replicas.
    Up,
    /// Missed heartbeats recently; keeps its replicas, receives none.
    Suspect,
    /// No heartbeat for longer than `--down-after`; its replicas are re-created elsewhere.
    Down,
    /// An operator asked to drain it; its replicas move away, it receives none.
    Decommissioning,
}

impl NodeState {
    /// Whether replicas on a node in this state are moved away.
    pub fn evacuated(self) -> bool {
        matches!(self, NodeState::Down | NodeState::Decommissioning)
    }

    /// Whether a replica here counts as live for a quorum (a decommissioning node still serves).
    pub fn live(self) -> bool {
        !matches!(self, NodeState::Down)
    }

    /// The lower-case name used in `concordctl nodes`.
    pub fn name(self) -> &'static str {
        match self {
            NodeState::Up => "up",
            NodeState::Suspect => "suspect",
            NodeState::Down => "down",
            NodeState::Decommissioning => "decommissioning",
        }
    }
}

/// One node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// The node.
    pub id: NodeId,
    /// Its zone label, if any.
    pub zone: Option<String>,
    /// Its state.
    pub state: NodeState,
    /// Its capacity, in a unit common to all nodes (the placement service uses GiB of
    /// memory); replicas spread in proportion to it. 0 counts as 1.
    pub weight: u64,
}

/// One range as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeReplicas {
    /// The range.
    pub range: RangeId,
    /// Its voters.
    pub voters: Vec<NodeId>,
    /// Its leader as last reported (none: not known). A balance move takes a replica its node
    /// does not lead when it can: moving the leader's own replica first hands leadership
    /// over, and leader balancing may hand it straight back, round after round.
    pub leader: Option<NodeId>,
}

/// Move the replica of `range` on node `from` to node `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplicaMove {
    /// The range.
    pub range: RangeId,
    /// The node giving up its replica.
    pub from: NodeId,
    /// The node receiving one.
    pub to: NodeId,
}

/// The scheduler's working copy of the state: replica sets and counts, updated as moves are
/// planned.
struct Layout<'a> {
    nodes: BTreeMap<NodeId, &'a NodeView>,
    voters: BTreeMap<RangeId, BTreeSet<NodeId>>,
    counts: BTreeMap<NodeId, usize>,
}

impl<'a> Layout<'a> {
    fn new(nodes: &'a [NodeView], ranges: &[RangeReplicas]) -> Self {
        let nodes: BTreeMap<NodeId, &NodeView> = nodes.iter().map(|n| (n.id, n)).collect();
        let mut counts: BTreeMap<NodeId, usize> = nodes.keys().map(|id| (*id, 0)).collect();
        let mut voters = BTreeMap::new();
        for r in ranges {
            let set: BTreeSet<NodeId> = r.voters.iter().copied().collect();
            for v in &set {
                *counts.entry(*v).or_default() += 1;
            }
            voters.insert(r.range, set);
        }
        Self {
            nodes,
            voters,
            counts,
        }
    }

    fn state(&self, node: NodeId) -> NodeState {
        // A voter the registry does not know is treated as down: nothing can reach it.
        self.nodes.get(&node).map_or(NodeState::Down, |n| n.state)
    }

    fn zone(&self, node: NodeId) -> Option<&str> {
        self.nodes.get(&node).and_then(|n| n.zone.as_deref())
    }

    fn weight(&self, node: NodeId) -> u128 {
        self.nodes.get(&node).map_or(1, |n| n.weight.max(1)).into()
    }

    /// What one more replica on `node` adds to the balance objective, as the fraction
    /// (numerator, denominator) = (2·count + 1, weight).
    fn cost_of_one_more(&self, node: NodeId) -> (u128, u128) {
        (2 * self.counts[&node] as u128 + 1, self.weight(node))
    }

    /// What taking one replica off `node` removes from it: (2·count − 1, weight).
    fn gain_of_one_less(&self, node: NodeId) -> (u128, u128) {
        (
            (2 * self.counts[&node] as u128).saturating_sub(1),
            self.weight(node),
        )
    }

    /// Whether moving `range`'s replica off `from` keeps a quorum of live voters in both the
    /// old and the new configuration (the receiver is counted as not yet caught up).
    fn keeps_quorum(&self, range: RangeId, from: NodeId) -> bool {
        let voters = &self.voters[&range];
        let live_staying = voters
            .iter()
            .filter(|v| **v != from && self.state(**v).live())
            .count();
        // A majority of the current voters.
        live_staying > voters.len() / 2
    }

    /// The best receiver of `range`'s replica on `leaving`, or `None` if no up node lacks
    /// one. With `balance`, only nodes whose taking it lowers the balance objective qualify.
    fn receiver(&self, range: RangeId, leaving: NodeId, balance: bool) -> Option<NodeId> {
        let voters = &self.voters[&range];
        let used_zones: BTreeSet<&str> = voters
            .iter()
            .filter(|v| **v != leaving)
            .filter_map(|v| self.zone(*v))
            .collect();
        let gain = self.gain_of_one_less(leaving);
        let old_zone = |n: &NodeView| n.zone.as_deref().is_none_or(|z| used_zones.contains(z));
        self.nodes
            .values()
            .filter(|n| n.state == NodeState::Up && !voters.contains(&n.id))
            .filter(|n| !balance || less(self.cost_of_one_more(n.id), gain))
            .min_by(|a, b| {
                let (ca, cb) = (self.cost_of_one_more(a.id), self.cost_of_one_more(b.id));
                (old_zone(a).cmp(&old_zone(b)))
                    .then(compare(ca, cb))
                    .then(a.id.cmp(&b.id))
            })
            .map(|n| n.id)
    }

    fn apply(&mut self, m: ReplicaMove) {
        let voters = self.voters.get_mut(&m.range).expect("planned range exists");
        voters.remove(&m.from);
        voters.insert(m.to);
        *self.counts.get_mut(&m.from).expect("counted") -= 1;
        *self.counts.entry(m.to).or_default() += 1;
    }
}

/// Compares the fractions `a` and `b`, each (numerator, denominator > 0).
fn compare(a: (u128, u128), b: (u128, u128)) -> std::cmp::Ordering {
    (a.0 * b.1).cmp(&(b.0 * a.1))
}

fn less(a: (u128, u128), b: (u128, u128)) -> bool {
    compare(a, b).is_lt()
}

/// Plans at most `moves_max` replica moves, at most one per range, skipping the ranges in
/// `busy` (a move of theirs is under way). Evacuations come first; balance moves are planned
/// only when no evacuation is possible.
pub fn plan_replica_moves(
    nodes: &[NodeView],
    ranges: &[RangeReplicas],
    busy: &BTreeSet<RangeId>,
    moves_max: usize,
) -> Vec<ReplicaMove> {
    let mut layout = Layout::new(nodes, ranges);
    let mut moved: BTreeSet<RangeId> = busy.clone();
    let mut plan = Vec::new();
    // Evacuations, in range order.
    for r in ranges {
        if plan.len() >= moves_max {
            return plan;
        }
        if moved.contains(&r.range) {
            continue;
        }
        let found = layout.voters[&r.range]
            .iter()
            .copied()
            .filter(|v| layout.state(*v).evacuated() && layout.keeps_quorum(r.range, *v))
            .find_map(|from| Some((from, layout.receiver(r.range, from, false)?)));
        if let Some((from, to)) = found {
            let m = ReplicaMove {
                range: r.range,
                from,
                to,
            };
            layout.apply(m);
            moved.insert(r.range);
            plan.push(m);
        }
    }
    if !plan.is_empty() {
        return plan;
    }
    // Balance: from the up node holding the most for its weight to one where the replica
    // costs less than it does there.
    while plan.len() < moves_max {
        let mut donors: Vec<NodeId> = layout
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Up)
            .map(|n| n.id)
            .collect();
        donors.sort_by(|a, b| {
            let share = |id: &NodeId| (layout.counts[id] as u128, layout.weight(*id));
            compare(share(b), share(a)).then(a.cmp(b))
        });
        let found = donors.iter().find_map(|from| {
            let mut candidates: Vec<&RangeReplicas> = ranges
                .iter()
                .filter(|r| !moved.contains(&r.range))
                .filter(|r| layout.voters[&r.range].contains(from))
                .filter(|r| layout.keeps_quorum(r.range, *from))
                .collect();
            // Ranges `from` does not lead first, each group in range order (a stable sort).
            candidates.sort_by_key(|r| r.leader == Some(*from));
            candidates.into_iter().find_map(|r| {
                let to = layout.receiver(r.range, *from, true)?;
                Some(ReplicaMove {
                    range: r.range,
                    from: *from,
                    to,
                })
            })
        });
        let Some(m) = found else { break };
        layout.apply(m);
        moved.insert(m.range);
        plan.push(m);
    }
    plan
}

/// The objective a plan lowers (see the module documentation), for tests: the replicas
/// stranded on evacuated nodes, and the balance term times the least common multiple of the
/// nodes' weights (an integer; that multiple must fit in a `u128`).
pub fn objective(nodes: &[NodeView], ranges: &[RangeReplicas]) -> (usize, u128) {
    let layout = Layout::new(nodes, ranges);
    let stranded = layout
        .voters
        .values()
        .flatten()
        .filter(|v| layout.state(**v).evacuated())
        .count();
    let scale = layout
        .nodes
        .keys()
        .map(|id| layout.weight(*id))
        .fold(1, lcm);
    let squares = layout
        .nodes
        .values()
        .filter(|n| n.state == NodeState::Up)
        .map(|n| layout.counts[&n.id].pow(2) as u128 * (scale / layout.weight(n.id)))
        .sum();
    (stranded, squares)
}

fn lcm(a: u128, b: u128) -> u128 {
    let gcd = |mut x: u128, mut y: u128| {
        while y != 0 {
            (x, y) = (y, x % y);
        }
        x
    };
    (a / gcd(a, b))
        .checked_mul(b)
        .expect("the weights' least common multiple fits in a u128")
}

/// The naive reference: whether any single allowed move (a range's replica from a node to an
/// up node without one, keeping a quorum of live voters) lowers [`objective`].
pub fn improving_move_exists(nodes: &[NodeView], ranges: &[RangeReplicas]) -> bool {
    let before = objective(nodes, ranges);
    let layout = Layout::new(nodes, ranges);
    for (i, r) in ranges.iter().enumerate() {
        for from in &layout.voters[&r.range] {
            if !layout.keeps_quorum(r.range, *from) {
                continue;
            }
            for to in nodes.iter().filter(|n| n.state == NodeState::Up) {
                if layout.voters[&r.range].contains(&to.id) {
                    continue;
                }
                let mut after = ranges.to_vec();
                after[i].voters = r
                    .voters
                    .iter()
                    .map(|v| if v == from { to.id } else { *v })
                    .collect();
                if objective(nodes, &after) < before {
                    return true;
                }
            }
        }
    }
    false
}

/// Applies `moves` to `ranges` (what the cluster looks like once they are carried out).
pub fn apply_moves(ranges: &mut [RangeReplicas], moves: &[ReplicaMove]) {
    for m in moves {
        if let Some(r) = ranges.iter_mut().find(|r| r.range == m.range) {
            for v in r.voters.iter_mut() {
                if *v == m.from {
                    *v = m.to;
                }
            }
        }
    }
}

/// The voters of a new cluster's range `index` (0-based) among `nodes`: [`REPLICATION_FACTOR`]
/// consecutive nodes (all of them when there are fewer), starting one further along for each
/// range so that replicas spread evenly.
pub fn bootstrap_voters(index: usize, nodes: &[NodeId]) -> Vec<NodeId> {
    let n = nodes.len();
    let mut voters: Vec<NodeId> = (0..REPLICATION_FACTOR.min(n))
        .map(|k| nodes[(index + k) % n])
        .collect();
    voters.sort_unstable();
    voters
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(id: NodeId, zone: &str, state: NodeState) -> NodeView {
        NodeView {
            id,
            zone: (!zone.is_empty()).then(|| zone.to_string()),
            state,
            weight: 1,
        }
    }

    fn range(range: RangeId, voters: &[NodeId]) -> RangeReplicas {
        RangeReplicas {
            range,
            voters: voters.to_vec(),
            leader: None,
        }
    }

    #[test]
    fn a_balance_move_takes_a_replica_its_node_does_not_lead() {
        let nodes: Vec<NodeView> = (1..=4).map(|id| node(id, "", NodeState::Up)).collect();
        // Node 1 holds three replicas, node 4 none: one of node 1's moves to node 4. Node 1
        // leads ranges 1 and 2, so range 3 goes, although it comes last.
        let led = |r: RangeId, leader| RangeReplicas {
            leader: Some(leader),
            ..range(r, &[1, 2, 3])
        };
        let ranges = [led(1, 1), led(2, 1), led(3, 2)];
        assert_eq!(
            plan_replica_moves(&nodes, &ranges, &BTreeSet::new(), 1),
            vec![ReplicaMove {
                range: 3,
                from: 1,
                to: 4
            }]
        );
        // When it leads them all, its first range goes.
        let ranges = [led(1, 1), led(2, 1), led(3, 1)];
        assert_eq!(
            plan_replica_moves(&nodes, &ranges, &BTreeSet::new(), 1)[0].range,
            1
        );
    }

    #[test]
    fn replicas_spread_in_proportion_to_weight() {
        // Two nodes of twice the others' capacity: 48 replicas go 6, 6, 6, 6, 12, 12.
        let mut nodes: Vec<NodeView> = (1..=6).map(|i| node(i, "", NodeState::Up)).collect();
        nodes[4].weight = 2;
        nodes[5].weight = 2;
        let mut ranges: Vec<RangeReplicas> = (1..=16).map(|r| range(r, &[1, 2, 3])).collect();
        settle(&nodes, &mut ranges);
        let counts = Layout::new(&nodes, &ranges).counts;
        for (id, want) in [(1, 6), (2, 6), (3, 6), (4, 6), (5, 12), (6, 12)] {
            assert!(counts[&id].abs_diff(want) <= 1, "node {id}: {counts:?}");
        }
        // Equal weights: even counts, whatever the unit.
        for n in &mut nodes {
            n.weight = 64;
        }
        settle(&nodes, &mut ranges);
        let counts = Layout::new(&nodes, &ranges).counts;
        assert!(counts.values().all(|c| *c == 8), "{counts:?}");
    }

    fn settle(nodes: &[NodeView], ranges: &mut [RangeReplicas]) -> usize {
        for round in 0..1000 {
            let plan = plan_replica_moves(nodes, ranges, &BTreeSet::new(), 4);
            if plan.is_empty() {
                return round;
            }
            apply_moves(ranges, &plan);
        }
        panic!("did not settle in 1000 rounds");
    }

    #[test]
    fn a_down_node_is_evacuated_to_the_missing_zone() {
        let nodes = [
            node(1, "a", NodeState::Up),
            node(2, "b", NodeState::Up),
            node(3, "c", NodeState::Down),
            node(4, "a", NodeState::Up),
            node(5, "c", NodeState::Up),
        ];
        let plan = plan_replica_moves(&nodes, &[range(7, &[1, 2, 3])], &BTreeSet::new(), 8);
        assert_eq!(
            plan,
            vec![ReplicaMove {
                range: 7,
                from: 3,
                to: 5
            }]
        );
    }

    #[test]
    fn no_move_without_a_live_quorum() {
        let nodes = [
            node(1, "", NodeState::Up),
            node(2, "", NodeState::Down),
            node(3, "", NodeState::Down),
            node(4, "", NodeState::Up),
        ];
        let plan = plan_replica_moves(&nodes, &[range(1, &[1, 2, 3])], &BTreeSet::new(), 8);
        assert!(plan.is_empty(), "{plan:?}");
    }

    #[test]
    fn joining_nodes_receive_replicas_until_even() {
        let mut nodes: Vec<NodeView> = (1..=3).map(|i| node(i, "", NodeState::Up)).collect();
        let mut ranges: Vec<RangeReplicas> = (1..=10).map(|r| range(r, &[1, 2, 3])).collect();
        nodes.push(node(4, "", NodeState::Up));
        nodes.push(node(5, "", NodeState::Up));
        settle(&nodes, &mut ranges);
        let layout = Layout::new(&nodes, &ranges);
        let counts: Vec<usize> = layout.counts.values().copied().collect();
        assert_eq!(counts.iter().sum::<usize>(), 30);
        assert!(counts.iter().all(|c| (5..=7).contains(c)), "{counts:?}");
    }

    #[test]
    fn decommissioning_drains_the_node() {
        let mut nodes: Vec<NodeView> = (1..=4).map(|i| node(i, "", NodeState::Up)).collect();
        let mut ranges: Vec<RangeReplicas> = (1..=8)
            .map(|r| range(r, &bootstrap_voters(r as usize, &[1, 2, 3, 4])))
            .collect();
        nodes[1].state = NodeState::Decommissioning;
        settle(&nodes, &mut ranges);
        assert!(ranges.iter().all(|r| !r.voters.contains(&2)), "{ranges:?}");
    }

    #[test]
    fn busy_ranges_are_left_alone() {
        let nodes: Vec<NodeView> = (1..=4).map(|i| node(i, "", NodeState::Up)).collect();
        let ranges = [range(1, &[1, 2, 3]), range(2, &[1, 2, 3])];
        let busy = BTreeSet::from([1]);
        let plan = plan_replica_moves(&nodes, &ranges, &busy, 8);
        assert!(plan.iter().all(|m| m.range == 2), "{plan:?}");
    }

    #[test]
    fn bootstrap_voters_spread() {
        assert_eq!(bootstrap_voters(0, &[1, 2, 3]), vec![1, 2, 3]);
        assert_eq!(bootstrap_voters(4, &[1, 2, 3, 4, 5]), vec![1, 2, 5]);
        assert_eq!(bootstrap_voters(1, &[7]), vec![7]);
    }

    fn arb_state() -> impl Strategy<Value = NodeState> {
        prop_oneof![
            6 => Just(NodeState::Up),
            1 => Just(NodeState::Suspect),
            1 => Just(NodeState::Down),
            1 => Just(NodeState::Decommissioning),
        ]
    }

    fn arb_cluster() -> impl Strategy<Value = (Vec<NodeView>, Vec<RangeReplicas>)> {
        (3usize..=7)
            .prop_flat_map(|n| {
                (
                    proptest::collection::vec((arb_state(), 0u8..3, 1u64..=4), n),
                    proptest::collection::vec(
                        proptest::sample::subsequence((1..=n as NodeId).collect::<Vec<_>>(), 3),
                        1..12,
                    ),
                )
            })
            .prop_map(|(states, replica_sets)| {
                let nodes = states
                    .into_iter()
                    .enumerate()
                    .map(|(i, (state, zone, weight))| NodeView {
                        id: i as NodeId + 1,
                        zone: Some(format!("z{zone}")),
                        state,
                        weight,
                    })
                    .collect();
                let ranges = replica_sets
                    .into_iter()
                    .enumerate()
                    .map(|(i, voters)| RangeReplicas {
                        range: i as RangeId + 1,
                        leader: voters.first().copied(),
                        voters,
                    })
                    .collect();
                (nodes, ranges)
            })
    }

    proptest! {
        #[test]
        fn every_move_is_allowed_and_improves((nodes, ranges) in arb_cluster()) {
            let plan = plan_replica_moves(&nodes, &ranges, &BTreeSet::new(), 16);
            let mut seen = BTreeSet::new();
            let layout = Layout::new(&nodes, &ranges);
            for m in &plan {
                prop_assert!(seen.insert(m.range), "two moves of range {}", m.range);
                prop_assert!(layout.voters[&m.range].contains(&m.from));
                prop_assert!(!layout.voters[&m.range].contains(&m.to));
                prop_assert_eq!(layout.state(m.to), NodeState::Up);
                prop_assert!(layout.keeps_quorum(m.range, m.from));
            }
            let mut after = ranges.clone();
            apply_moves(&mut after, &plan);
            if !plan.is_empty() {
                prop_assert!(objective(&nodes, &after) < objective(&nodes, &ranges));
            }
        }

        #[test]
        fn plans_settle_where_the_naive_reference_finds_nothing_to_improve(
            (nodes, mut ranges) in arb_cluster()
        ) {
            settle(&nodes, &mut ranges);
            prop_assert!(!improving_move_exists(&nodes, &ranges), "{:?} {:?}", nodes, ranges);
        }

        #[test]
        fn an_empty_plan_means_no_single_move_helps((nodes, ranges) in arb_cluster()) {
            let plan = plan_replica_moves(&nodes, &ranges, &BTreeSet::new(), 16);
            prop_assert_eq!(plan.is_empty(), !improving_move_exists(&nodes, &ranges));
        }
    }
}
