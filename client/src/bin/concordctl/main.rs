//! `concordctl`: the command-line client of concord (docs/cli.md).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use concord_client::api::{
    Consistency, KeySpan, KeyValue, LeaseId, PutRequest, RangeRequest, ResponseHeader,
    TxnOpResponse,
};
use concord_client::watch_api::{EventKind, WatchRequest};
use concord_client::{txn_syntax, Client, ClientConfig, Error, RangeResult};
use serde_json::{json, Value};

mod recipes;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "concordctl", version, about = "Command-line client of concord")]
struct Cli {
    /// Client config (endpoints + CA); `concord dev` writes one into its data dir.
    #[arg(
        long,
        env = "CONCORD_CONFIG",
        default_value = "concord-dev/concordctl.toml",
        global = true
    )]
    config: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Text, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Put VALUE under KEY.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Print the previous key-value.
        #[arg(long)]
        prev_kv: bool,
        /// Attach the key to this lease (hex id, as `lease grant` prints it).
        #[arg(long, value_parser = parse_lease_id, conflicts_with_all = ["ttl", "prev_kv"])]
        lease: Option<LeaseId>,
        /// An ephemeral key: grant a new lease of TTL seconds and put the key attached to it,
        /// in one request; prints the lease (keep it alive with `lease keep-alive`, or let it
        /// expire and the key goes).
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Read KEY (or every key with prefix KEY).
    Get {
        /// The key.
        key: String,
        /// Read at this revision of the key's range (0 = latest).
        #[arg(long, default_value_t = 0)]
        rev: u64,
        /// linearizable, follower or serializable.
        #[arg(long, default_value = "linearizable")]
        consistency: Consistency,
        /// Treat KEY as a prefix.
        #[arg(long)]
        prefix: bool,
    },
    /// Delete KEY (or every key with prefix KEY).
    Del {
        /// The key.
        key: String,
        /// Treat KEY as a prefix.
        #[arg(long)]
        prefix: bool,
        /// Print the deleted key-values.
        #[arg(long)]
        prev_kv: bool,
    },
    /// Read the keys in [START, END), or with prefix START.
    Range {
        /// First key.
        start: String,
        /// End key (exclusive); omitted: every key >= START.
        end: Option<String>,
        /// Treat START as a prefix.
        #[arg(long)]
        prefix: bool,
        /// At most this many keys (0 = all).
        #[arg(long, default_value_t = 0)]
        limit: u64,
        /// Keys only, no values.
        #[arg(long)]
        keys_only: bool,
        /// Only count.
        #[arg(long)]
        count_only: bool,
        /// Descending key order.
        #[arg(long)]
        descending: bool,
        /// Read at this revision (0 = latest).
        #[arg(long, default_value_t = 0)]
        rev: u64,
        /// linearizable, follower or serializable.
        #[arg(long, default_value = "linearizable")]
        consistency: Consistency,
    },
    /// Run a txn read from FILE or stdin (syntax: docs/cli.md).
    Txn {
        /// File with the txn; `-` or omitted reads stdin.
        file: Option<PathBuf>,
    },
    /// Compact every range at REV (capped at each range's revision).
    Compact {
        /// The compaction point.
        rev: u64,
    },
    /// Nodes, ranges, leaders and revisions.
    Status,
    /// The range table: id, bounds, epoch, replicas, leader, revision and keys of every
    /// range; `ranges split KEY` splits a range.
    Ranges {
        /// An operator command on ranges (none: list them).
        #[command(subcommand)]
        op: Option<RangesCommand>,
    },
    /// List the nodes as the placement service sees them (state, replicas, leaders), or
    /// decommission one.
    #[command(alias = "node")]
    Nodes {
        /// An operator command on nodes (none: list them).
        #[command(subcommand)]
        op: Option<NodesCommand>,
    },
    /// Leases: grant, revoke, keep-alive, ttl, list.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Acquire lock NAME; print its key and fencing token; run COMMAND while holding it (or
    /// hold until interrupted).
    Lock(recipes::LockArgs),
    /// Campaign in election NAME with VALUE and hold the leadership until interrupted, or
    /// `--listen` to leader changes.
    Elect(recipes::ElectArgs),
    /// Membership: register, list, watch.
    #[command(subcommand)]
    Members(recipes::MembersCommand),
    /// Watch KEY (or a prefix, or [KEY, END)) and print each event until interrupted.
    Watch {
        /// The key.
        key: String,
        /// End of an interval (exclusive).
        end: Option<String>,
        /// Treat KEY as a prefix.
        #[arg(long)]
        prefix: bool,
        /// Start at this revision of each range (0 = from now).
        #[arg(long, default_value_t = 0)]
        rev: u64,
        /// Print the previous key-value of each event.
        #[arg(long)]
        prev_kv: bool,
        /// Leave out puts.
        #[arg(long)]
        no_put: bool,
        /// Leave out deletes.
        #[arg(long)]
        no_delete: bool,
        /// Print progress bookmarks.
        #[arg(long)]
        progress: bool,
        /// Exit after this many events (0 = never).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
}

