//! `concord dev`: a second start on the same directory comes back on the same ports with all
//! its data, and the written `concordctl.toml` works.

use std::time::Duration;

use concord_client::{Client, ClientConfig};
use concord_node::dev::{self, DevOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dev_cluster_restarts_with_its_data() {
    let dir = tempfile::TempDir::new().unwrap();
    let opts = DevOptions {
        nodes: 3,
        ranges: 4,
        data_dir: dir.path().join("dev"),
        limits: Default::default(),
    };
    let cluster = dev::start(&opts).await.expect("first start");
    cluster
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("leaders");
    let addrs: Vec<_> = cluster.nodes.iter().map(|n| n.local_addr()).collect();
    let config = ClientConfig::from_file(&cluster.client_config).expect("client config written");
    let client = Client::connect(config.clone()).await.unwrap();
    for k in ["a", "m", "z", "/root"] {
        client.put(k, format!("value of {k}")).await.unwrap();
    }
    drop(client);
    cluster.shutdown().await;

    // Asking for another shape on restart changes nothing: the directory decides.
    let again = DevOptions {
        nodes: 5,
        ranges: 9,
        ..opts
    };
    let cluster = dev::start(&again).await.expect("second start");
    assert_eq!(
        cluster
            .nodes
            .iter()
            .map(|n| n.local_addr())
            .collect::<Vec<_>>(),
        addrs,
        "same ports"
    );
    cluster
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("leaders after restart");
    let client = Client::connect(config).await.unwrap();
    for k in ["a", "m", "z", "/root"] {
        let got = client.get(k).await.unwrap();
        assert_eq!(
            got.kvs[0].value,
            format!("value of {k}").into_bytes(),
            "key {k} survived the restart"
        );
    }
    assert_eq!(client.routes().ranges.len(), 4);
    cluster.shutdown().await;
}
