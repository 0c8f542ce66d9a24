//! The client: connections, the route cache, routing and retries.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use concord_placement::{RangeDescriptor, RangeTable};
use concord_transport::api::{
    ApiError, ClientReply, ClientRequest, ClientResponse, CompactResponse, Consistency,
    DeleteRequest, KeySpan, KeyValue, KvRequest, KvResponse, LeaseRequest, MergeResponse,
    MoveResponse, NodeId, PlacementReport, PutRequest, PutResponse, RangeId, RangeRequest,
    ResponseHeader, RouteTable, SplitResponse, StatusResponse, TxnRequest, TxnResponse,
};
use concord_transport::endpoint::{self, ConnectionLimits};
use concord_transport::lease::lease_anchor;
use concord_transport::{wire, SERVER_NAME};

use crate::{ClientConfig, Error};

/// Largest response frame the client accepts.
pub const RESPONSE_BYTES_MAX: usize = 256 << 20;
/// First pause before retrying a range that has no leader; doubles per attempt.
const RETRY_BACKOFF_MS: u64 = 50;
/// Longest pause between attempts.
const RETRY_BACKOFF_MAX_MS: u64 = 500;

pub(crate) async fn backoff(attempt: u32) {
    let ms = (RETRY_BACKOFF_MS << attempt.min(10)).min(RETRY_BACKOFF_MAX_MS);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// The result of a read that may span ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeResult {
    /// Keys found, in the requested order.
    pub kvs: Vec<KeyValue>,
    /// Keys matched in all ranges visited (before the limit).
    pub count: u64,
    /// Whether the limit cut the result short.
    pub more: bool,
    /// One header per range visited, in visiting order.
    pub headers: Vec<ResponseHeader>,
}

/// The result of a delete that may span ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteResult {
    /// Keys deleted.
    pub deleted: u64,
    /// The deleted key-values, when asked for.
    pub prev_kvs: Vec<KeyValue>,
    /// One header per range visited.
    pub headers: Vec<ResponseHeader>,
}

/// A connection to a concord cluster. Cheap to clone; clones share connections and routes.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClientConfig,
    endpoint: quinn::Endpoint,
    conns: Mutex<HashMap<SocketAddr, quinn::Connection>>,
    routes: RwLock<RouteTable>,
    /// `routes.ranges` as a checked table, for key lookups (`None` until the first refresh).
    table: RwLock<Option<RangeTable>>,
    /// Spreads follower / serializable reads over replicas.
    next_replica: AtomicUsize,
    /// The watch channel of each range (see `watch.rs`).
    watch_channels: crate::watch::Channels,
    /// Nodes that did not answer lately, and until when they are passed over.
    suspects: Mutex<HashMap<NodeId, Instant>>,
}

/// How long a node that did not answer (unreachable, or silent past the request timeout) is
/// passed over when picking a replica. A dead node's connection looks open until its idle
/// timeout: without this, every request routed to it would wait out its own timeout.
const SUSPECT_FOR: Duration = Duration::from_secs(5);

fn is_write(request: &KvRequest) -> bool {
    !matches!(
        request,
        KvRequest::Range(..)
            | KvRequest::Lease(
                LeaseRequest::KeepAlive { .. }
                    | LeaseRequest::KeepAliveMany { .. }
                    | LeaseRequest::Status { .. }
                    | LeaseRequest::TimeToLive { .. }
                    | LeaseRequest::List
                    | LeaseRequest::AttachedKeys { .. }
            )
    )
}

impl Client {
    /// Connects to the cluster: fetches the route table from the first reachable endpoint.
    pub async fn connect(config: ClientConfig) -> Result<Self, Error> {
        if config.endpoints.is_empty() {
            return Err(Error::Config("no endpoints".into()));
        }
        let endpoint = endpoint::client_endpoint(&config.ca, &ConnectionLimits::default())
            .map_err(|e| Error::Config(e.to_string()))?;
        let inner = Arc::new(Inner {
            config,
            endpoint,
            conns: Mutex::new(HashMap::new()),
            routes: RwLock::new(RouteTable {
                ranges: vec![],
                leaders: Default::default(),
                nodes: vec![],
            }),
            table: RwLock::new(None),
            next_replica: AtomicUsize::new(0),
            watch_channels: Default::default(),
            suspects: Mutex::new(HashMap::new()),
        });
        let client = Self { inner };
        client.refresh_routes().await?;
        Ok(client)
    }