/// Prints watch responses until `count` events (0: forever).
async fn run_watch(
    client: &Client,
    request: WatchRequest,
    count: u64,
    json: bool,
) -> Result<(), Error> {
    let mut watcher = client.watch(request).await?;
    let mut seen = 0;
    while let Some(response) = watcher.next().await {
        let response = response?;
        if response.progress {
            if json {
                println!(
                    "{}",
                    json!({"range_id": response.range_id, "progress": response.revision})
                );
            } else {
                println!(
                    "PROGRESS range {} revision {}",
                    response.range_id, response.revision
                );
            }
            continue;
        }
        for event in &response.events {
            let kind = match event.kind {
                EventKind::Put => "PUT",
                EventKind::Delete => "DELETE",
            };
            if json {
                println!(
                    "{}",
                    json!({"type": kind, "range_id": response.range_id, "revision": response.revision, "kv": kv_json(&event.kv), "prev_kv": event.prev_kv.as_ref().map(kv_json)})
                );
            } else {
                println!("{kind}");
                print_kvs(
                    std::slice::from_ref(&event.kv),
                    event.kind == EventKind::Delete,
                );
                if let Some(prev) = &event.prev_kv {
                    print_kvs(std::slice::from_ref(prev), false);
                }
            }
            seen += 1;
            if count != 0 && seen >= count {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[derive(Subcommand)]
enum RangesCommand {
    /// Split the range holding KEY so that a new range starts at KEY (on the same replicas).
    Split {
        /// The first key of the new range.
        key: String,
    },
    /// Move range ID's replica on node FROM to node TO (add TO as a learner, let it catch up,
    /// then replace FROM among the voters).
    Move {
        /// The range.
        id: u64,
        /// The node giving up its replica.
        from: u64,
        /// The node receiving it.
        to: u64,
    },
    /// Merge the right neighbour of range ID into it (the neighbour is frozen, its keys,
    /// histories and leases join range ID, and it is removed).
    Merge {
        /// The range that takes its right neighbour in.
        id: u64,
    },
}

#[derive(Subcommand)]
enum NodesCommand {
    /// Drain node ID: the placement service moves every replica off it; `concordctl nodes`
    /// shows it at 0 replicas when it can be stopped.
    Decommission {
        /// The node.
        id: u64,
    },
}

#[derive(Subcommand)]
enum LeaseCommand {
    /// Grant a lease of TTL seconds; prints its id.
    Grant {
        /// Time to live, in seconds.
        ttl: u64,
    },
    /// Revoke a lease: its keys are deleted in every range.
    Revoke {
        /// The lease (hex id).
        #[arg(value_parser = parse_lease_id)]
        id: LeaseId,
    },
    /// Keep a lease alive until interrupted (or once).
    KeepAlive {
        /// The lease (hex id).
        #[arg(value_parser = parse_lease_id)]
        id: LeaseId,
        /// Renew once and exit.
        #[arg(long)]
        once: bool,
    },
    /// Granted and remaining TTL of a lease.
    Ttl {
        /// The lease (hex id).
        #[arg(value_parser = parse_lease_id)]
        id: LeaseId,
        /// Also list the keys attached to it.
        #[arg(long)]
        keys: bool,
    },
    /// Every live lease.
    List,
}

/// Lease ids are shown and read in hex, as etcdctl does.
fn parse_lease_id(s: &str) -> Result<LeaseId, String> {
    let digits = s.trim_start_matches("0x");
    match i64::from_str_radix(digits, 16) {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(format!("{s:?} is not a lease id (a positive hex number)")),
    }
}

async fn run_lease(client: &Client, command: LeaseCommand, json: bool) -> Result<(), Error> {
    match command {
        LeaseCommand::Grant { ttl } => {
            let id = client.lease_grant(Duration::from_secs(ttl)).await?;
            if json {
                println!("{}", json!({"id": format!("{id:x}"), "ttl": ttl}));
            } else {
                println!("lease {id:x} granted with TTL({ttl}s)");
            }
        }
        LeaseCommand::Revoke { id } => {
            client.lease_revoke(id).await?;
            if json {
                println!("{}", json!({"id": format!("{id:x}"), "revoked": true}));
            } else {
                println!("lease {id:x} revoked");
            }
        }
        LeaseCommand::KeepAlive { id, once } => loop {
            let ttl_ms = client.lease_keep_alive_once(id).await?;
            if json {
                println!("{}", json!({"id": format!("{id:x}"), "ttl": ttl_ms / 1000}));
            } else {
                println!("lease {id:x} keepalived with TTL({}s)", ttl_ms / 1000);
            }
            if once {
                break;
            }
            tokio::time::sleep(Duration::from_millis(ttl_ms / 3)).await;
        },
        LeaseCommand::Ttl { id, keys } => {
            let t = client.lease_time_to_live(id, keys).await?;
            let keys: Vec<String> = t.keys.iter().map(|k| text(k)).collect();
            if json {
                println!(
                    "{}",
                    json!({"id": format!("{id:x}"), "granted_ttl": t.granted_ttl_ms / 1000, "ttl": t.remaining_ms / 1000, "remaining_ms": t.remaining_ms, "keys": keys})
                );
            } else {
                print!(
                    "lease {id:x} granted with TTL({}s), remaining({}s)",
                    t.granted_ttl_ms / 1000,
                    t.remaining_ms / 1000
                );
                if !keys.is_empty() {
                    print!(", attached keys({})", keys.join(", "));
                }
                println!();
            }
        }
        LeaseCommand::List => {
            let ids = client.lease_list().await?;
            let hex: Vec<String> = ids.iter().map(|id| format!("{id:x}")).collect();
            if json {
                println!("{}", json!({"leases": hex}));
            } else {
                println!("found {} leases", ids.len());
                for id in hex {
                    println!("{id}");
                }
            }
        }
    }
    Ok(())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn kv_json(kv: &KeyValue) -> Value {
    json!({
        "key": text(&kv.key),
        "value": text(&kv.value),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
        "lease": format!("{:x}", kv.lease),
    })
}

fn key_or_prefix(key: String, prefix: bool) -> KeySpan {
    if prefix {
        KeySpan::prefix(key)
    } else {
        KeySpan::key(key)
    }
}

fn range_json(r: &RangeResult) -> Value {
    json!({
        "kvs": r.kvs.iter().map(kv_json).collect::<Vec<_>>(),
        "count": r.count,
        "more": r.more,
        "revision": revision(&r.headers),
        "headers": headers_json(&r.headers),
    })
}

fn headers_json(headers: &[ResponseHeader]) -> Value {
    Value::Array(
        headers
            .iter()
            .map(|h| json!({"range_id": h.range_id, "revision": h.revision}))
            .collect(),
    )
}

/// The single revision of a response that visited one range; for several, the largest.
fn revision(headers: &[ResponseHeader]) -> u64 {
    headers.iter().map(|h| h.revision).max().unwrap_or(0)
}

fn print_kvs(kvs: &[KeyValue], keys_only: bool) {
    for kv in kvs {
        println!("{}", text(&kv.key));
        if !keys_only {
            println!("{}", text(&kv.value));
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, Error> {
    let json = cli.output == Output::Json;
    let client = Client::connect(ClientConfig::from_file(&cli.config)?).await?;
    match cli.command {
        Command::Lease(command) => run_lease(&client, command, json).await?,
        Command::Lock(args) => return recipes::run_lock(&client, args, json).await,
        Command::Elect(args) => recipes::run_elect(&client, args, json).await?,
        Command::Members(command) => recipes::run_members(&client, command, json).await?,
        Command::Watch {
            key,
            end,
            prefix,
            rev,
            prev_kv,
            no_put,
            no_delete,
            progress,
            count,
        } => {
            let span = match (prefix, end) {
                (true, None) => KeySpan::prefix(key),
                (false, Some(end)) => KeySpan::interval(key, end),
                (false, None) => KeySpan::key(key),
                (true, Some(_)) => return Err(Error::Config("--prefix takes no END".into())),
            };
            let request = WatchRequest {
                span,
                start_revision: rev,
                prev_kv,
                no_put,
                no_delete,
                progress_notify: progress,
            };
            run_watch(&client, request, count, json).await?
        }
        Command::Put {
            key,
            value,
            ttl: Some(ttl),
            ..
        } => {
            let (id, r) = client
                .put_ephemeral(key, value, Duration::from_secs(ttl))
                .await?;
            if json {
                println!(
                    "{}",
                    json!({"revision": r.header.revision, "range_id": r.header.range_id, "lease": format!("{id:x}"), "ttl": ttl})
                );
            } else {
                println!("OK");
                println!("lease {id:x} granted with TTL({ttl}s)");
            }
        }
        Command::Put {
            key,
            value,
            prev_kv,
            lease,
            ttl: None,
        } => {
            let r = client
                .put_with(PutRequest {
                    key: key.into_bytes(),
                    value: value.into_bytes(),
                    lease: lease.unwrap_or(0),
                    prev_kv,
                })
                .await?;
            if json {
                println!(
                    "{}",
                    json!({"revision": r.header.revision, "range_id": r.header.range_id, "prev_kv": r.prev_kv.as_ref().map(kv_json)})
                );
            } else {
                println!("OK");
                if let Some(kv) = r.prev_kv {
                    print_kvs(&[kv], false);
                }
            }
        }
        Command::Get {
            key,
            rev,
            consistency,
            prefix,
        } => {
            let span = key_or_prefix(key, prefix);
            let mut req = RangeRequest::new(span);
            req.revision = rev;
            let r = client.range(req, consistency).await?;
            if json {
                println!("{}", range_json(&r));
            } else {
                print_kvs(&r.kvs, false);
            }
        }
        Command::Del {
            key,
            prefix,
            prev_kv,
        } => {
            let span = key_or_prefix(key, prefix);
            let r = client.delete(span, prev_kv).await?;
            if json {
                println!(
                    "{}",
                    json!({"deleted": r.deleted, "prev_kvs": r.prev_kvs.iter().map(kv_json).collect::<Vec<_>>(), "revision": revision(&r.headers), "headers": headers_json(&r.headers)})
                );
            } else {
                println!("{}", r.deleted);
                print_kvs(&r.prev_kvs, false);
            }
        }
        Command::Range {
            start,
            end,
            prefix,
            limit,
            keys_only,
            count_only,
            descending,
            rev,
            consistency,
        } => {
            let span = match (prefix, end) {
                (true, None) => KeySpan::prefix(start),
                (false, Some(end)) => KeySpan::interval(start, end),
                (false, None) => KeySpan::interval(start, Vec::new()),
                (true, Some(_)) => return Err(Error::Config("--prefix takes no END".into())),
            };
            let req = RangeRequest {
                span,
                revision: rev,
                limit,
                keys_only,
                count_only,
                descending,
            };
            let r = client.range(req, consistency).await?;
            if json {
                println!("{}", range_json(&r));
            } else if count_only {
                println!("{}", r.count);
            } else {
                print_kvs(&r.kvs, keys_only);
            }
        }
        Command::Txn { file } => {
            let mut src = String::new();
            match file.as_deref() {
                None => std::io::stdin().read_to_string(&mut src).map(|_| ()),
                Some(p) if p.as_os_str() == "-" => {
                    std::io::stdin().read_to_string(&mut src).map(|_| ())
                }
                Some(p) => std::fs::read_to_string(p).map(|s| src = s),
            }
            .map_err(|e| Error::Config(format!("reading the txn: {e}")))?;
            let txn = txn_syntax::parse(&src).map_err(|e| Error::Config(e.to_string()))?;
            let r = client.txn(txn).await?;
            if json {
                let responses: Vec<Value> = r
                    .responses
                    .iter()
                    .map(|op| match op {
                        TxnOpResponse::Put(p) => json!({"put": {"revision": p.header.revision}}),
                        TxnOpResponse::Range(g) => json!({"get": {"kvs": g.kvs.iter().map(kv_json).collect::<Vec<_>>(), "count": g.count}}),
                        TxnOpResponse::Delete(d) => json!({"del": {"deleted": d.deleted}}),
                    })
                    .collect();
                println!(
                    "{}",
                    json!({"succeeded": r.succeeded, "revision": r.header.revision, "range_id": r.header.range_id, "responses": responses})
                );
            } else {
                println!("{}", if r.succeeded { "SUCCESS" } else { "FAILURE" });
                for op in &r.responses {
                    match op {
                        TxnOpResponse::Put(_) => println!("OK"),
                        TxnOpResponse::Range(g) => print_kvs(&g.kvs, false),
                        TxnOpResponse::Delete(d) => println!("{}", d.deleted),
                    }
                }
            }
        }
        Command::Compact { rev } => {
            let results = client.compact(rev).await?;
            let ranges = client.routes().ranges;
            let mut rows = Vec::new();
            for (desc, r) in ranges.iter().zip(results) {
                match r {
                    Ok(c) => {
                        rows.push(json!({"range_id": desc.id, "compact_revision": c.compact_revision, "revision": c.header.revision}));
                        if !json {
                            println!("range {}: compacted at {}", desc.id, c.compact_revision);
                        }
                    }
                    Err(Error::Api(concord_client::api::ApiError::Compacted {
                        compact_revision,
                    })) => {
                        rows.push(json!({"range_id": desc.id, "compact_revision": compact_revision, "already": true}));
                        if !json {
                            println!("range {}: already compacted at {compact_revision}", desc.id);
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            if json {
                println!("{}", Value::Array(rows));
            }
        }
        Command::Ranges {
            op: Some(RangesCommand::Split { key }),
        } => {
            let r = client.split(key.into_bytes()).await?;
            if json {
                println!(
                    "{}",
                    json!({"range_id": r.header.range_id, "new_range_id": r.new_range_id, "at": text(&r.at), "epoch": r.epoch, "revision": r.header.revision})
                );
            } else {
                println!(
                    "range {} split at {:?}: new range {} (epoch {}, revision {})",
                    r.header.range_id,
                    text(&r.at),
                    r.new_range_id,
                    r.epoch,
                    r.header.revision
                );
            }
        }
        Command::Ranges {
            op: Some(RangesCommand::Move { id, from, to }),
        } => {
            let r = client.move_replica(id, from, to).await?;
            if json {
                println!(
                    "{}",
                    json!({"range_id": r.header.range_id, "voters": r.voters, "revision": r.header.revision})
                );
            } else {
                println!(
                    "range {} moved from node {from} to node {to}: voters {:?}",
                    r.header.range_id, r.voters
                );
            }
        }
        Command::Ranges {
            op: Some(RangesCommand::Merge { id }),
        } => {
            let r = client.merge(id).await?;
            if json {
                println!(
                    "{}",
                    json!({"range_id": r.header.range_id, "merged_range_id": r.merged_range_id, "epoch": r.epoch, "revision": r.header.revision})
                );
            } else {
                println!(
                    "range {} merged range {} (epoch {}, revision {})",
                    r.header.range_id, r.merged_range_id, r.epoch, r.header.revision
                );
            }
        }
        Command::Nodes { op } => {
            let report = match op {
                Some(NodesCommand::Decommission { id }) => client.decommission(id).await?,
                None => client.placement().await?,
            };
            let rows: Vec<Value> = report
                .nodes
                .iter()
                .map(|n| {
                    let capacity = n.capacity.map(|c| {
                        json!({"memory_total_bytes": c.memory_total_bytes,
                            "memory_available_bytes": c.memory_available_bytes,
                            "resident_bytes": c.resident_bytes})
                    });
                    json!({"id": n.id, "addr": n.addr, "zone": n.zone, "state": n.state.name(),
                        "heartbeat_age_ms": n.heartbeat_age_ms, "replicas": n.replicas, "leaders": n.leaders,
                        "placement": n.placement, "capacity": capacity})
                })
                .collect();
            if json {
                println!("{}", Value::Array(rows));
            } else {
                println!(
                    "{:>4}  {:<22} {:<8} {:<16} {:>9} {:>8} {:>8} {:>9} {:>10} {:>10}",
                    "NODE",
                    "ADDRESS",
                    "ZONE",
                    "STATE",
                    "HEARTBEAT",
                    "REPLICAS",
                    "LEADERS",
                    "PLACEMENT",
                    "RSS",
                    "MEM FREE"
                );
                let mib = |b: u64| format!("{}MiB", b >> 20);
                for n in &report.nodes {
                    println!(
                        "{:>4}  {:<22} {:<8} {:<16} {:>9} {:>8} {:>8} {:>9} {:>10} {:>10}",
                        n.id,
                        n.addr,
                        n.zone.as_deref().unwrap_or("-"),
                        n.state.name(),
                        n.heartbeat_age_ms
                            .map_or("-".to_string(), |ms| format!("{ms}ms")),
                        n.replicas,
                        n.leaders,
                        if n.placement { "voter" } else { "-" },
                        n.capacity
                            .map_or("-".to_string(), |c| mib(c.resident_bytes)),
                        n.capacity
                            .map_or("-".to_string(), |c| mib(c.memory_available_bytes)),
                    );
                }
                for m in &report.moves {
                    println!(
                        "moving: range {} from node {} to node {}",
                        m.range, m.from, m.to
                    );
                }
            }
        }
        Command::Ranges { op: None } => {
            let routes = client.routes();
            // Size and load as the ranges' leaders last reported them to placement.
            let loads = client
                .placement()
                .await
                .map(|r| r.ranges)
                .unwrap_or_default();
            let load = |id: u64| loads.iter().find(|l| l.descriptor.id == id);
            // Revision and key count from the node that leads each range, when it answers.
            let statuses = client.status().await;
            let led = |id: u64| {
                statuses
                    .iter()
                    .filter_map(|(_, s)| s.as_ref().ok())
                    .flat_map(|s| {
                        s.ranges
                            .iter()
                            .filter(move |r| r.id == id && r.leader == Some(s.node_id))
                    })
                    .next()
            };
            let rows: Vec<Value> = routes
                .ranges
                .iter()
                .map(|d| {
                    let stats = led(d.id);
                    let load = load(d.id);
                    json!({"id": d.id, "start": text(&d.start), "end": text(&d.end), "epoch": d.epoch, "replicas": d.replicas,
                        "leader": routes.leaders.get(&d.id), "revision": stats.map(|r| r.revision),
                        "keys": stats.map(|r| r.keys).or(load.map(|l| l.keys)), "bytes": load.map(|l| l.bytes),
                        "reads_per_sec": load.map(|l| l.reads_per_sec), "writes_per_sec": load.map(|l| l.writes_per_sec)})
                })
                .collect();
            if json {
                println!("{}", Value::Array(rows));
            } else {
                println!(
                    "{:>5}  {:<12} {:<12} {:>5}  {:<9} {:>6} {:>9} {:>8} {:>10} {:>7} {:>7}",
                    "RANGE",
                    "START",
                    "END",
                    "EPOCH",
                    "REPLICAS",
                    "LEADER",
                    "REVISION",
                    "KEYS",
                    "BYTES",
                    "READ/S",
                    "WRITE/S"
                );
                for row in rows {
                    let field = |name: &str| match &row[name] {
                        Value::Null => "-".to_string(),
                        Value::String(s) => format!("{s:?}"),
                        Value::Array(a) => a
                            .iter()
                            .map(|v| v.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                        v => v.to_string(),
                    };
                    println!(
                        "{:>5}  {:<12} {:<12} {:>5}  {:<9} {:>6} {:>9} {:>8} {:>10} {:>7} {:>7}",
                        field("id"),
                        field("start"),
                        field("end"),
                        field("epoch"),
                        field("replicas"),
                        field("leader"),
                        field("revision"),
                        field("keys"),
                        field("bytes"),
                        field("reads_per_sec"),
                        field("writes_per_sec")
                    );
                }
            }
        }
        Command::Status => {
            let statuses = client.status().await;
            if json {
                let nodes: Vec<Value> = statuses
                    .iter()
                    .map(|(addr, s)| match s {
                        Ok(s) => json!({"endpoint": addr, "node_id": s.node_id, "fsyncs": s.storage.fsyncs, "appends": s.storage.appends,
                            "rss_bytes": s.process.rss_bytes, "watchers": s.process.watchers, "watch_overflows": s.process.watch_overflows,
                            "ranges": s.ranges.iter().map(|r| json!({"id": r.id, "start": text(&r.start), "end": text(&r.end), "epoch": r.epoch,
                                "replicas": r.replicas, "leader": r.leader, "term": r.term, "revision": r.revision, "applied_index": r.applied_index, "snapshot_index": r.snapshot_index, "purged_index": r.purged_index})).collect::<Vec<_>>()}),
                        Err(e) => json!({"endpoint": addr, "error": e.to_string(), "code": e.code()}),
                    })
                    .collect();
                println!("{}", json!({"nodes": nodes}));
            } else {
                for (addr, s) in &statuses {
                    match s {
                        Ok(s) => {
                            println!("node {} at {addr}: {} ranges, {} leading, {} fsyncs for {} appends", s.node_id, s.ranges.len(),
                                s.ranges.iter().filter(|r| r.leader == Some(s.node_id)).count(), s.storage.fsyncs, s.storage.appends);
                        }
                        Err(e) => println!("{addr}: unreachable ({e})"),
                    }
                }
                if let Some((_, Ok(s))) = statuses.iter().find(|(_, s)| s.is_ok()) {
                    println!(
                        "{:>5}  {:<10} {:<10} {:>6}  {:<9} {:>8}",
                        "RANGE", "START", "END", "LEADER", "REPLICAS", "REVISION"
                    );
                    for r in &s.ranges {
                        let replicas = r
                            .replicas
                            .iter()
                            .map(|n| n.to_string())
                            .collect::<Vec<_>>()
                            .join(",");
                        let leader = r.leader.map_or("-".to_string(), |l| l.to_string());
                        println!(
                            "{:>5}  {:<10} {:<10} {:>6}  {:<9} {:>8}",
                            r.id,
                            format!("{:?}", text(&r.start)),
                            format!("{:?}", text(&r.end)),
                            leader,
                            replicas,
                            r.revision
                        );
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {} [{}]", e, e.code());
            ExitCode::FAILURE
        }
    }
}
