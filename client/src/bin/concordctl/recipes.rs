//! `concordctl lock`, `elect` and `members`: the client recipes from the command line.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use concord_client::{Client, Election, Error, MemberEvent, Membership, Session};
use serde_json::json;

use super::text;

/// `concordctl lock`.
#[derive(Args)]
pub struct LockArgs {
    /// The lock's name (its contenders' keys live under NAME/).
    name: String,
    /// TTL of the session holding the lock, in seconds.
    #[arg(long, default_value_t = 10)]
    ttl: u64,
    /// Run this command while holding the lock (after `--`), with CONCORD_LOCK_KEY and
    /// CONCORD_LOCK_TOKEN in its environment; then release. Without one, hold the lock until
    /// interrupted.
    #[arg(last = true)]
    command: Vec<String>,
}

/// `concordctl elect`.
#[derive(Args)]
pub struct ElectArgs {
    /// The election's name (candidates' keys live under NAME/).
    name: String,
    /// Campaign with this value and hold the leadership until interrupted.
    value: Option<String>,
    /// Print every change of leader instead of campaigning.
    #[arg(long, conflicts_with = "value")]
    listen: bool,
    /// TTL of the candidate's session, in seconds.
    #[arg(long, default_value_t = 10)]
    ttl: u64,
    /// With --listen: exit after this many changes (0 = never).
    #[arg(long, default_value_t = 0)]
    count: u64,
}

