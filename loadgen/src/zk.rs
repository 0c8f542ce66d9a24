//! ZooKeeper as a target, through the `zookeeper-client` crate (one session per connection).
//!
//! The mapping (docs/benchmarks/mapping.md): a key is a znode under [`ROOT`], its name the key
//! with every byte outside `[A-Za-z0-9._-]` written `%XX` (so the namespace is flat and a key
//! maps to one znode); `put` is `set_data` (the znode is created on first use: the `put`
//! workload pre-creates them, unmeasured); `get` is `get_data`, after `sync` for a
//! linearizable read (ZooKeeper serves reads from the server a session is connected to, which
//! is comparable with concord's `serializable`); the compare-and-swap of `txn-cas` is
//! `set_data` with the expected version. A znode's version counts from 0 at creation, so the
//! "modification revision" reported is version + 1 and 0 still means "absent".

use std::fmt::Write as _;
use std::time::Duration;

use zookeeper_client as zk;

use crate::store::{OpError, Versioned};

/// Parent of every znode the load generator writes.
pub const ROOT: &str = "/concord-loadgen";

const PERSISTENT: zk::CreateOptions<'static> =
    zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());

/// One ZooKeeper session (its clones share it, and pipeline their requests on its connection).
#[derive(Clone)]
pub struct ZkStore {
    client: zk::Client,
    /// Longest wait for one request's answer (the crate has no per-request timeout).
    timeout: Duration,
}

/// The error's kind, `ZK_` and the variant (`ZK_CONNECTIONLOSS`, `ZK_BADVERSION`, ...).
fn zk_error(e: zk::Error) -> OpError {
    let text = format!("{e:?}");
    let variant = text.split(['(', ' ', '{']).next().unwrap_or("ERROR");
    format!("ZK_{}", variant.to_uppercase())
}

/// The znode of `key`.
pub fn path_of(key: &[u8]) -> String {
    let mut path = String::with_capacity(ROOT.len() + 1 + key.len() * 2);
    path.push_str(ROOT);
    path.push('/');
    for &b in key {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            path.push(b as char);
        } else {
            let _ = write!(path, "%{b:02X}");
        }
    }
    path
}

impl ZkStore {
    /// Opens `connections` sessions on the ensemble `endpoints` (HOST:PORT, loopback) with
    /// `session_timeout`, each request bounded by `timeout`, and makes sure [`ROOT`] exists.
    pub async fn connect(
        endpoints: &[String],
        connections: usize,
        session_timeout: Duration,
        timeout: Duration,
    ) -> anyhow::Result<Vec<ZkStore>> {
        let cluster = endpoints.join(",");
        let mut stores = Vec::with_capacity(connections);
        for _ in 0..connections {
            let client = zk::Client::connector()
                .with_session_timeout(session_timeout)
                .connect(&cluster)
                .await?;
            stores.push(ZkStore { client, timeout });
        }
        if let Some(first) = stores.first() {
            match first.client.create(ROOT, b"", &PERSISTENT).await {
                Ok(_) | Err(zk::Error::NodeExists) => {}
                Err(e) => anyhow::bail!("creating {ROOT}: {e}"),
            }
        }
        Ok(stores)
    }

    /// `set_data`, creating the znode if it does not exist yet.
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), OpError> {
        self.bounded(self.put_unbounded(key, value)).await
    }

    /// `get_data`; after `sync` of the znode when `linearizable`.
    pub async fn get(&self, key: &[u8], linearizable: bool) -> Result<Option<Versioned>, OpError> {
        self.bounded(self.get_unbounded(key, linearizable)).await
    }

    /// Sets `value` if the znode's version is still `expected` - 1 (`expected` 0: creates it
    /// if absent). Returns whether it did.
    pub async fn cas(&self, key: &[u8], expected: i64, value: &[u8]) -> Result<bool, OpError> {
        self.bounded(self.cas_unbounded(key, expected, value)).await
    }

    async fn bounded<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, OpError>>,
    ) -> Result<T, OpError> {
        tokio::time::timeout(self.timeout, op)
            .await
            .unwrap_or_else(|_| Err("ZK_REQUEST_TIMEOUT".into()))
    }

    async fn put_unbounded(&self, key: &[u8], value: &[u8]) -> Result<(), OpError> {
        let path = path_of(key);
        match self.client.set_data(&path, value, None).await {
            Ok(_) => Ok(()),
            Err(zk::Error::NoNode) => match self.client.create(&path, value, &PERSISTENT).await {
                Ok(_) => Ok(()),
                // Created meanwhile by another client: set it.
                Err(zk::Error::NodeExists) => self
                    .client
                    .set_data(&path, value, None)
                    .await
                    .map(drop)
                    .map_err(zk_error),
                Err(e) => Err(zk_error(e)),
            },
            Err(e) => Err(zk_error(e)),
        }
    }

    async fn get_unbounded(
        &self,
        key: &[u8],
        linearizable: bool,
    ) -> Result<Option<Versioned>, OpError> {
        let path = path_of(key);
        if linearizable {
            self.client.sync(&path).await.map_err(zk_error)?;
        }
        match self.client.get_data(&path).await {
            Ok((value, stat)) => Ok(Some(Versioned {
                value,
                mod_revision: i64::from(stat.version) + 1,
            })),
            Err(zk::Error::NoNode) => Ok(None),
            Err(e) => Err(zk_error(e)),
        }
    }

    async fn cas_unbounded(
        &self,
        key: &[u8],
        expected: i64,
        value: &[u8],
    ) -> Result<bool, OpError> {
        let path = path_of(key);
        if expected == 0 {
            return match self.client.create(&path, value, &PERSISTENT).await {
                Ok(_) => Ok(true),
                Err(zk::Error::NodeExists) => Ok(false),
                Err(e) => Err(zk_error(e)),
            };
        }
        let version = i32::try_from(expected - 1).map_err(|_| "ZK_VERSION_OUT_OF_RANGE")?;
        match self.client.set_data(&path, value, Some(version)).await {
            Ok(_) => Ok(true),
            Err(zk::Error::BadVersion | zk::Error::NoNode) => Ok(false),
            Err(e) => Err(zk_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_one_flat_znode_each() {
        assert_eq!(
            path_of(b"a/loadgen/000000000001"),
            "/concord-loadgen/a%2Floadgen%2F000000000001"
        );
        assert_eq!(path_of(b"k.v_1-2"), "/concord-loadgen/k.v_1-2");
        assert_eq!(path_of(b"%"), "/concord-loadgen/%25");
        assert_ne!(path_of(b"a/b"), path_of(b"a%2Fb"));
    }
}
