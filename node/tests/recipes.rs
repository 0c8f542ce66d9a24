//! The coordination recipes on an in-process 3-node cluster: a lock-guarded counter with
//! fenced writes ends at exactly N×M and a paused ex-holder's writes are refused in every
//! range; an election has one leader at a time and its observers see every change; 1,000
//! members join and, once their sessions stop, leave within TTL + 2 s; barriers and a queue.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{eventually, key_in, Cluster, WAIT};
use concord_client::api::{ApiError, KeySpan, RangeRequest};
use concord_client::{
    Client, DoubleBarrier, Election, Error, MemberEvent, Membership, Observer, Queue, Session,
};
use futures::future::join_all;

const RANGES: usize = 4;

/// The lock name used by the counter test; its keys live in the range of `l`.
const LOCK: &str = "locks/counter";

async fn read_u64(client: &Client, key: &[u8]) -> u64 {
    let kvs = client.get(key.to_vec()).await.expect("read").kvs;
    kvs.first().map_or(0, |kv| {
        String::from_utf8_lossy(&kv.value)
            .parse()
            .expect("a number")
    })
}

fn range_of(client: &Client, key: &[u8]) -> u64 {
    let routes = client.routes();
    routes
        .ranges
        .iter()
        .find(|d| d.contains(key))
        .expect("a range holds every key")
        .id
}