    /// The configuration this client was made with.
    pub(crate) fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The cached route table.
    pub fn routes(&self) -> RouteTable {
        self.inner.routes.read().expect("routes lock").clone()
    }

    /// Fetches the route table again. The first table is taken at once; after a split or a
    /// merge a node may still answer with the table from before it, so when the cached table
    /// has been reshaped the client asks every reachable node and keeps the newest table
    /// ([`RangeTable::is_newer_than`]).
    pub async fn refresh_routes(&self) -> Result<(), Error> {
        let mut last = Error::Config("no endpoints".into());
        let ask_all = self.routes().ranges.iter().any(|r| r.epoch > 1);
        let mut best: Option<(RangeTable, RouteTable)> = None;
        for addr in self.candidate_addrs() {
            match self.inner.send(&addr, &ClientRequest::Routes).await {
                Ok(Ok(ClientReply::Routes(routes))) => {
                    let table = RangeTable::new(routes.ranges.clone())
                        .map_err(|e| Error::Protocol(format!("route table from {addr}: {e}")))?;
                    if best.as_ref().is_none_or(|(b, _)| table.is_newer_than(b)) {
                        best = Some((table, routes));
                    }
                    if !ask_all {
                        break;
                    }
                }
                Ok(Ok(other)) => last = Error::Protocol(format!("unexpected reply {other:?}")),
                Ok(Err(e)) => last = Error::Api(e),
                Err(e) => last = e,
            }
        }
        let Some((table, routes)) = best else {
            return Err(last);
        };
        *self.inner.table.write().expect("table lock") = Some(table);
        *self.inner.routes.write().expect("routes lock") = routes;
        Ok(())
    }

    /// Every address worth trying: the known nodes, then the configured endpoints.
    fn candidate_addrs(&self) -> Vec<String> {
        let mut addrs: Vec<String> = self.routes().nodes.iter().map(|n| n.addr.clone()).collect();
        for e in &self.inner.config.endpoints {
            if !addrs.contains(e) {
                addrs.push(e.clone());
            }
        }
        addrs
    }

    pub(crate) fn node_addr(&self, node: NodeId) -> Option<String> {
        let routes = self.inner.routes.read().expect("routes lock");
        routes
            .nodes
            .iter()
            .find(|n| n.id == node)
            .map(|n| n.addr.clone())
    }

