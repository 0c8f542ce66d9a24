//! A distributed FIFO queue, as in the ZooKeeper recipe: items are keys under `name/`,
//! ordered by create revision; a consumer takes the oldest with a compare-and-delete, so each
//! item goes to exactly one consumer.

use std::sync::atomic::{AtomicU64, Ordering};

use concord_transport::api::{
    Compare, CompareOp, CompareTarget, DeleteRequest, KeySpan, TxnOp, TxnRequest,
};
use concord_transport::watch::WatchRequest;

use super::{check_one_range, contenders, prefix_of};
use crate::{Client, Error};

/// The queue `name`.
#[derive(Clone)]
pub struct Queue {
    client: Client,
    prefix: Vec<u8>,
}

impl Queue {
    /// The queue `name` (its items live under `name/`, in one range).
    pub fn new(client: Client, name: &str) -> Self {
        Self {
            client,
            prefix: prefix_of(name),
        }
    }

    /// Appends `value`.
    pub async fn enqueue(&self, value: impl Into<Vec<u8>>) -> Result<(), Error> {
        check_one_range(&self.client, &self.prefix).await?;
        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        let mut key = self.prefix.clone();
        let unique = (
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
            SEQUENCE.fetch_add(1, Ordering::Relaxed),
        );
        key.extend(format!("{:08x}{:032x}{:08x}", unique.0, unique.1, unique.2).into_bytes());
        self.client.put(key, value).await.map(|_| ())
    }

    /// Takes the oldest item, waiting for one if the queue is empty.
    pub async fn dequeue(&self) -> Result<Vec<u8>, Error> {
        check_one_range(&self.client, &self.prefix).await?;
        loop {
            let (items, revision) = contenders(&self.client, &self.prefix).await?;
            let Some(oldest) = items.into_iter().next() else {
                let mut request = WatchRequest::new(KeySpan::prefix(self.prefix.clone()));
                request.start_revision = revision + 1;
                request.no_delete = true;
                let mut watcher = self.client.watch(request).await?;
                match watcher.next().await {
                    Some(response) => response?,
                    None => return Err(Error::Protocol("watch ended".into())),
                };
                continue;
            };
            let take = TxnRequest {
                compares: vec![Compare {
                    key: oldest.key.clone(),
                    op: CompareOp::Equal,
                    target: CompareTarget::ModRevision(oldest.mod_revision),
                }],
                success: vec![TxnOp::Delete(DeleteRequest {
                    span: KeySpan::key(oldest.key.clone()),
                    prev_kv: false,
                })],
                failure: vec![],
                fence: None,
            };
            if self.client.txn(take).await?.succeeded {
                return Ok(oldest.value);
            }
            // Another consumer took it first: try the next oldest.
        }
    }

    /// Items waiting.
    pub async fn len(&self) -> Result<usize, Error> {
        Ok(contenders(&self.client, &self.prefix).await?.0.len())
    }

    /// Whether no item is waiting.
    pub async fn is_empty(&self) -> Result<bool, Error> {
        Ok(self.len().await? == 0)
    }
}
