//! `concord dev`: a local cluster of several nodes in one process, on 127.0.0.1.
//!
//! The directory holds `cluster.toml` (node ids, ports, range count: fixed at first start so
//! a second run comes back on the same ports with all its data), `certs/` (the cluster CA and
//! node certificates), `node-<id>/` (each node's RocksDB), and `concordctl.toml` for the CLI.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use concord_transport::api::{NodeId, RequestLimits};
use concord_transport::tls;
use serde::{Deserialize, Serialize};

use crate::node::{BoundNode, Node, NodeConfig, StartError};

/// Options of `concord dev`.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// Number of nodes (first start only).
    pub nodes: usize,
    /// Number of ranges (first start only).
    pub ranges: usize,
    /// The cluster's directory.
    pub data_dir: PathBuf,
    /// Request limits of every node.
    pub limits: RequestLimits,
}

#[derive(Debug, Serialize, Deserialize)]
struct ClusterFile {
    ranges: usize,
    nodes: BTreeMap<String, SocketAddr>,
}

/// What `concordctl` and the client library read: where the nodes are and which CA to trust.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientConfigFile {
    /// Node addresses.
    pub endpoints: Vec<String>,
    /// The cluster CA certificate.
    pub ca: PathBuf,
}

/// Writes a `concordctl.toml` for `endpoints` trusting the CA in `cert_dir`.
pub fn write_client_config(
    path: &Path,
    endpoints: &[SocketAddr],
    cert_dir: &Path,
) -> std::io::Result<()> {
    let ca = std::path::absolute(tls::ca_cert_path(cert_dir))?;
    let file = ClientConfigFile {
        endpoints: endpoints.iter().map(|a| a.to_string()).collect(),
        ca,
    };
    std::fs::write(path, toml::to_string(&file).expect("serializable"))
}

/// A running dev cluster.
pub struct DevCluster {
    /// The nodes, in id order.
    pub nodes: Vec<Node>,
    /// Path of the written `concordctl.toml`.
    pub client_config: PathBuf,
}

/// Starts (or restarts) the dev cluster in `opts.data_dir`.
pub async fn start(opts: &DevOptions) -> Result<DevCluster, StartError> {
    std::fs::create_dir_all(&opts.data_dir)?;
    let dir = std::path::absolute(&opts.data_dir)?;
    let cluster_path = dir.join("cluster.toml");
    let existing: Option<ClusterFile> = match std::fs::read_to_string(&cluster_path) {
        Ok(s) => Some(
            toml::from_str(&s)
                .map_err(|e| StartError::Config(format!("{}: {e}", cluster_path.display())))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    let cert_dir = dir.join("certs");
    let (ranges, wanted): (usize, Vec<(NodeId, SocketAddr)>) = match &existing {
        Some(c) => {
            let nodes = c
                .nodes
                .iter()
                .map(|(id, a)| {
                    id.parse()
                        .map(|id| (id, *a))
                        .map_err(|_| StartError::Config(format!("bad node id {id:?}")))
                })
                .collect::<Result<_, _>>()?;
            (c.ranges, nodes)
        }
        None => {
            if opts.nodes == 0 {
                return Err(StartError::Config("--nodes must be at least 1".into()));
            }
            let any: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
            (
                opts.ranges,
                (1..=opts.nodes as NodeId).map(|id| (id, any)).collect(),
            )
        }
    };
    let resuming = existing.is_some();
    let mut bound = Vec::new();
    for (id, addr) in &wanted {
        let mut config =
            NodeConfig::new(*id, *addr, dir.join(format!("node-{id}")), cert_dir.clone());
        config.ranges = ranges;
        config.limits = opts.limits;
        let node = BoundNode::bind(config).map_err(|e| match resuming {
            true => StartError::Config(format!("node {id} cannot bind its port {addr} again: {e}")),
            false => e,
        })?;
        bound.push((*id, node));
    }
    let members: BTreeMap<NodeId, SocketAddr> =
        bound.iter().map(|(id, b)| (*id, b.local_addr())).collect();
    if !resuming {
        let file = ClusterFile {
            ranges,
            nodes: members.iter().map(|(id, a)| (id.to_string(), *a)).collect(),
        };
        std::fs::write(&cluster_path, toml::to_string(&file).expect("serializable"))?;
    }
    let mut nodes = Vec::new();
    for (_, b) in bound {
        nodes.push(b.start(members.clone()).await?);
    }
    let client_config = dir.join("concordctl.toml");
    write_client_config(
        &client_config,
        &members.values().copied().collect::<Vec<_>>(),
        &cert_dir,
    )?;
    Ok(DevCluster {
        nodes,
        client_config,
    })
}

impl DevCluster {
    /// Waits until every node knows a leader of every range, at most `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        for n in &self.nodes {
            n.wait_for_leaders(timeout).await?;
        }
        Ok(())
    }

    /// Shuts every node down.
    pub async fn shutdown(self) {
        for n in self.nodes {
            n.shutdown().await;
        }
    }
}

/// Runs the dev cluster until `shutdown` completes (`concord dev`'s body).
pub async fn run(opts: DevOptions, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let cluster = start(&opts).await?;
    let addrs: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| n.local_addr().to_string())
        .collect();
    let ready = cluster.wait_ready(Duration::from_secs(30)).await;
    println!(
        "concord dev: {} nodes on {}",
        cluster.nodes.len(),
        addrs.join(", ")
    );
    if let Err(e) = ready {
        println!("warning: {e}");
    }
    println!("client config: {}", cluster.client_config.display());
    println!();
    println!(
        "  export CONCORD_CONFIG={}",
        cluster.client_config.display()
    );
    println!("  concordctl put hello world");
    println!("  concordctl get hello");
    println!("  concordctl status");
    println!();
    println!("Ctrl-C stops the cluster; run again with the same --data-dir to resume.");
    shutdown.await;
    println!("concord dev: shutting down");
    cluster.shutdown().await;
    Ok(())
}