    /// Sends `request` to the range `desc`, routing and retrying (bounded).
    pub(crate) async fn call_range(
        &self,
        desc: &RangeDescriptor,
        request: KvRequest,
    ) -> Result<KvResponse, Error> {
        let attempts_max = self.inner.config.attempts_max.max(1);
        // Answers `Merging` use up no attempts until then (see `ClientConfig::merge_wait`).
        let merge_deadline = Instant::now() + self.inner.config.merge_wait;
        let mut desc = desc.clone();
        let mut last: Option<Error> = None;
        // The node to skip on the next attempt (it just failed us).
        let mut avoid: Option<NodeId> = None;
        // A node we could not reach in this call: a hint naming it is stale.
        let mut unreachable: Option<NodeId> = None;
        // Nodes that said "not leader" in this call (at most one per attempt).
        let mut refused: Vec<NodeId> = Vec::new();
        let mut used = 0;
        while used < attempts_max {
            let attempt = used;
            used += 1;
            let target = self.pick_node(&desc, &request, attempt, avoid);
            let Some(addr) = target.and_then(|n| self.node_addr(n)) else {
                self.refresh_routes().await.ok();
                last = Some(Error::Config(format!(
                    "no address for a replica of range {}",
                    desc.id
                )));
                continue;
            };
            let frame = ClientRequest::Kv {
                range_id: desc.id,
                epoch: desc.epoch,
                request: request.clone(),
            };
            let outcome = self.inner.send(&addr, &frame).await;
            match &outcome {
                Err(_) => self.suspect(target, desc.id),
                Ok(_) => self.vouch(target),
            }
            match outcome {
                Ok(Ok(ClientReply::Kv(resp))) => return Ok(resp),
                Ok(Ok(other)) => {
                    return Err(Error::Protocol(format!("unexpected reply {other:?}")))
                }
                Ok(Err(ApiError::NotLeader {
                    range_id,
                    leader_hint,
                })) => {
                    refused.extend(target);
                    // A hint naming the node we just asked, or one we could not reach, is stale:
                    // an election is under way, so wait for it instead of bouncing.
                    let usable =
                        leader_hint.filter(|l| Some(*l) != target && Some(*l) != unreachable);
                    // A node that answers names the leader it hears from: not suspect.
                    self.vouch(usable);
                    {
                        let mut routes = self.inner.routes.write().expect("routes lock");
                        match usable {
                            Some(l) => routes.leaders.insert(range_id, l),
                            None => routes.leaders.remove(&range_id),
                        };
                    }
                    match usable {
                        // Follow the hint; but if that node already refused in this call,
                        // leadership is moving between the two (a hand-over under way): pause,
                        // so that they do not bounce the request to and fro until it gives up.
                        Some(l) => {
                            if avoid == Some(l) {
                                avoid = None;
                            }
                            if refused.contains(&l) {
                                backoff(attempt).await;
                            }
                        }
                        None => {
                            avoid = target;
                            backoff(attempt).await;
                        }
                    }
                    last = Some(Error::Api(ApiError::NotLeader {
                        range_id,
                        leader_hint,
                    }));
                }
                Ok(Err(e)) if e.is_stale_route() => {
                    // A range frozen for a merge serves again once its neighbour has taken it
                    // in (seconds for a large range): wait for that at a steady pace, without
                    // using up attempts, then the fresh routes name the merged range.
                    let merging =
                        matches!(e, ApiError::Merging { .. }) && Instant::now() < merge_deadline;
                    if merging {
                        tokio::time::sleep(Duration::from_millis(RETRY_BACKOFF_MAX_MS)).await;
                        used = attempt;
                    }
                    self.refresh_routes().await.ok();
                    // The range split (or the routes were behind): the keys may be in another
                    // range now. A request whose keys now span ranges goes back to its caller
                    // to be planned again.
                    match self.reroute(&desc, &request) {
                        Some(d) => desc = d,
                        None => return Err(Error::Api(e)),
                    }
                    // A node behind the split answers with the old table: give it a moment.
                    if attempt > 0 && !merging {
                        backoff(attempt).await;
                    }
                    last = Some(Error::Api(e));
                }
                Ok(Err(e @ ApiError::Unavailable { .. })) => {
                    // Not proposed (reads, or a refused write): safe to retry after a pause.
                    avoid = target;
                    backoff(attempt).await;
                    last = Some(Error::Api(e));
                }
                Ok(Err(e)) => return Err(Error::Api(e)),
                Err(e @ Error::Connect { .. }) => {
                    // Never delivered: safe to retry elsewhere.
                    avoid = target;
                    unreachable = target;
                    self.inner
                        .routes
                        .write()
                        .expect("routes lock")
                        .leaders
                        .remove(&desc.id);
                    last = Some(e);
                }
                Err(e) if is_write(&request) => return Err(e), // sent: the outcome is unknown
                Err(e) => {
                    avoid = target;
                    last = Some(e);
                }
            }
        }
        Err(Error::Exhausted {
            attempts: attempts_max,
            last: Box::new(last.expect("at least one attempt")),
        })
    }

