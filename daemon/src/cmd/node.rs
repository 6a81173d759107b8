//! One node's membership: `dbqsfs keygen`, `admit`, `leave`, and `node --join` (preparing a
//! joining node's directory).

use super::common::UsageError;
use anyhow::{anyhow, bail, Context, Result};
use dbqsfs_core::crypto::PublicKey;
use dbqsfs_core::ms::membership::AdmissionCert;
use dbqsfs_daemon::files::{self, ClusterInfo, NodeFile};
use dbqsfs_daemon::ms::MsMessage;
use std::path::Path;
use std::time::{Duration, Instant};

pub(crate) fn keygen(dir: &Path) -> Result<()> {
    let path = dir.join("node.key");
    if path.exists() {
        bail!(
            "{} exists; a node keeps its key (remove the directory to start over)",
            path.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = files::random_key().map_err(|e| anyhow!("OS randomness: {e}"))?;
    files::write_key(&path, &key)?;
    println!("{}", key.public().to_hex());
    eprintln!(
        "created {}; next: `dbqsfs admit --admission-key CLUSTER/admission.key {}` on the cluster's side",
        path.display(),
        key.public().to_hex()
    );
    Ok(())
}

pub(crate) fn admit(admission_key: &Path, cluster: Option<&Path>, node: &str) -> Result<()> {
    let admission = files::read_key(admission_key)?;
    let node = PublicKey::from_hex(node)
        .filter(|k| ed25519_dalek::VerifyingKey::from_bytes(&k.0).is_ok())
        .ok_or_else(|| {
            UsageError(format!(
                "NODE_PUBKEY {node:?} is not an ed25519 public key in hex (64 hex digits, as printed by `dbqsfs keygen`)"
            ))
        })?;
    let cluster = match cluster {
        Some(c) => c.to_path_buf(),
        None => admission_key
            .parent()
            .unwrap_or(Path::new("."))
            .join("cluster.toml"),
    };
    let info = ClusterInfo::load(&cluster)?;
    if info.file.admission_key != admission.public().to_hex() {
        bail!(
            "{} is not the admission key of the cluster in {}",
            admission_key.display(),
            cluster.display()
        );
    }
    let ticket = files::JoinTicket {
        cert: AdmissionCert::sign(&admission, &node),
        admission_key: admission.public(),
        genesis: info.genesis.clone(),
        clients: vec![info.client_key.public()],
    };
    println!("{}", ticket.encode());
    Ok(())
}

/// Writes node.toml for a node that joins through `via`, from the certificate `cert`.
pub(crate) fn prepare_join(
    dir: &Path,
    via: std::net::SocketAddr,
    cert: &str,
    listen: Option<std::net::SocketAddr>,
) -> Result<()> {
    let key_path = dir.join("node.key");
    if !key_path.exists() {
        bail!(
            "{} does not exist: create the node's key with `dbqsfs keygen --dir {}` and have it admitted first",
            key_path.display(),
            dir.display()
        );
    }
    let key = files::read_key(&key_path)?;
    let cert_path = Path::new(cert);
    let text = if cert_path.exists() {
        std::fs::read_to_string(cert_path)
            .with_context(|| format!("reading {}", cert_path.display()))?
    } else {
        cert.to_string()
    };
    let ticket = files::JoinTicket::decode(Path::new("--cert"), &text)?;
    if ticket.cert.node != key.public() || !ticket.cert.verify(&ticket.admission_key) {
        bail!(
            "the certificate does not admit this node's key {} (was it made for another key?)",
            key.public().to_hex()
        );
    }
    let toml = dir.join("node.toml");
    if toml.exists() {
        // Already prepared: keep the node's file (it may have left since; `leave` clears `join`).
        return Ok(());
    }
    let listen = listen.ok_or_else(|| {
        UsageError(
            "the first `node --join` needs --listen IP:PORT (where members reach this node)".into(),
        )
    })?;
    files::write_toml(
        &toml,
        &NodeFile {
            listen: listen.to_string(),
            genesis: files::encode_genesis(&ticket.genesis),
            clients: ticket.clients.iter().map(|c| c.to_hex()).collect(),
            admission_key: ticket.admission_key.to_hex(),
            admission_cert: hex::encode(ticket.cert.sig.0),
            join: true,
            bootstrap: Some(via.to_string()),
            settings: Default::default(),
        },
    )?;
    Ok(())
}

/// Asks the node running from `dir` to leave and waits until it is out of the configuration.
pub(crate) async fn leave(dir: &Path, timeout: Duration) -> Result<()> {
    let toml = dir.join("node.toml");
    let mut file: NodeFile = files::read_toml(&toml)?;
    let key = files::read_key(&dir.join("node.key"))?;
    let addr: std::net::SocketAddr = file.listen.parse().map_err(|_| {
        anyhow!(
            "{}: listen {:?} is not IP:port",
            toml.display(),
            file.listen
        )
    })?;
    // Do not join again after a restart.
    file.join = false;
    files::write_toml(&toml, &file)?;
    let endpoint = dbqsfs_net::Endpoint::client(
        dbqsfs_net::local_bind_for(addr),
        key.dalek().clone(),
        dbqsfs_net::TransportOptions::default(),
    )?;
    let vk = key.dalek().verifying_key();
    let deadline = Instant::now() + timeout;
    let mut announced = None;
    loop {
        let req = dbqsfs_core::wire::encode_msg(0, MsMessage::Leave);
        match endpoint.request(addr, &vk, &req).await {
            Ok(resp) => match dbqsfs_core::wire::decode::<MsMessage>(&resp).map(|e| e.msg) {
                Ok(MsMessage::Leaving {
                    epoch,
                    member: false,
                }) => {
                    println!("left: the configuration of epoch {epoch} does not include this node");
                    println!("the node keeps serving its old data to the new replicas; stop it when `dbqsfs status` shows their transfers complete");
                    return Ok(());
                }
                Ok(MsMessage::Leaving {
                    epoch,
                    member: true,
                }) => {
                    if announced != Some(epoch) {
                        eprintln!(
                            "epoch {epoch}: leave submitted, waiting for the end of the epoch"
                        );
                        announced = Some(epoch);
                    }
                }
                Ok(other) => bail!("the node refused: {other:?}"),
                Err(e) => bail!("the node's answer is undecodable: {e}"),
            },
            Err(e) => bail!(
                "cannot reach the node at {addr}: {e} (is `dbqsfs node --dir {}` running?)",
                dir.display()
            ),
        }
        if Instant::now() >= deadline {
            bail!("the node is still a member after {}s; is the Membership Service running (see `dbqsfs status`)?", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