/// `concordctl members`.
#[derive(Subcommand)]
pub enum MembersCommand {
    /// Register member ID of GROUP (with METADATA) and stay registered until interrupted.
    Register {
        /// The group.
        group: String,
        /// The member's id.
        id: String,
        /// What to publish (address, labels, …).
        #[arg(default_value = "")]
        metadata: String,
        /// TTL of the member's session, in seconds: the member leaves this long after the
        /// process dies.
        #[arg(long, default_value_t = 10)]
        ttl: u64,
    },
    /// List the members of GROUP.
    List {
        /// The group.
        group: String,
    },
    /// Print joins, updates and departures in GROUP.
    Watch {
        /// The group.
        group: String,
        /// Exit after this many events (0 = never).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
}

/// Resolves on Ctrl-C or SIGTERM.
async fn interrupted() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Holds until interrupted (Ok) or until the session is lost (Err).
async fn hold(session: &Session, what: &str) -> Result<(), Error> {
    tokio::select! {
        _ = interrupted() => Ok(()),
        reason = session.expired() => Err(Error::Lost { key: what.to_string(), reason }),
    }
}

/// `concordctl lock NAME [-- COMMAND...]`.
pub async fn run_lock(client: &Client, args: LockArgs, json: bool) -> Result<ExitCode, Error> {
    let session = client.session(Duration::from_secs(args.ttl)).await?;
    let guard = tokio::select! {
        guard = client.lock(&args.name, &session) => guard?,
        _ = interrupted() => {
            // Leave the queue at once rather than after the TTL.
            session.close().await?;
            return Ok(ExitCode::from(130));
        }
    };
    let key = text(guard.key());
    if json {
        println!(
            "{}",
            json!({"name": args.name, "key": key, "token": guard.token(), "lease": format!("{:x}", guard.lease())})
        );
    } else {
        println!("{key}");
        println!("token {}", guard.token());
    }
    let code = match args.command.split_first() {
        None => {
            hold(&session, &key).await?;
            ExitCode::SUCCESS
        }
        Some((program, rest)) => {
            let spawned = tokio::process::Command::new(program)
                .args(rest)
                .env("CONCORD_LOCK_KEY", &key)
                .env("CONCORD_LOCK_TOKEN", guard.token().to_string())
                .kill_on_drop(true)
                .spawn();
            let mut child = match spawned {
                Ok(child) => child,
                Err(e) => {
                    guard.unlock().await?;
                    session.close().await?;
                    return Err(Error::Config(format!("cannot run {program:?}: {e}")));
                }
            };
            tokio::select! {
                status = child.wait() => {
                    let status = status.map_err(|e| Error::Config(format!("{program:?}: {e}")))?;
                    ExitCode::from(status.code().map_or(1, |c| c as u8))
                }
                reason = session.expired() => {
                    // The lock is gone: the command must not go on believing it holds it.
                    child.kill().await.ok();
                    return Err(Error::Lost { key, reason });
                }
                _ = interrupted() => {
                    child.kill().await.ok();
                    ExitCode::from(130)
                }
            }
        }
    };
    guard.unlock().await?;
    session.close().await?;
    Ok(code)
}

/// `concordctl elect NAME [VALUE] [--listen]`.
pub async fn run_elect(client: &Client, args: ElectArgs, json: bool) -> Result<(), Error> {
    let election = Election::new(client.clone(), &args.name);
    let Some(value) = args.value.filter(|_| !args.listen) else {
        let mut observer = election.observe().await?;
        let mut seen = 0;
        while let Some(change) = observer.next().await {
            let change = change?;
            let leader = change.leader.as_ref();
            if json {
                println!(
                    "{}",
                    json!({"name": args.name, "revision": change.revision,
                        "leader": leader.map(|kv| json!({"key": text(&kv.key), "value": text(&kv.value), "token": kv.create_revision}))})
                );
            } else {
                match leader {
                    Some(kv) => println!("{}", text(&kv.value)),
                    None => println!("(no leader)"),
                }
            }
            seen += 1;
            if args.count != 0 && seen >= args.count {
                break;
            }
        }
        return Ok(());
    };
    let session = client.session(Duration::from_secs(args.ttl)).await?;
    let leadership = tokio::select! {
        won = election.campaign(&session, value.as_bytes()) => won?,
        _ = interrupted() => return session.close().await,
    };
    let key = text(leadership.key());
    if json {
        println!(
            "{}",
            json!({"name": args.name, "key": key, "value": value, "token": leadership.token()})
        );
    } else {
        println!("{key}");
        println!("{value}");
    }
    hold(&session, &key).await?;
    leadership.resign().await?;
    session.close().await
}

/// `concordctl members register|list|watch`.
pub async fn run_members(
    client: &Client,
    command: MembersCommand,
    json: bool,
) -> Result<(), Error> {
    match command {
        MembersCommand::Register {
            group,
            id,
            metadata,
            ttl,
        } => {
            let members = Membership::new(client.clone(), &group);
            let session = client.session(Duration::from_secs(ttl)).await?;
            members.register(&session, &id, metadata.as_bytes()).await?;
            if json {
                println!("{}", json!({"group": group, "id": id, "registered": true}));
            } else {
                println!("registered {id} in {group}");
            }
            hold(&session, &id).await?;
            members.deregister(&id).await?;
            session.close().await?;
        }
        MembersCommand::List { group } => {
            let (members, revision) = Membership::new(client.clone(), &group).list().await?;
            if json {
                let list: Vec<_> = members
                    .iter()
                    .map(|m| json!({"id": m.id, "metadata": text(&m.metadata), "revision": m.revision}))
                    .collect();
                println!(
                    "{}",
                    json!({"group": group, "revision": revision, "members": list})
                );
            } else {
                for m in members {
                    println!("{}\t{}", m.id, text(&m.metadata));
                }
            }
        }
        MembersCommand::Watch { group, count } => {
            let mut watcher = Membership::new(client.clone(), &group).watch().await?;
            let mut seen = 0;
            while let Some(events) = watcher.next().await {
                for event in events? {
                    let (kind, id, metadata, revision) = match &event {
                        MemberEvent::Joined(m) => ("JOINED", &m.id, text(&m.metadata), m.revision),
                        MemberEvent::Updated(m) => {
                            ("UPDATED", &m.id, text(&m.metadata), m.revision)
                        }
                        MemberEvent::Left { id, revision } => {
                            ("LEFT", id, String::new(), *revision)
                        }
                    };
                    if json {
                        println!(
                            "{}",
                            json!({"type": kind, "id": id, "metadata": metadata, "revision": revision})
                        );
                    } else {
                        println!("{kind} {id} {metadata}");
                    }
                    seen += 1;
                    if count != 0 && seen >= count {
                        return Ok(());
                    }
                }
            }
        }
    }
    Ok(())
}
