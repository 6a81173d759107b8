//! A client whose key the cluster does not list is told so at once ("not authorized"), instead of
//! waiting out its operation timeout for a quorum that will never answer.

mod common;

use common::Cluster;
use dbqsfs_core::crypto::{Keypair, ObjectId};
use dbqsfs_core::dbqs::client::OpError;
use dbqsfs_daemon::client::{ClientError, DbqsClient, DbqsClientOptions};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlisted_client_key_is_refused_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (cluster, listed) = Cluster::up(tmp.path(), 4, &[]).await;
    listed
        .put_content(b"for a listed client".to_vec())
        .await
        .unwrap();

    let info = dbqsfs_daemon::files::ClusterInfo::load(&cluster.dir.join("cluster.toml")).unwrap();
    let stranger = Keypair::from_seed([77; 32]);
    let client = DbqsClient::connect(info.genesis, stranger, DbqsClientOptions::default()).unwrap();
    let start = Instant::now();
    let got = client.get_content(ObjectId([1; 32])).await;
    assert!(
        matches!(got, Err(ClientError::Op(OpError::NotAuthorized))),
        "{got:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "refused after {:?}",
        start.elapsed()
    );
    let put = client.put_content(b"from a stranger".to_vec()).await;
    assert!(
        matches!(put, Err(ClientError::Op(OpError::NotAuthorized))),
        "{put:?}"
    );
    let err = put.unwrap_err().to_string();
    assert!(err.contains("not authorized"), "{err}");
}