/// The value the observer's next leader change names (`None`: no leader).
async fn next_leader(observer: &mut Observer) -> Option<String> {
    let change = within("leader change", observer.next())
        .await
        .expect("open")
        .expect("ok");
    change
        .leader
        .map(|kv| String::from_utf8(kv.value).expect("utf8"))
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {WAIT:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fenced_counter_is_exact_and_a_paused_holder_is_refused() {
    let cluster = Cluster::start(3, RANGES).await;
    let admin = cluster.client().await;
    // The counter lives in another range than the lock: its fence is checked remotely.
    let counter = key_in(&admin, 1, 0);
    assert_ne!(
        range_of(&admin, &counter),
        range_of(&admin, LOCK.as_bytes())
    );

    const CLIENTS: usize = 4;
    const ROUNDS: usize = 8;
    let workers = (0..CLIENTS).map(|_| {
        let counter = counter.clone();
        let config = cluster.client_config();
        async move {
            let client = Client::connect(config).await.expect("connect");
            let session = client
                .session(Duration::from_secs(10))
                .await
                .expect("session");
            let mut tokens = Vec::new();
            for _ in 0..ROUNDS {
                let guard = client.lock(LOCK, &session).await.expect("lock");
                let value = read_u64(&client, &counter).await;
                guard
                    .put(counter.clone(), (value + 1).to_string())
                    .await
                    .expect("fenced put by the holder");
                tokens.push(guard.token());
                guard.unlock().await.expect("unlock");
            }
            session.close().await.expect("close");
            tokens
        }
    });
    let tokens: Vec<u64> = within("counter rounds", join_all(workers))
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(read_u64(&admin, &counter).await, (CLIENTS * ROUNDS) as u64);
    let distinct: BTreeSet<u64> = tokens.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        tokens.len(),
        "every holder has its own token"
    );

    // A holder pauses past its lease: its successor takes over and the old guard's fenced
    // writes are refused, in the lock's range and in another.
    let paused_session = admin
        .session(Duration::from_secs(1))
        .await
        .expect("session");
    let paused = admin.lock(LOCK, &paused_session).await.expect("lock");
    let next_client = cluster.client().await;
    let next_session = next_client
        .session(Duration::from_secs(10))
        .await
        .expect("session");
    let waiting = {
        let next_client = next_client.clone();
        tokio::spawn(async move {
            let guard = next_client.lock(LOCK, &next_session).await;
            (guard, next_session)
        })
    };
    paused_session.abandon();
    let (successor, _next_session) = within("successor takes the lock", waiting)
        .await
        .expect("task");
    let successor = successor.expect("successor locks");
    assert!(successor.token() > paused.token(), "tokens grow");
    let same_range = format!("{LOCK}-data").into_bytes();
    assert_eq!(
        range_of(&admin, &same_range),
        range_of(&admin, LOCK.as_bytes())
    );
    for key in [counter.clone(), same_range] {
        match paused.put(key.clone(), "stale").await {
            Err(Error::Api(ApiError::Fenced { token })) => assert_eq!(token, paused.token()),
            other => panic!("paused holder's write to {key:?} was not fenced: {other:?}"),
        }
    }
    successor
        .put(counter.clone(), "successor")
        .await
        .expect("the successor's fenced write");
    let kv = admin
        .get(counter.clone())
        .await
        .expect("read")
        .kvs
        .remove(0);
    assert_eq!(kv.value, b"successor");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_leader_at_a_time_and_observers_see_every_change() {
    let cluster = Cluster::start(3, RANGES).await;
    let client = cluster.client().await;
    let election = Election::new(client.clone(), "elections/web");
    let mut observer = election.observe().await.expect("observe");
    let first = within("observe", observer.next())
        .await
        .expect("open")
        .expect("ok");
    assert_eq!(first.leader, None);

    let a_session = client
        .session(Duration::from_secs(1))
        .await
        .expect("session");
    let a = election.campaign(&a_session, b"a").await.expect("a wins");
    let b_session = client
        .session(Duration::from_secs(10))
        .await
        .expect("session");
    let b_campaign = {
        let election = election.clone();
        tokio::spawn(async move {
            let won = election.campaign(&b_session, b"b").await;
            (won, b_session)
        })
    };
    let mut seen = Vec::new();
    seen.push(next_leader(&mut observer).await);
    a.proclaim(b"a2").await.expect("proclaim");
    seen.push(next_leader(&mut observer).await);
    assert_eq!(
        election.leader().await.expect("leader").map(|kv| kv.value),
        Some(b"a2".to_vec())
    );
    assert!(!b_campaign.is_finished(), "b is elected while a leads");

    // a's session ends: b is elected, and a can no longer proclaim.
    a_session.abandon();
    let (b, _b_session) = within("b elected", b_campaign).await.expect("task");
    let b = b.expect("b wins");
    assert!(b.token() > a.token());
    assert_eq!(
        election.leader().await.expect("leader").map(|kv| kv.key),
        Some(b.key().to_vec())
    );
    assert!(matches!(
        a.proclaim(b"again").await,
        Err(Error::Lost { .. })
    ));
    seen.push(next_leader(&mut observer).await);
    b.resign().await.expect("resign");
    seen.push(next_leader(&mut observer).await);
    assert_eq!(
        seen,
        [Some("a".into()), Some("a2".into()), Some("b".into()), None]
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_members_join_and_leave_within_ttl_plus_two_seconds() {
    const MEMBERS: usize = 1_000;
    let ttl = Duration::from_secs(4);
    let cluster = Cluster::start(3, RANGES).await;
    let client = cluster.client().await;
    let group = Membership::new(client.clone(), "services/api");
    let mut watcher = group.watch().await.expect("watch");

    let mut sessions: Vec<Session> = Vec::new();
    for chunk in (0..MEMBERS).collect::<Vec<_>>().chunks(50) {
        let joined = join_all(chunk.iter().map(|i| {
            let (client, group) = (client.clone(), group.clone());
            async move {
                let session = client.session(ttl).await.expect("session");
                let meta = format!("10.0.0.{i}:80");
                group
                    .register(&session, &format!("m{i:04}"), meta.as_bytes())
                    .await
                    .expect("register");
                session
            }
        }));
        sessions.extend(within("registrations", joined).await);
    }
    let (listed, _) = group.list().await.expect("list");
    assert_eq!(listed.len(), MEMBERS);

    let mut joined = BTreeSet::new();
    within("1,000 joins seen", async {
        while joined.len() < MEMBERS {
            for event in watcher.next().await.expect("open").expect("ok") {
                match event {
                    MemberEvent::Joined(m) => assert!(joined.insert(m.id), "joined twice"),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    })
    .await;

    // Their processes stop: no more keepalives.
    let stopped = Instant::now();
    for session in sessions {
        session.abandon();
    }
    let mut left = BTreeSet::new();
    within("1,000 leaves seen", async {
        while left.len() < MEMBERS {
            for event in watcher.next().await.expect("open").expect("ok") {
                match event {
                    MemberEvent::Left { id, .. } => assert!(left.insert(id), "left twice"),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    })
    .await;
    let took = stopped.elapsed();
    assert!(
        took <= ttl + Duration::from_secs(2),
        "the last member left {took:?} after the sessions stopped (TTL {ttl:?})"
    );
    assert_eq!(left, joined);
    assert!(group.list().await.expect("list").0.is_empty());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_is_fifo_and_double_barrier_waits_for_all() {
    let cluster = Cluster::start(3, RANGES).await;
    let client = cluster.client().await;

    // Queue: FIFO for one consumer; with several, each item is taken exactly once.
    let queue = Queue::new(client.clone(), "queues/jobs");
    for i in 0..5 {
        queue.enqueue(format!("job{i}")).await.expect("enqueue");
    }
    for i in 0..5 {
        assert_eq!(
            queue.dequeue().await.expect("dequeue"),
            format!("job{i}").as_bytes()
        );
    }
    let consumers: Vec<_> = (0..3)
        .map(|_| {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..10 {
                    got.push(queue.dequeue().await.expect("dequeue"));
                }
                got
            })
        })
        .collect();
    for i in 0..30 {
        queue.enqueue(format!("item{i:02}")).await.expect("enqueue");
    }
    let mut taken = Vec::new();
    for consumer in consumers {
        let got = within("consumers", consumer).await.expect("task");
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(got, sorted, "one consumer sees items in queue order");
        taken.extend(got);
    }
    taken.sort();
    let expected: Vec<Vec<u8>> = (0..30)
        .map(|i| format!("item{i:02}").into_bytes())
        .collect();
    assert_eq!(taken, expected);
    assert!(queue.is_empty().await.expect("len"));

    // Double barrier: nobody passes `enter` before the third arrives.
    let barrier = DoubleBarrier::new(client.clone(), "barriers/stage", 3);
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(
            client
                .session(Duration::from_secs(10))
                .await
                .expect("session"),
        );
    }
    let sessions = std::sync::Arc::new(sessions);
    let early: Vec<_> = (0..2)
        .map(|i| {
            let (barrier, sessions) = (barrier.clone(), sessions.clone());
            tokio::spawn(async move { barrier.enter(&sessions[i]).await })
        })
        .collect();
    eventually("two arrivals", || async {
        let read = client
            .range(
                RangeRequest::new(KeySpan::prefix("barriers/stage/")),
                Default::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        let keys: Vec<_> = read.kvs.iter().map(|kv| kv.key.clone()).collect();
        assert!(
            !keys.contains(&b"barriers/stage/ready".to_vec()),
            "ready too early"
        );
        (keys.len() == 2)
            .then_some(())
            .ok_or(format!("{} arrivals", keys.len()))
    })
    .await;
    assert!(
        early.iter().all(|t| !t.is_finished()),
        "passed before all arrived"
    );
    within("last arrival", barrier.enter(&sessions[2]))
        .await
        .expect("enter");
    for task in early {
        within("early arrivals pass", task)
            .await
            .expect("task")
            .expect("enter");
    }
    let leaving = (0..3).map(|i| {
        let (barrier, sessions) = (barrier.clone(), sessions.clone());
        async move { barrier.leave(&sessions[i]).await }
    });
    for left in within("all leave", join_all(leaving)).await {
        left.expect("leave");
    }
    cluster.shutdown().await;
}