    /// The range of the refreshed table that holds every key of `request`, sent to `desc`
    /// and refused there as out of date; `None` if its keys now span several ranges.
    fn reroute(&self, desc: &RangeDescriptor, request: &KvRequest) -> Option<RangeDescriptor> {
        let table = self.inner.table.read().expect("table lock");
        let table = table.as_ref()?;
        let spans: Vec<KeySpan> = match request {
            KvRequest::Put(p) => vec![KeySpan::key(p.key.clone())],
            KvRequest::Range(r, _) => vec![r.span.clone()],
            KvRequest::Delete(d) => vec![d.span.clone()],
            KvRequest::Txn(t) => t.spans(),
            KvRequest::Split { at } => vec![KeySpan::key(at.clone())],
            KvRequest::Lease(LeaseRequest::GrantWithPut { id, put, .. }) => vec![
                KeySpan::key(put.key.clone()),
                KeySpan::key(lease_anchor(*id)),
            ],
            KvRequest::Lease(l) => match l.owner() {
                Some(id) => vec![KeySpan::key(lease_anchor(id))],
                None => return table.get(desc.id).cloned(),
            },
            KvRequest::Compact { .. }
            | KvRequest::MoveReplica { .. }
            | KvRequest::Merge
            | KvRequest::Freeze { .. } => return table.get(desc.id).cloned(),
        };
        let first = spans.first().map_or(Vec::new(), |s| s.key.clone());
        let target = table.locate(&first);
        spans
            .iter()
            .all(|s| {
                let (from, to) = s.bounds();
                target.covers(&from, &to)
            })
            .then(|| target.clone())
    }

    /// `node` did not answer a request for `range`: pass it over for a while, and forget it
    /// as the range's leader.
    fn suspect(&self, node: Option<NodeId>, range: RangeId) {
        let Some(node) = node else { return };
        let until = Instant::now() + SUSPECT_FOR;
        self.inner
            .suspects
            .lock()
            .expect("suspects lock")
            .insert(node, until);
        let mut routes = self.inner.routes.write().expect("routes lock");
        if routes.leaders.get(&range) == Some(&node) {
            routes.leaders.remove(&range);
        }
    }

    /// `node` answered: no longer suspect.
    fn vouch(&self, node: Option<NodeId>) {
        if let Some(node) = node {
            self.inner
                .suspects
                .lock()
                .expect("suspects lock")
                .remove(&node);
        }
    }

    fn pick_node(
        &self,
        desc: &RangeDescriptor,
        request: &KvRequest,
        attempt: u32,
        avoid: Option<NodeId>,
    ) -> Option<NodeId> {
        let now = Instant::now();
        let suspects = self.inner.suspects.lock().expect("suspects lock");
        let suspect = |n: &NodeId| suspects.get(n).is_some_and(|until| *until > now);
        let routes = self.inner.routes.read().expect("routes lock");
        let replicas = |keep: &dyn Fn(&NodeId) -> bool| -> Vec<NodeId> {
            desc.replicas.iter().copied().filter(|n| keep(n)).collect()
        };
        // Suspect and avoided replicas are tried only when there is no other.
        let mut candidates = replicas(&|n| Some(*n) != avoid && !suspect(n));
        if candidates.is_empty() {
            candidates = replicas(&|n| Some(*n) != avoid);
        }
        if candidates.is_empty() {
            candidates = desc.replicas.clone();
        }
        let spread = |offset: usize| candidates.get(offset % candidates.len().max(1)).copied();
        match request {
            KvRequest::Range(_, Consistency::Follower | Consistency::Serializable) => {
                spread(self.inner.next_replica.fetch_add(1, Ordering::Relaxed))
            }
            _ => match routes.leaders.get(&desc.id) {
                Some(l) if Some(*l) != avoid && !suspect(l) => Some(*l),
                _ => spread(attempt as usize),
            },
        }
    }

    /// Puts `value` under `key`.
    pub async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Result<PutResponse, Error> {
        self.put_with(PutRequest {
            key: key.into(),
            value: value.into(),
            lease: 0,
            prev_kv: false,
        })
        .await
    }

    /// Puts with every option of [`PutRequest`].
    pub async fn put_with(&self, put: PutRequest) -> Result<PutResponse, Error> {
        let desc = self.locate(&put.key);
        match self.call_range(&desc, KvRequest::Put(put)).await? {
            KvResponse::Put(r) => Ok(r),
            other => Err(Error::Protocol(format!("unexpected response {other:?}"))),
        }
    }

