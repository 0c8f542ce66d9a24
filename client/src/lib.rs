//! concord-client: the async Rust client of concord.
//!
//! ```no_run
//! # async fn demo() -> Result<(), concord_client::Error> {
//! use concord_client::{Client, ClientConfig};
//! let client = Client::connect(ClientConfig::from_file("concord-dev/concordctl.toml".as_ref())?).await?;
//! client.put("hello", "world").await?;
//! let kv = client.get("hello").await?.kvs.pop();
//! # Ok(()) }
//! ```
//!
//! The client caches the route table (ranges, replicas, leader hints), sends each request to
//! the node that can serve it, follows `NotLeader` hints, refreshes routes on `StaleEpoch` /
//! `RangeNotFound`, waits out a range frozen by a merge (`Merging`, for at most
//! [`ClientConfig::merge_wait`]), and retries a bounded number of times. A write is retried
//! only when the error proves it was not applied (see docs/consistency.md); `Indeterminate`
//! is returned as is.

#![warn(missing_docs)]

mod client;
mod config;
mod error;
mod lease;
pub mod recipes;
pub mod txn_syntax;
mod watch;

pub use client::{Client, DeleteResult, RangeResult};
pub use concord_transport::api;
pub use concord_transport::watch as watch_api;
pub use config::{parse_duration, ClientConfig};
pub use error::Error;
pub use lease::{LeaseTtl, Session, SessionState};
pub use recipes::{
    Barrier, DoubleBarrier, Election, LeaderChange, Leadership, LockGuard, Member, MemberEvent,
    MemberWatcher, Membership, Observer, Queue,
};
pub use watch::{Events, WatchResponse, Watcher};
