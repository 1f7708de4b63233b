//! Raft tests: restart from disk, and a 3-node cluster over loopback gRPC that survives the
//! loss of its leader.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{ControlPlane, PeerTls, WriteError};
use crate::state::{ApiKey, ApplyOk, Command, Role};
use crate::tls::ClusterCa;

const TIMEOUT: Duration = Duration::from_secs(20);

/// Polls `cond` until it holds or `timeout` passes.
async fn wait_for<F, Fut>(mut cond: F, timeout: Duration) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn key(id: &str) -> ApiKey {
    ApiKey {
        id: id.into(),
        name: id.into(),
        hash: format!("hash-{id}"),
        role: Role::Admin,
        project: String::new(),
        created_at: "2026-11-29T12:00:00Z".into(),
        expires_at: None,
    }
}

fn bootstrap_cmd() -> Command {
    Command::Bootstrap {
        name: "test".into(),
        ca_cert_pem: "cert".into(),
        ca_key_pem: "key".into(),
        admin_key: key("admin"),
        now: "2026-11-29T12:00:00Z".into(),
    }
}

/// Opens a store, retrying while a previous instance still holds the sled lock.
async fn open_retry(dir: &Path, id: u64, addr: &str, bootstrap: bool) -> ControlPlane {
    open_tls(dir, id, addr, bootstrap, None).await
}