    /// Reads `key` (linearizable).
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<RangeResult, Error> {
        self.range(
            RangeRequest::new(KeySpan::key(key)),
            Consistency::Linearizable,
        )
        .await
    }

    /// Reads a key, prefix or interval at `consistency`, visiting each range in key order
    /// (reverse order when descending) until the limit is reached.
    pub async fn range(
        &self,
        req: RangeRequest,
        consistency: Consistency,
    ) -> Result<RangeResult, Error> {
        let mut result = RangeResult::default();
        // The part of the span not read yet: it shrinks range by range, and is planned again
        // over the refreshed routes when a range has split under the read.
        let mut rest = req.span.clone();
        let mut replans = 0;
        'plan: loop {
            let mut descs = self.overlapping(&rest);
            if req.descending {
                descs.reverse();
            }
            for desc in descs {
                let mut part = req.clone();
                part.span = clip(&desc, &rest);
                if req.limit != 0 {
                    let have = result.kvs.len() as u64;
                    if have >= req.limit && !req.count_only {
                        // Keep counting in the remaining ranges only if the caller wants the count.
                        part.count_only = true;
                    } else {
                        part.limit = req.limit - have;
                    }
                }
                let r = match self
                    .call_range(&desc, KvRequest::Range(part, consistency))
                    .await
                {
                    Ok(KvResponse::Range(r)) => r,
                    Ok(_) => return Err(Error::Protocol("expected a range response".into())),
                    Err(e) if is_stale(&e) && replans < self.inner.config.attempts_max => {
                        replans += 1;
                        continue 'plan;
                    }
                    Err(e) => return Err(e),
                };
                result.count += r.count;
                result.kvs.extend(r.kvs);
                result.headers.push(r.header);
                rest = after(&rest, &desc, req.descending);
            }
            break;
        }
        result.more = req.limit != 0 && result.count > req.limit;
        Ok(result)
    }

    /// Deletes a key, prefix or interval, range by range in key order. If a range fails
    /// after earlier ranges were deleted, the error is [`Error::PartialDelete`] and says so.
    pub async fn delete(&self, span: KeySpan, prev_kv: bool) -> Result<DeleteResult, Error> {
        let mut result = DeleteResult::default();
        // As in `range`: the part not deleted yet is planned again after a split.
        let mut rest = span.clone();
        let mut replans = 0;
        'plan: loop {
            for desc in self.overlapping(&rest) {
                let req = DeleteRequest {
                    span: clip(&desc, &rest),
                    prev_kv,
                };
                let r = match self.call_range(&desc, KvRequest::Delete(req)).await {
                    Ok(KvResponse::Delete(r)) => r,
                    Ok(_) => Err(Error::Protocol("expected a delete response".into()))?,
                    Err(e) if is_stale(&e) && replans < self.inner.config.attempts_max => {
                        replans += 1;
                        continue 'plan;
                    }
                    Err(e) if result.headers.is_empty() => return Err(e),
                    Err(e) => {
                        return Err(Error::PartialDelete {
                            done: result.headers.iter().map(|h| h.range_id).collect(),
                            deleted: result.deleted,
                            failed_range: desc.id,
                            source: Box::new(e),
                        })
                    }
                };
                result.deleted += r.deleted;
                result.prev_kvs.extend(r.prev_kvs);
                result.headers.push(r.header);
                rest = after(&rest, &desc, false);
            }
            break;
        }
        Ok(result)
    }

    /// Splits the range holding `at` so that a new range starts at `at` (an operator's
    /// command: the range keeps the keys below `at`, the new range, on the same replicas,
    /// takes the rest). Routes are refreshed afterwards.
    pub async fn split(&self, at: impl Into<Vec<u8>>) -> Result<SplitResponse, Error> {
        let at = at.into();
        let desc = self.locate(&at);
        let response = self.call_range(&desc, KvRequest::Split { at }).await?;
        self.refresh_routes().await.ok();
        match response {
            KvResponse::Split(r) => Ok(r),
            other => Err(Error::Protocol(format!("unexpected response {other:?}"))),
        }
    }

    /// Moves range `range`'s replica on node `from` to node `to` (an operator's request; the
    /// placement service makes such moves on its own). Returns when the move is done: `to` has
    /// caught up and replaced `from` among the voters.
    pub async fn move_replica(
        &self,
        range: RangeId,
        from: NodeId,
        to: NodeId,
    ) -> Result<MoveResponse, Error> {
        match self
            .operate(range, KvRequest::MoveReplica { from, to })
            .await?
        {
            KvResponse::Moved(r) => Ok(r),
            other => Err(Error::Protocol(format!("unexpected response {other:?}"))),
        }
    }

    /// Merges the right neighbour of range `range` into it (an operator's request; the
    /// placement service merges small cold ranges made by splits on its own). Returns once
    /// `range` holds the neighbour's keys.
    pub async fn merge(&self, range: RangeId) -> Result<MergeResponse, Error> {
        match self.operate(range, KvRequest::Merge).await? {
            KvResponse::Merge(r) => Ok(r),
            other => Err(Error::Protocol(format!("unexpected response {other:?}"))),
        }
    }

    /// Sends the range operation `request` to range `range` (by id) and refreshes the routes
    /// after it, which changed the range's replicas or extent.
    async fn operate(&self, range: RangeId, request: KvRequest) -> Result<KvResponse, Error> {
        let desc = {
            let table = self.inner.table.read().expect("table lock");
            let table = table.as_ref().expect("routes fetched at connect");
            table.get(range).cloned()
        }
        .ok_or(Error::Api(ApiError::RangeNotFound { range_id: range }))?;
        let response = self.call_range(&desc, request).await?;
        self.refresh_routes().await.ok();
        Ok(response)
    }

    /// The placement service's view: nodes with their state, replica and leader counts, and
    /// ranges with their size and load (any node answers, from the placement leader).
    pub async fn placement(&self) -> Result<PlacementReport, Error> {
        self.ask_any(&ClientRequest::Placement).await
    }

    /// Starts draining node `node`: the placement service moves every replica off it. Watch
    /// [`Client::placement`] until the node holds none; then it can be stopped.
    pub async fn decommission(&self, node: NodeId) -> Result<PlacementReport, Error> {
        self.ask_any(&ClientRequest::Decommission { node }).await
    }

    /// Sends a placement request to each node in turn until one answers.
    async fn ask_any(&self, request: &ClientRequest) -> Result<PlacementReport, Error> {
        let mut last = Error::Config("no endpoints".into());
        for addr in self.candidate_addrs() {
            match self.inner.send(&addr, request).await {
                Ok(Ok(ClientReply::Placement(report))) => return Ok(report),
                Ok(Ok(other)) => {
                    return Err(Error::Protocol(format!("unexpected reply {other:?}")))
                }
                Ok(Err(e)) => last = Error::Api(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Runs a txn. All its keys must lie in one range, else [`ApiError::CrossRange`].
    pub async fn txn(&self, txn: TxnRequest) -> Result<TxnResponse, Error> {
        let ranges = self.one_range_of(&txn.spans()).await?;
        let desc = ranges
            .into_iter()
            .next()
            .unwrap_or_else(|| self.locate(b""));
        match self.call_range(&desc, KvRequest::Txn(txn)).await? {
            KvResponse::Txn(r) => Ok(r),
            other => Err(Error::Protocol(format!("unexpected response {other:?}"))),
        }
    }

    /// Compacts every range at `revision` (capped at each range's own revision). Returns one
    /// result per range: a range already compacted at or past that point answers `Compacted`.
    pub async fn compact(
        &self,
        revision: u64,
    ) -> Result<Vec<Result<CompactResponse, Error>>, Error> {
        let mut results = Vec::new();
        for desc in self.routes().ranges {
            results.push(
                match self
                    .call_range(&desc, KvRequest::Compact { revision })
                    .await
                {
                    Ok(KvResponse::Compact(r)) => Ok(r),
                    Ok(other) => Err(Error::Protocol(format!("unexpected response {other:?}"))),
                    Err(e) => Err(e),
                },
            );
        }
        Ok(results)
    }

    /// Status of every node (an unreachable node gives its error).
    pub async fn status(&self) -> Vec<(String, Result<StatusResponse, Error>)> {
        let mut out = Vec::new();
        for addr in self.candidate_addrs() {
            let r = match self.inner.send(&addr, &ClientRequest::Status).await {
                Ok(Ok(ClientReply::Status(s))) => Ok(s),
                Ok(Ok(other)) => Err(Error::Protocol(format!("unexpected reply {other:?}"))),
                Ok(Err(e)) => Err(Error::Api(e)),
                Err(e) => Err(e),
            };
            out.push((addr, r));
        }
        out
    }

    /// Configures fail point `name` of the node at `addr` with `actions` (the `fail` crate's
    /// syntax: `return`, `5%return`, `off`, ...). For fault campaigns: a node built without
    /// the `failpoints` feature refuses.
    pub async fn configure_fail_point(
        &self,
        addr: &str,
        name: &str,
        actions: &str,
    ) -> Result<(), Error> {
        let request = ClientRequest::FailPoint {
            name: name.to_string(),
            actions: actions.to_string(),
        };
        match self.inner.send(addr, &request).await? {
            Ok(ClientReply::FailPointSet) => Ok(()),
            Ok(other) => Err(Error::Protocol(format!("unexpected reply {other:?}"))),
            Err(e) => Err(Error::Api(e)),
        }
    }

    /// Opens a bi-stream to `addr`, sends `request` as its first frame and keeps both
    /// halves open (for a watch channel).
    pub(crate) async fn open_channel(
        &self,
        addr: &str,
        request: &ClientRequest,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), Error> {
        self.inner
            .open_stream(addr, &wire::encode_frame(request))
            .await
    }

    /// The client's watch channels.
    pub(crate) fn watch_channels(&self) -> &crate::watch::Channels {
        &self.inner.watch_channels
    }

    /// Sends raw bytes as a request frame to `addr` and returns the decoded response
    /// (for protocol tests: malformed frames, unknown versions).
    pub async fn send_raw(&self, addr: &str, bytes: &[u8]) -> Result<ClientResponse, Error> {
        self.inner.exchange(addr, bytes).await
    }

    pub(crate) fn locate(&self, key: &[u8]) -> RangeDescriptor {
        let table = self.inner.table.read().expect("table lock");
        table
            .as_ref()
            .expect("routes fetched at connect")
            .locate(key)
            .clone()
    }

    /// The range holding every key of `spans` (none for no spans), else
    /// [`ApiError::CrossRange`]. A cached table that spreads them over several ranges is
    /// fetched again before refusing: they may have been merged since.
    pub(crate) async fn one_range_of(
        &self,
        spans: &[KeySpan],
    ) -> Result<Option<RangeDescriptor>, Error> {
        let ranges_of = || {
            let mut ranges: Vec<RangeDescriptor> =
                spans.iter().flat_map(|s| self.overlapping(s)).collect();
            ranges.sort_by_key(|d| d.id);
            ranges.dedup_by_key(|d| d.id);
            ranges
        };
        let mut ranges = ranges_of();
        if ranges.len() > 1 {
            self.refresh_routes().await?;
            ranges = ranges_of();
        }
        if ranges.len() > 1 {
            return Err(Error::Api(ApiError::CrossRange {
                ranges: ranges.iter().map(|d| d.id).collect(),
            }));
        }
        Ok(ranges.pop())
    }

    pub(crate) fn overlapping(&self, span: &KeySpan) -> Vec<RangeDescriptor> {
        let (start, end) = span.bounds();
        let table = self.inner.table.read().expect("table lock");
        let table = table.as_ref().expect("routes fetched at connect");
        table.overlapping(&start, &end).cloned().collect()
    }
}

/// Whether `e` says the client's route for a request was out of date (after the retries of
/// `call_range`, which reroutes what fits one range): the caller plans the request again.
pub(crate) fn is_stale(e: &Error) -> bool {
    match e {
        Error::Api(e) => e.is_stale_route(),
        Error::Exhausted { last, .. } => is_stale(last),
        _ => false,
    }
}

/// What is left of `span` once range `desc` has been visited, in ascending key order or
/// descending. A single key is done after its range.
fn after(span: &KeySpan, desc: &RangeDescriptor, descending: bool) -> KeySpan {
    match &span.end {
        None => span.clone(),
        Some(end) if descending => KeySpan {
            key: span.key.clone(),
            end: Some(if end.is_empty() || end > &desc.start {
                desc.start.clone()
            } else {
                end.clone()
            }),
        },
        Some(end) => KeySpan {
            key: if desc.end.is_empty() {
                // Nothing is left after the last range.
                end.clone()
            } else {
                desc.end.clone().max(span.key.clone())
            },
            end: Some(end.clone()),
        },
    }
}

/// The part of `span` inside `desc`, as a span.
pub(crate) fn clip(desc: &RangeDescriptor, span: &KeySpan) -> KeySpan {
    match &span.end {
        None => span.clone(),
        Some(end) => {
            let (start, end) = desc.clip(&span.key, end);
            KeySpan {
                key: start,
                end: Some(end),
            }
        }
    }
}

impl Inner {
    async fn connection(&self, addr: &str) -> Result<quinn::Connection, Error> {
        let connect_err = |reason: String| Error::Connect {
            addr: addr.to_string(),
            reason,
        };
        let sock: SocketAddr = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| connect_err(e.to_string()))?
            .next()
            .ok_or_else(|| connect_err("no address".into()))?;
        if let Some(c) = self.conns.lock().expect("conns lock").get(&sock) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let connecting = self
            .endpoint
            .connect(sock, SERVER_NAME)
            .map_err(|e| connect_err(e.to_string()))?;
        let conn = tokio::time::timeout(self.config.connect_timeout, connecting)
            .await
            .map_err(|_| connect_err("handshake timed out".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        self.conns
            .lock()
            .expect("conns lock")
            .insert(sock, conn.clone());
        Ok(conn)
    }

    async fn send(&self, addr: &str, request: &ClientRequest) -> Result<ClientResponse, Error> {
        self.exchange(addr, &wire::encode_frame(request)).await
    }

    /// Opens a stream to `addr` and hands it the whole `frame`; returns the receiving half.
    async fn deliver(&self, addr: &str, frame: &[u8]) -> Result<quinn::RecvStream, Error> {
        let (mut send, recv) = self.open_stream(addr, frame).await?;
        let _ = send.finish();
        Ok(recv)
    }

    /// Opens a bi-stream to `addr` and writes `frame` on it, within the request timeout.
    async fn open_stream(
        &self,
        addr: &str,
        frame: &[u8],
    ) -> Result<(quinn::SendStream, quinn::RecvStream), Error> {
        let timeout = self.config.request_timeout;
        let connect_err = |reason: String| Error::Connect {
            addr: addr.to_string(),
            reason,
        };
        // Until the whole frame is handed to QUIC the node cannot have decoded the request:
        // a failure (or the deadline) up to then is "not delivered", safe to retry. After
        // that the outcome is unknown.
        let open = async {
            let conn = self.connection(addr).await?;
            let (mut send, recv) = conn
                .open_bi()
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            send.write_all(frame)
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            Ok::<_, Error>((send, recv))
        };
        match tokio::time::timeout(timeout, open).await {
            Err(_) => Err(connect_err(format!("not delivered within {timeout:?}"))),
            Ok(r) => r,
        }
    }

    async fn exchange(&self, addr: &str, frame: &[u8]) -> Result<ClientResponse, Error> {
        let timeout = self.config.request_timeout;
        let mut recv = self.deliver(addr, frame).await?;
        match tokio::time::timeout(
            timeout,
            wire::read_frame::<_, ClientResponse>(&mut recv, RESPONSE_BYTES_MAX),
        )
        .await
        {
            Err(_) => Err(Error::Timeout(timeout)),
            Ok(Err(wire::WireError::Io(e))) => Err(Error::Protocol(format!("{addr}: {e}"))),
            Ok(Err(e)) => Err(Error::Protocol(e.to_string())),
            Ok(Ok(r)) => {
                wire::take_end(&mut recv);
                Ok(r)
            }
        }
    }
}