async fn open_tls(
    dir: &Path,
    id: u64,
    addr: &str,
    bootstrap: bool,
    tls: Option<PeerTls>,
) -> ControlPlane {
    let mut last_err = None;
    for _ in 0..100 {
        match ControlPlane::open(dir, id, addr.to_string(), bootstrap, tls.clone()).await {
            Ok(cp) => return cp,
            Err(e) => last_err = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot open control plane: {last_err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_restart_keeps_state() {
    let dir = tempfile::tempdir().unwrap();
    let addr = "127.0.0.1:1"; // never dialled: a single voter has no peers
    let cp = open_retry(dir.path(), 1, addr, true).await;
    assert!(
        wait_for(|| async { cp.is_leader() }, TIMEOUT).await,
        "no leader"
    );
    let mut applied = cp.subscribe();

    assert_eq!(cp.write(bootstrap_cmd()).await.unwrap(), ApplyOk::Done);
    cp.write(Command::AddApiKey { key: key("k1") })
        .await
        .unwrap();
    // A rejected command reports apply's error.
    match cp.write(Command::AddApiKey { key: key("k1") }).await {
        Err(WriteError::Rejected(e)) => assert!(e.message.contains("already exists"), "{e}"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(applied.has_changed().unwrap());
    let seen = *applied.borrow_and_update();
    assert!(seen >= 3, "applied index {seen}");

    // A snapshot, then more writes after it, so the restart loads both.
    cp.raft().trigger().snapshot().await.unwrap();
    let raft = cp.raft().clone();
    assert!(
        wait_for(
            || {
                let raft = raft.clone();
                async move { raft.metrics().borrow().snapshot.is_some() }
            },
            TIMEOUT
        )
        .await,
        "no snapshot"
    );
    drop(raft);
    cp.write(Command::AddApiKey { key: key("k2") })
        .await
        .unwrap();
    let before = cp.read(|s| s.clone()).await.unwrap();
    cp.shutdown().await;
    drop(cp);

    let cp = open_retry(dir.path(), 1, addr, true).await;
    // The state is there as soon as the store is open, before any election.
    assert_eq!(cp.read_local(|s| s.clone()), before);
    assert!(
        wait_for(|| async { cp.is_leader() }, TIMEOUT).await,
        "no leader after restart"
    );
    assert_eq!(cp.read(|s| s.clone()).await.unwrap(), before);
    cp.write(Command::AddApiKey { key: key("k3") })
        .await
        .unwrap();
    let keys = cp
        .read(|s| s.api_keys.keys().cloned().collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(keys, ["admin", "k1", "k2", "k3"]);
    // Bootstrap is not repeated on a non-empty log.
    assert!(matches!(
        cp.write(bootstrap_cmd()).await,
        Err(WriteError::Rejected(_))
    ));
    cp.shutdown().await;
}

struct TestNode {
    cp: ControlPlane,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
    /// Where the peer service finds the API state for heartbeats (empty unless a test fills it).
    heartbeats: crate::peer::HeartbeatSlot,
}

impl TestNode {
    async fn stop(&mut self) {
        self.cp.shutdown().await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.server).await;
    }
}

async fn start_node(dir: &Path, id: u64, listener: TcpListener, bootstrap: bool) -> TestNode {
    start_node_tls(dir, id, listener, bootstrap, None).await
}

async fn start_node_tls(
    dir: &Path,
    id: u64,
    listener: TcpListener,
    bootstrap: bool,
    tls: Option<PeerTls>,
) -> TestNode {
    let addr = listener.local_addr().unwrap().to_string();
    let cp = open_tls(dir, id, &addr, bootstrap, tls).await;
    let (stop, stopped) = oneshot::channel::<()>();
    let server_cp = cp.clone();
    let heartbeats = crate::peer::HeartbeatSlot::default();
    let slot = heartbeats.clone();
    let server = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        if let Err(e) = server_cp.serve(listener, slot, shutdown).await {
            panic!("peer server failed: {e}");
        }
    });
    TestNode {
        cp,
        stop: Some(stop),
        server,
        heartbeats,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_and_survive_leader_loss() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let mut nodes = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        nodes.push(start_node(dirs[i].path(), i as u64 + 1, listener, i == 0).await);
    }

    // Node 1 bootstraps alone, then takes in 2 and 3.
    let n1 = nodes[0].cp.clone();
    assert!(
        wait_for(|| async { n1.is_leader() }, TIMEOUT).await,
        "node 1 never led"
    );
    n1.add_member(2, addrs[1].clone()).await.unwrap();
    n1.add_member(3, addrs[2].clone()).await.unwrap();
    let voters: Vec<u64> = n1
        .raft()
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    assert_eq!(voters, [1, 2, 3]);
    let members: Vec<(u64, String)> = n1
        .members()
        .into_iter()
        .map(|(id, p)| (id, p.addr))
        .collect();
    assert_eq!(
        members,
        [
            (1, addrs[0].clone()),
            (2, addrs[1].clone()),
            (3, addrs[2].clone())
        ]
    );

    // A write on the leader reaches every node.
    n1.write(bootstrap_cmd()).await.unwrap();
    for node in &nodes {
        let cp = node.cp.clone();
        assert!(
            wait_for(
                || async { cp.read_local(|s| s.cluster.bootstrapped) },
                TIMEOUT
            )
            .await,
            "node {} did not apply the write",
            cp.id()
        );
    }
    // A follower forwards writes to the leader and serves linearizable reads.
    nodes[1]
        .cp
        .write(Command::AddApiKey { key: key("x") })
        .await
        .unwrap();
    assert!(
        nodes[2]
            .cp
            .read(|s| s.api_keys.contains_key("x"))
            .await
            .unwrap(),
        "a linearizable read on a follower missed an acknowledged write"
    );

    // The leader goes away; one of the others takes over and writes still commit.
    nodes[0].stop().await;
    let (n2, n3) = (nodes[1].cp.clone(), nodes[2].cp.clone());
    assert!(
        wait_for(|| async { n2.is_leader() || n3.is_leader() }, TIMEOUT).await,
        "no new leader after the leader stopped"
    );
    let (leader, follower) = if n2.is_leader() { (n2, n3) } else { (n3, n2) };
    leader
        .write(Command::AddApiKey { key: key("after") })
        .await
        .unwrap();
    let seen = leader
        .read(|s| s.api_keys.contains_key("after"))
        .await
        .unwrap();
    assert!(seen);
    assert!(
        wait_for(
            || async { follower.read_local(|s| s.api_keys.contains_key("after")) },
            TIMEOUT
        )
        .await,
        "the remaining follower did not apply the write"
    );
    // The dead node can be removed; the two survivors remain a working cluster.
    leader.remove_member(1).await.unwrap();
    assert_eq!(leader.members().keys().copied().collect::<Vec<_>>(), [2, 3]);
    leader
        .write(Command::AddApiKey {
            key: key("after-removal"),
        })
        .await
        .unwrap();
    for node in nodes.iter_mut().skip(1) {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_over_mutual_tls() {
    let ca = ClusterCa::generate("test").unwrap();
    let other_ca = ClusterCa::generate("other").unwrap();
    let names = vec![
        berth_proto::CONTROLLER_TLS_NAME.to_string(),
        "127.0.0.1".to_string(),
    ];
    let peer_tls = |ca: &ClusterCa, cn: &str| {
        let cert = ca.issue(cn, &names).unwrap();
        PeerTls::from_pem(&ca.cert_pem, &cert.cert_pem, &cert.key_pem)
    };
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let mut listeners = listeners.into_iter();
    let mut n1 = start_node_tls(
        dirs[0].path(),
        1,
        listeners.next().unwrap(),
        true,
        Some(peer_tls(&ca, "c1")),
    )
    .await;
    let mut n2 = start_node_tls(
        dirs[1].path(),
        2,
        listeners.next().unwrap(),
        false,
        Some(peer_tls(&ca, "c2")),
    )
    .await;
    // A node whose certificate comes from another CA.
    let mut stranger = start_node_tls(
        dirs[2].path(),
        3,
        listeners.next().unwrap(),
        false,
        Some(peer_tls(&other_ca, "c3")),
    )
    .await;

    let cp1 = n1.cp.clone();
    assert!(
        wait_for(|| async { cp1.is_leader() }, TIMEOUT).await,
        "node 1 never led"
    );
    cp1.add_member(2, addrs[1].clone()).await.unwrap();
    cp1.write(bootstrap_cmd()).await.unwrap();
    let cp2 = n2.cp.clone();
    assert!(
        wait_for(
            || async { cp2.read_local(|s| s.cluster.bootstrapped) },
            TIMEOUT
        )
        .await,
        "node 2 did not apply the write over tls"
    );

    // The stranger is rejected by TLS: as a learner it never receives the log.
    cp1.raft()
        .add_learner(
            3,
            super::RaftPeer {
                addr: addrs[2].clone(),
            },
            false,
        )
        .await
        .unwrap();
    let sc = stranger.cp.clone();
    let reached = wait_for(
        || async { sc.read_local(|s| s.cluster.bootstrapped) },
        Duration::from_secs(3),
    )
    .await;
    assert!(
        !reached,
        "a peer with a foreign certificate received the log"
    );
    let matched = cp1
        .raft()
        .metrics()
        .borrow()
        .replication
        .as_ref()
        .and_then(|r| r.get(&3).cloned())
        .flatten();
    assert_eq!(
        matched, None,
        "replication to the stranger matched {matched:?}"
    );

    stranger.stop().await;
    n2.stop().await;
    n1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_leader_is_replaced_and_rejoins() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let mut nodes = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        nodes.push(start_node(dirs[i].path(), i as u64 + 1, listener, i == 0).await);
    }
    let cps: Vec<ControlPlane> = nodes.iter().map(|n| n.cp.clone()).collect();
    let (n1, n2, n3) = (cps[0].clone(), cps[1].clone(), cps[2].clone());
    assert!(
        wait_for(|| async { n1.is_leader() }, TIMEOUT).await,
        "node 1 never led"
    );
    n1.add_member(2, addrs[1].clone()).await.unwrap();
    n1.add_member(3, addrs[2].clone()).await.unwrap();
    n1.write(bootstrap_cmd()).await.unwrap();

    // Cut node 1 off in both directions.
    n1.faults().block(2);
    n1.faults().block(3);
    n2.faults().block(1);
    n3.faults().block(1);
    assert!(
        wait_for(|| async { n2.is_leader() || n3.is_leader() }, TIMEOUT).await,
        "the majority side elected no leader"
    );
    let new_leader = if n2.is_leader() {
        n2.clone()
    } else {
        n3.clone()
    };
    new_leader
        .write(Command::AddApiKey {
            key: key("majority"),
        })
        .await
        .unwrap();

    // The old leader can neither commit nor serve linearizable reads.
    let stale_write = tokio::time::timeout(
        Duration::from_secs(2),
        n1.write(Command::AddApiKey {
            key: key("minority"),
        }),
    )
    .await;
    assert!(
        !matches!(stale_write, Ok(Ok(_))),
        "an isolated leader committed a write: {stale_write:?}"
    );
    let stale_read = tokio::time::timeout(Duration::from_secs(2), n1.read(|_| ())).await;
    assert!(
        !matches!(stale_read, Ok(Ok(()))),
        "an isolated leader served a linearizable read"
    );

    // Heal: node 1 steps down, drops its uncommitted entry and catches up.
    for cp in &cps {
        cp.faults().heal();
    }
    assert!(
        wait_for(
            || async { !n1.is_leader() && n1.read_local(|s| s.api_keys.contains_key("majority")) },
            TIMEOUT
        )
        .await,
        "node 1 did not rejoin"
    );
    assert!(
        wait_for(|| async { cps.iter().any(|cp| cp.is_leader()) }, TIMEOUT).await,
        "no leader after healing"
    );
    let leader = cps.iter().find(|cp| cp.is_leader()).unwrap().clone();
    leader
        .write(Command::AddApiKey { key: key("healed") })
        .await
        .unwrap();
    let expected = leader.read(|s| s.clone()).await.unwrap();
    assert!(!expected.api_keys.contains_key("minority"));
    for cp in &cps {
        let cp = cp.clone();
        let want = expected.clone();
        assert!(
            wait_for(|| async { cp.read_local(|s| *s == want) }, TIMEOUT).await,
            "node {} diverged",
            cp.id()
        );
    }
    for node in nodes.iter_mut() {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_member_catches_up_from_a_snapshot() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let l1 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let l2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr2 = l2.local_addr().unwrap().to_string();
    let mut n1 = start_node(dirs[0].path(), 1, l1, true).await;
    let cp1 = n1.cp.clone();
    assert!(
        wait_for(|| async { cp1.is_leader() }, TIMEOUT).await,
        "node 1 never led"
    );
    cp1.write(bootstrap_cmd()).await.unwrap();
    // Enough data that the snapshot spans several 1 MiB chunks on the wire.
    let big = "x".repeat(64 * 1024);
    for i in 0..40 {
        let mut k = key(&format!("k{i}"));
        k.name = format!("k{i}{big}");
        cp1.write(Command::AddApiKey { key: k }).await.unwrap();
    }
    cp1.raft().trigger().snapshot().await.unwrap();
    let raft = cp1.raft().clone();
    assert!(
        wait_for(
            || {
                let raft = raft.clone();
                async move { raft.metrics().borrow().snapshot.is_some() }
            },
            TIMEOUT
        )
        .await,
        "no snapshot"
    );
    let snap_index = raft.metrics().borrow().snapshot.map(|s| s.index).unwrap();
    raft.trigger().purge_log(snap_index).await.unwrap();
    assert!(
        wait_for(
            || {
                let raft = raft.clone();
                async move { raft.metrics().borrow().purged.map(|p| p.index) == Some(snap_index) }
            },
            TIMEOUT
        )
        .await,
        "log not purged"
    );

    // Node 2 can only catch up through install_snapshot over gRPC.
    let mut n2 = start_node(dirs[1].path(), 2, l2, false).await;
    cp1.add_member(2, addr2).await.unwrap();
    cp1.write(Command::AddApiKey { key: key("after") })
        .await
        .unwrap();
    let want = cp1.read(|s| s.clone()).await.unwrap();
    let cp2 = n2.cp.clone();
    assert!(
        wait_for(|| async { cp2.read_local(|s| *s == want) }, TIMEOUT).await,
        "node 2 did not catch up"
    );
    let installed = cp2.raft().metrics().borrow().snapshot;
    assert!(installed.is_some(), "node 2 caught up without a snapshot");
    n2.stop().await;
    n1.stop().await;
}

// ---- The replicated control plane: mutual TLS, forwarding, read index, failing fast ----

use std::collections::BTreeSet;
use std::time::Instant;

use berth_proto::v1::controller_client::ControllerClient;
use berth_proto::v1::raft_client::RaftClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use super::ReadError;
use crate::state::ControllerRecord;

/// A cluster of `n` controllers over mutual TLS; node 1 bootstraps and leads.
struct TlsCluster {
    ca: ClusterCa,
    nodes: Vec<TestNode>,
    addrs: Vec<String>,
    _dirs: Vec<tempfile::TempDir>,
}

impl TlsCluster {
    async fn start(n: usize, voters: usize) -> TlsCluster {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = ClusterCa::generate("test").unwrap();
        let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut listeners = Vec::new();
        for _ in 0..n {
            listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let addrs: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        let mut nodes = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let cert = ca
                .issue(
                    &format!("c{}", i + 1),
                    &[
                        berth_proto::CONTROLLER_TLS_NAME.to_string(),
                        "127.0.0.1".to_string(),
                    ],
                )
                .unwrap();
            let tls = PeerTls::from_pem(&ca.cert_pem, &cert.cert_pem, &cert.key_pem);
            nodes.push(
                start_node_tls(dirs[i].path(), i as u64 + 1, listener, i == 0, Some(tls)).await,
            );
        }
        let n1 = nodes[0].cp.clone();
        assert!(
            wait_for(|| async { n1.is_leader() }, TIMEOUT).await,
            "node 1 never led"
        );
        for (i, addr) in addrs.iter().enumerate().take(voters).skip(1) {
            n1.add_member(i as u64 + 1, addr.clone()).await.unwrap();
        }
        n1.write(bootstrap_cmd()).await.unwrap();
        TlsCluster {
            ca,
            nodes,
            addrs,
            _dirs: dirs,
        }
    }

    fn cp(&self, i: usize) -> ControlPlane {
        self.nodes[i].cp.clone()
    }

    /// Cuts node `i` off from every other node, both ways.
    fn isolate(&self, i: usize) {
        for (j, node) in self.nodes.iter().enumerate() {
            if j != i {
                node.cp.faults().block(i as u64 + 1);
                self.nodes[i].cp.faults().block(j as u64 + 1);
            }
        }
    }

    fn heal(&self) {
        for node in &self.nodes {
            node.cp.faults().heal();
        }
    }

    /// A client certificate from the cluster CA with these names.
    fn client_tls(&self, names: &[&str]) -> ClientTlsConfig {
        self.client_cert(names).0
    }

    /// A client certificate from the cluster CA with these names, and its fingerprint.
    fn client_cert(&self, names: &[&str]) -> (ClientTlsConfig, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = self.ca.issue("client", &names).unwrap();
        let fingerprint = crate::tls::cert_fingerprint(&cert.cert_pem).unwrap();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca.cert_pem))
            .identity(Identity::from_pem(&cert.cert_pem, &cert.key_pem))
            .domain_name(berth_proto::CONTROLLER_TLS_NAME);
        (tls, fingerprint)
    }

    /// A lazy channel to node `i` with this client certificate.
    fn channel(&self, i: usize, tls: ClientTlsConfig) -> tonic::transport::Channel {
        Endpoint::from_shared(format!("https://{}", self.addrs[i]))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_lazy()
    }

    async fn stop(mut self) {
        for node in self.nodes.iter_mut() {
            node.stop().await;
        }
    }
}

fn record(name: &str, id: u64, addr: &str) -> Command {
    Command::RegisterController {
        record: ControllerRecord {
            name: name.into(),
            id,
            peer_address: addr.into(),
            api_address: format!("{name}:8443"),
            joined_at: "2026-11-29T12:00:00Z".into(),
            cert_fingerprint: String::new(),
        },
    }
}

/// A controller joining as the API does it: a token, then the join that consumes it.
async fn join_record(cp: &ControlPlane, name: &str, addr: &str) {
    let hash = format!("token-{name}");
    cp.write(Command::AddJoinToken {
        hash: hash.clone(),
        record: crate::state::JoinTokenRecord {
            node_name: name.into(),
            kind: crate::state::JoinKind::Controller,
            created_at: crate::clock::now(),
            expires_at: crate::clock::after(Duration::from_secs(3600)),
        },
    })
    .await
    .unwrap();
    cp.write(Command::JoinController {
        token_hash: hash,
        name: name.into(),
        peer_address: addr.into(),
        api_address: format!("{name}:8443"),
        cert_fingerprint: String::new(),
        now: crate::clock::now(),
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_writes_are_forwarded_and_reads_are_linearizable() {
    let c = TlsCluster::start(3, 3).await;
    let (leader, f1, f2) = (c.cp(0), c.cp(1), c.cp(2));
    assert!(leader.is_leader());
    for i in 0..20 {
        let writer = if i % 2 == 0 { &f1 } else { &f2 };
        let reader = if i % 2 == 0 { &f2 } else { &f1 };
        let name = format!("fw{i}");
        writer
            .write(Command::AddApiKey { key: key(&name) })
            .await
            .unwrap();
        // Acknowledged on one follower, so a linearizable read on the other sees it.
        assert!(
            reader
                .read(|s| s.api_keys.contains_key(&name))
                .await
                .unwrap(),
            "read on node {} missed {name}",
            reader.id()
        );
    }
    // A rejection on the leader comes back to the follower as such.
    match f1.write(Command::AddApiKey { key: key("fw0") }).await {
        Err(WriteError::Rejected(e)) => assert!(e.message.contains("already exists"), "{e}"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    let want = leader.read(|s| s.clone()).await.unwrap();
    for i in 0..3 {
        let cp = c.cp(i);
        let want = want.clone();
        assert!(
            wait_for(|| async { cp.read_local(|s| *s == want) }, TIMEOUT).await,
            "node {} diverged",
            i + 1
        );
    }
    c.stop().await;
}

/// Asserts that a write and a read on `cp` fail as unavailable within `limit`; the write
/// must be known not to be proposed unless `unsure` (an isolated leader proposes it before
/// it notices that it lost its quorum).
async fn assert_fails_fast(cp: &ControlPlane, limit: Duration, unsure: bool) {
    let started = Instant::now();
    let w = cp.write(Command::AddApiKey { key: key("lost") }).await;
    let took = started.elapsed();
    assert!(
        matches!(w, Err(WriteError::Unavailable(_)))
            || (unsure && matches!(w, Err(WriteError::Unsure(_)))),
        "write on an isolated node: {w:?}"
    );
    assert!(took <= limit, "the write took {took:?} to fail");
    let started = Instant::now();
    let r = cp.read(|_| ()).await;
    let took = started.elapsed();
    assert!(
        matches!(r, Err(ReadError::Unavailable(_))),
        "read on an isolated node: {r:?}"
    );
    assert!(took <= limit, "the read took {took:?} to fail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_minority_fails_fast_and_majority_serves() {
    let c = TlsCluster::start(3, 3).await;
    let limit = Duration::from_millis(3500);

    // An isolated follower.
    c.isolate(2);
    assert_fails_fast(&c.cp(2), limit, false).await;
    c.cp(1)
        .write(Command::AddApiKey { key: key("maj1") })
        .await
        .unwrap();
    c.heal();
    let n3 = c.cp(2);
    assert!(
        wait_for(
            || async {
                n3.read(|s| s.api_keys.contains_key("maj1"))
                    .await
                    .unwrap_or(false)
            },
            TIMEOUT
        )
        .await,
        "the healed follower does not serve reads"
    );

    // An isolated leader: it loses its quorum and says so; the others elect and serve. (The
    // healed follower may have forced an election: find the leader first.)
    let cps: Vec<ControlPlane> = (0..3).map(|i| c.cp(i)).collect();
    assert!(
        wait_for(|| async { cps.iter().any(|cp| cp.is_leader()) }, TIMEOUT).await,
        "no leader after healing"
    );
    let li = cps.iter().position(|cp| cp.is_leader()).unwrap();
    let old = c.cp(li);
    c.isolate(li);
    assert_fails_fast(&old, limit, true).await;
    // Once it knows, it refuses before proposing anything.
    let w = old.write(Command::AddApiKey { key: key("lost3") }).await;
    assert!(matches!(w, Err(WriteError::Unavailable(_))), "{w:?}");
    let others: Vec<ControlPlane> = (0..3).filter(|i| *i != li).map(|i| c.cp(i)).collect();
    let (n2, n3) = (others[0].clone(), others[1].clone());
    assert!(
        wait_for(|| async { n2.is_leader() || n3.is_leader() }, TIMEOUT).await,
        "the majority elected no leader"
    );
    let started = Instant::now();
    n3.write(Command::AddApiKey { key: key("maj2") })
        .await
        .unwrap();
    assert!(n2.read(|s| s.api_keys.contains_key("maj2")).await.unwrap());
    tracing::info!(took = ?started.elapsed(), "majority write");
    match old.write(Command::AddApiKey { key: key("lost2") }).await {
        Err(WriteError::Unavailable(u)) => {
            assert!(!u.to_string().is_empty());
        }
        other => panic!("isolated old leader: {other:?}"),
    }

    // Slow links still work.
    c.heal();
    for node in &c.nodes {
        node.cp.faults().set_delay(Duration::from_millis(50));
    }
    let any = c.cp(0);
    assert!(
        wait_for(
            || async {
                any.write(Command::AddApiKey { key: key("slow") })
                    .await
                    .is_ok()
            },
            TIMEOUT
        )
        .await,
        "no write through slow links"
    );
    assert!(
        !c.cp(0)
            .read(|s| s.api_keys.contains_key("lost") || s.api_keys.contains_key("lost2"))
            .await
            .unwrap()
    );
    c.heal();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_port_checks_certificate_roles() {
    let c = TlsCluster::start(1, 1).await;
    let addr = format!("https://{}", c.addrs[0]);
    let channel = |tls: ClientTlsConfig| {
        Endpoint::from_shared(addr.clone())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_lazy()
    };
    let vote = || {
        tonic::Request::new(berth_proto::v1::RaftRequest {
            data: b"{}".to_vec().into(),
        })
    };

    // An agent certificate from the cluster CA: no Raft, no Forward, no ReadIndex.
    let agent = channel(c.client_tls(&["n1.agent.berth", "127.0.0.1"]));
    let e = RaftClient::new(agent.clone())
        .vote(vote())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = ControllerClient::new(agent.clone())
        .forward(berth_proto::v1::ForwardRequest {
            command: b"{}".to_vec().into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = ControllerClient::new(agent.clone())
        .read_index(berth_proto::v1::ReadIndexRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // It passes the role check for heartbeats (this test server takes none).
    let e = ControllerClient::new(agent)
        .heartbeat(berth_proto::v1::HeartbeatRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");

    // A controller certificate may not heartbeat, but may ask for a read index.
    let ctl = channel(c.client_tls(&[berth_proto::CONTROLLER_TLS_NAME]));
    let e = ControllerClient::new(ctl.clone())
        .heartbeat(berth_proto::v1::HeartbeatRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let index = ControllerClient::new(ctl)
        .read_index(berth_proto::v1::ReadIndexRequest {})
        .await
        .unwrap()
        .into_inner()
        .index;
    assert!(index >= 2, "read index {index}");

    // A certificate naming no role, and one from another CA, get nothing.
    let nobody = channel(c.client_tls(&["example.com"]));
    let e = RaftClient::new(nobody).vote(vote()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let other = ClusterCa::generate("other").unwrap();
    let cert = other
        .issue("x", &[berth_proto::CONTROLLER_TLS_NAME.to_string()])
        .unwrap();
    let foreign = channel(
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&c.ca.cert_pem))
            .identity(Identity::from_pem(&cert.cert_pem, &cert.key_pem))
            .domain_name(berth_proto::CONTROLLER_TLS_NAME),
    );
    let e = RaftClient::new(foreign).vote(vote()).await.unwrap_err();
    assert!(
        matches!(
            e.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ),
        "{e:?}"
    );
    // No client certificate at all.
    let anonymous = channel(
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&c.ca.cert_pem))
            .domain_name(berth_proto::CONTROLLER_TLS_NAME),
    );
    let e = ControllerClient::new(anonymous)
        .read_index(berth_proto::v1::ReadIndexRequest {})
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ),
        "{e:?}"
    );
    c.stop().await;
}

#[test]
fn removal_keeps_a_reachable_majority() {
    use super::control::removal_check;
    let voters = |ids: &[u64]| ids.iter().copied().collect::<BTreeSet<u64>>();
    // The last voter.
    let e = removal_check("c1", 1, &voters(&[1]), |_| true).unwrap_err();
    assert!(e.contains("last voter"), "{e}");
    // Three voters, one down: removing a healthy one leaves 1 of 2 reachable.
    let e = removal_check("c2", 2, &voters(&[1, 2, 3]), |v| v != 3).unwrap_err();
    assert!(e.contains("majority"), "{e}");
    // Removing the one that is down is fine.
    assert!(removal_check("c3", 3, &voters(&[1, 2, 3]), |v| v != 3).is_ok());
    // Five voters, one down: removing a healthy one leaves 3 of 4.
    assert!(removal_check("c2", 2, &voters(&[1, 2, 3, 4, 5]), |v| v != 5).is_ok());
    // A learner (not a voter) always goes.
    assert!(removal_check("c9", 9, &voters(&[1]), |_| false).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_join_and_leave_through_their_records() {
    // Node 1 leads alone; nodes 2 and 3 run but are not members yet.
    let c = TlsCluster::start(3, 1).await;
    let leader = c.cp(0);
    leader.write(record("c1", 1, &c.addrs[0])).await.unwrap();
    join_record(&leader, "c2", &c.addrs[1]).await;
    join_record(&leader, "c3", &c.addrs[2]).await;
    assert!(
        wait_for(
            || async {
                leader.reconcile_membership().await;
                leader.voters() == BTreeSet::from([1, 2, 3])
            },
            TIMEOUT
        )
        .await,
        "the recorded controllers did not become voters: {:?}",
        leader.voters()
    );
    // Node 3 goes away: removing node 2 now would leave 1 of 2 voters reachable.
    c.isolate(2);
    assert!(
        wait_for(|| async { !leader.peer_reachable(3) }, TIMEOUT).await,
        "node 3 still looks reachable"
    );
    match c
        .cp(1)
        .write(Command::RemoveController { name: "c2".into() })
        .await
    {
        Err(WriteError::Rejected(e)) => assert!(e.message.contains("majority"), "{e}"),
        other => panic!("a removal that loses quorum was not refused: {other:?}"),
    }
    assert!(
        leader
            .read(|s| s.controllers.contains_key("c2"))
            .await
            .unwrap()
    );
    // Removing the unreachable one is fine; the membership follows the records.
    c.cp(1)
        .write(Command::RemoveController { name: "c3".into() })
        .await
        .unwrap();
    assert!(
        wait_for(
            || async {
                leader.reconcile_membership().await;
                leader.members().keys().copied().collect::<Vec<_>>() == [1, 2]
            },
            TIMEOUT
        )
        .await,
        "node 3 was not removed from the membership"
    );
    leader
        .write(Command::AddApiKey { key: key("two") })
        .await
        .unwrap();
    // The leader's own record goes: it takes itself out and node 2 carries on alone.
    c.cp(1)
        .write(Command::RemoveController { name: "c1".into() })
        .await
        .unwrap();
    let n2 = c.cp(1);
    assert!(
        wait_for(
            || async {
                leader.reconcile_membership().await;
                n2.is_leader() && n2.members().keys().copied().collect::<Vec<_>>() == [2]
            },
            TIMEOUT
        )
        .await,
        "the removed leader did not hand over: members {:?}",
        n2.members().keys().collect::<Vec<_>>()
    );
    n2.write(Command::AddApiKey { key: key("alone") })
        .await
        .unwrap();
    c.heal();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_heartbeat_as_the_node_their_certificate_names() {
    let c = TlsCluster::start(1, 1).await;
    let cp = c.cp(0);
    let cert = c.ca.issue("c1", &["c1".into()]).unwrap();
    let state = std::sync::Arc::new(crate::api::AppState {
        cp: cp.clone(),
        agents: crate::agents::AgentPool::new(c.ca.cert_pem.clone(), cert.cert_pem, cert.key_pem),
        ca: c.ca.clone(),
        name: "c1".into(),
        execs: Default::default(),
        metrics: Default::default(),
        liveness: crate::liveness::Liveness::new(Duration::from_secs(10)),
        instance_locks: Default::default(),
        image_pulls: Default::default(),
    });
    assert!(c.nodes[0].heartbeats.set(state).is_ok());
    let (n2_tls, n2_fingerprint) = c.client_cert(&["n2.agent.berth", "127.0.0.1"]);
    for name in ["n1", "n2"] {
        cp.write(Command::AddJoinToken {
            hash: format!("h-{name}"),
            record: crate::state::JoinTokenRecord {
                node_name: name.into(),
                kind: crate::state::JoinKind::Node,
                created_at: crate::clock::now(),
                expires_at: crate::clock::after(Duration::from_secs(60)),
            },
        })
        .await
        .unwrap();
        cp.write(Command::JoinNode {
            token_hash: format!("h-{name}"),
            node: crate::state::Node {
                name: name.into(),
                address: "127.0.0.1:9".into(),
                cert_fingerprint: if name == "n2" {
                    n2_fingerprint.clone()
                } else {
                    "00".repeat(32)
                },
                cpus: 1,
                ..Default::default()
            },
            now: crate::clock::now(),
        })
        .await
        .unwrap();
    }
    // The agent of n2 reports 8 CPUs; only n2 changes, whatever the request says.
    let channel = c.channel(0, n2_tls);
    let reply = ControllerClient::new(channel)
        .heartbeat(berth_proto::v1::HeartbeatRequest {
            capacity: Some(berth_proto::v1::NodeCapacity {
                cpus: 8,
                memory_bytes: 1 << 30,
                architecture: "x86_64".into(),
                ..Default::default()
            }),
            instances: vec![],
            sequence: 1,
            recovering: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.accepted);
    assert_eq!(reply.leader, c.addrs[0]);
    assert!(
        wait_for(
            || async { cp.read_local(|s| s.nodes["n2"].cpus == 8) },
            TIMEOUT
        )
        .await,
        "the heartbeat's capacity was not recorded for n2"
    );
    assert_eq!(cp.read_local(|s| s.nodes["n1"].cpus), 1);

    // Another certificate naming n2 (an old one, say) is not the one n2 joined with.
    let old = c.channel(0, c.client_tls(&["n2.agent.berth", "127.0.0.1"]));
    let e = ControllerClient::new(old)
        .heartbeat(berth_proto::v1::HeartbeatRequest {
            sequence: 2,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("the certificate is not the one node n2 joined with"),
        "{e:?}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_controllers_cannot_forward() {
    let c = TlsCluster::start(1, 1).await;
    let cp = c.cp(0);
    let ctl = [berth_proto::CONTROLLER_TLS_NAME];
    let (c1_tls, c1_fingerprint) = c.client_cert(&ctl);
    let (c2_tls, c2_fingerprint) = c.client_cert(&ctl);
    cp.write(Command::RegisterController {
        record: ControllerRecord {
            name: "c1".into(),
            id: 1,
            peer_address: c.addrs[0].clone(),
            api_address: "c1:8443".into(),
            joined_at: crate::clock::now(),
            cert_fingerprint: c1_fingerprint,
        },
    })
    .await
    .unwrap();
    cp.write(Command::AddJoinToken {
        hash: "token-c2".into(),
        record: crate::state::JoinTokenRecord {
            node_name: "c2".into(),
            kind: crate::state::JoinKind::Controller,
            created_at: crate::clock::now(),
            expires_at: crate::clock::after(Duration::from_secs(3600)),
        },
    })
    .await
    .unwrap();
    cp.write(Command::JoinController {
        token_hash: "token-c2".into(),
        name: "c2".into(),
        peer_address: "c2:7443".into(),
        api_address: "c2:8443".into(),
        cert_fingerprint: c2_fingerprint,
        now: crate::clock::now(),
    })
    .await
    .unwrap();
    let forward = |k: &str| berth_proto::v1::ForwardRequest {
        command: serde_json::to_vec(&Command::AddApiKey { key: key(k) })
            .unwrap()
            .into(),
    };
    let c2 = c.channel(0, c2_tls);
    ControllerClient::new(c2.clone())
        .forward(forward("by-c2"))
        .await
        .unwrap();
    // A controller certificate that is no member's (role alone) gets nothing.
    let stranger = c.channel(0, c.client_tls(&ctl));
    let e = ControllerClient::new(stranger.clone())
        .forward(forward("by-stranger"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = ControllerClient::new(stranger)
        .read_index(berth_proto::v1::ReadIndexRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    // c2 is removed: its certificate, still signed by the CA, can no longer write or read.
    cp.write(Command::RemoveController { name: "c2".into() })
        .await
        .unwrap();
    let e = ControllerClient::new(c2.clone())
        .forward(forward("by-removed-c2"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = ControllerClient::new(c2.clone())
        .read_index(berth_proto::v1::ReadIndexRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // Nor take part in Raft: its vote requests could disturb elections.
    let e = RaftClient::new(c2)
        .vote(tonic::Request::new(berth_proto::v1::RaftRequest {
            data: b"{}".to_vec().into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("removed"), "{e:?}");
    assert!(
        !cp.read_local(|s| s.api_keys.values().any(|k| k.name == "by-removed-c2")),
        "the removed controller's write was applied"
    );
    // c1, still a member, goes on.
    ControllerClient::new(c.channel(0, c1_tls))
        .read_index(berth_proto::v1::ReadIndexRequest {})
        .await
        .unwrap();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_partition_never_hangs_and_heals() {
    let c = TlsCluster::start(3, 3).await;
    let (n1, n2, n3) = (c.cp(0), c.cp(1), c.cp(2));
    assert!(n1.is_leader());
    // The leader can no longer send to node 3; node 3 still reaches everyone.
    n1.faults().block(3);
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut i = 0;
    while Instant::now() < deadline {
        i += 1;
        // The majority side keeps committing, through a follower too.
        let leader = if n1.is_leader() { &n1 } else { &n2 };
        leader
            .write(Command::AddApiKey {
                key: key(&format!("ow{i}")),
            })
            .await
            .unwrap();
        // Node 3 answers one way or the other, quickly.
        let started = Instant::now();
        let r = n3
            .write(Command::AddApiKey {
                key: key(&format!("ow3-{i}")),
            })
            .await;
        assert!(
            started.elapsed() < Duration::from_millis(3500),
            "node 3 took {:?} to answer: {r:?}",
            started.elapsed()
        );
        if let Err(e) = r {
            assert!(
                matches!(e, WriteError::Unavailable(_) | WriteError::Unsure(_)),
                "{e:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.heal();
    let cps: Vec<ControlPlane> = (0..3).map(|i| c.cp(i)).collect();
    assert!(
        wait_for(|| async { cps.iter().any(|cp| cp.is_leader()) }, TIMEOUT).await,
        "no leader after healing"
    );
    let leader = cps.iter().find(|cp| cp.is_leader()).unwrap().clone();
    leader
        .write(Command::AddApiKey { key: key("healed") })
        .await
        .unwrap();
    let want = leader.read(|s| s.clone()).await.unwrap();
    for cp in &cps {
        let cp = cp.clone();
        let want = want.clone();
        assert!(
            wait_for(|| async { cp.read_local(|s| *s == want) }, TIMEOUT).await,
            "node {} diverged after the one-way partition",
            cp.id()
        );
    }
    c.stop().await;
}
