//! Transfers between two "nodes" in one process (run as root): two btrfs pools on sparse loop
//! files, two Transfer servers on 127.0.0.1 with certificates from a test CA. Full sends with
//! snapshots, incremental refreshes, pre-copy and final passes, images, and refusals
//! (corrupt or truncated streams, unannounced tickets, the wrong peer). Drop guards stop the
//! servers and unmount and detach the pools even when a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use berth_agent::storage::{BtrfsConfig, BtrfsDriver, BtrfsSource, StorageDriver};
use berth_agent::tls::Identity;
use berth_agent::transfer::{TransferService, TransferSetup, Transfers};
use berth_proto::v1::{self, transfer_chunk, transfer_reply};
use futures::StreamExt;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A test CA issuing agent certificates (`<node>.agent.berth`, 127.0.0.1).
struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn identity(&self, names: &[&str]) -> Identity {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        }
    }

    fn agent(&self, node: &str) -> Identity {
        self.identity(&[&format!("{node}.agent.berth"), "127.0.0.1"])
    }
}

/// A node: a btrfs loop pool and a Transfer server, torn down on drop.
struct Node {
    name: String,
    tmp: tempfile::TempDir,
    driver: Arc<BtrfsDriver>,
    transfers: Arc<Transfers>,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    identity: Identity,
}

impl Node {
    async fn start(name: &str, ca: &Ca) -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = BtrfsConfig {
            source: BtrfsSource::LoopFile {
                path: tmp.path().join("pool.img"),
                size_bytes: 2 << 30,
            },
            mount_point: tmp.path().join("mnt"),
        };
        let driver = Arc::new(
            tokio::task::spawn_blocking(move || BtrfsDriver::open(cfg).unwrap())
                .await
                .unwrap(),
        );
        let identity = ca.agent(name);
        let transfers = Arc::new(Transfers::default());
        transfers
            .configure(TransferSetup {
                node: name.to_string(),
                pool_root: driver.root().to_path_buf(),
                image_records: tmp.path().join("state/images"),
                storage: driver.clone() as Arc<dyn StorageDriver>,
                identity: Some(identity.clone()),
            })
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .initial_stream_window_size(Some(berth_agent::transfer::WINDOW))
            .initial_connection_window_size(Some(2 * berth_agent::transfer::WINDOW))
            .max_frame_size(Some(berth_agent::transfer::FRAME))
            .tls_config(identity.server_tls())
            .unwrap()
            .add_service(tonic::service::interceptor::InterceptedService::new(
                TransferService::new(transfers.clone()).server(),
                berth_agent::tls::require_peer_agent,
            ));
        tokio::spawn(async move {
            server
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Node {
            name: name.to_string(),
            tmp,
            driver,
            transfers,
            addr,
            stop: Some(stop),
            identity,
        }
    }

    fn root(&self) -> PathBuf {
        self.driver.root().to_path_buf()
    }

    /// Makes `containers/<name>` with a rootfs holding `mib` MiB of random data in `file`.
    fn make_instance(&self, name: &str) {
        let vol = self.root().join("containers").join(name);
        run(&["btrfs", "subvolume", "create", vol.to_str().unwrap()]);
        std::fs::create_dir_all(vol.join("rootfs/etc")).unwrap();
        std::fs::write(vol.join("rootfs/etc/hostname"), name).unwrap();
    }

    fn write_random(&self, instance: &str, file: &str, mib: usize) {
        let path = self
            .root()
            .join("containers")
            .join(instance)
            .join("rootfs")
            .join(file);
        run(&[
            "dd",
            "if=/dev/urandom",
            &format!("of={}", path.display()),
            "bs=1M",
            &format!("count={mib}"),
            "status=none",
        ]);
    }

    /// A read-only snapshot the way helper A's snapshot code lays it out.
    fn snapshot(&self, instance: &str, snap: &str, created_at: i64) {
        let dir = self.root().join("snapshots").join(instance);
        std::fs::create_dir_all(&dir).unwrap();
        let vol = self.root().join("containers").join(instance);
        run(&[
            "btrfs",
            "subvolume",
            "snapshot",
            "-r",
            vol.to_str().unwrap(),
            dir.join(snap).to_str().unwrap(),
        ]);
        std::fs::write(
            dir.join(format!(".{snap}.created")),
            format!("{created_at}\n"),
        )
        .unwrap();
    }

    fn expect(&self, ticket: &str, kind: v1::TransferKind, name: &str, from: &str, refresh: bool) {
        self.transfers
            .expect(&v1::ExpectTransferRequest {
                ticket: ticket.into(),
                kind: kind as i32,
                name: name.into(),
                source_node: from.into(),
                refresh,
            })
            .unwrap();
    }

    /// Names of staged volumes anywhere in the pool.
    fn staged(&self) -> Vec<String> {
        let mut out = Vec::new();
        let root = self.root();
        let mut dirs = vec![root.join("images")];
        for top in ["snapshots", "bases"] {
            if let Ok(rd) = std::fs::read_dir(root.join(top)) {
                dirs.extend(rd.map(|e| e.unwrap().path()));
            }
        }
        for d in dirs {
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd {
                    let n = e.unwrap().file_name().to_string_lossy().into_owned();
                    if n.starts_with(".in-") {
                        out.push(format!("{}/{n}", d.display()));
                    }
                }
            }
        }
        out
    }

    fn bases(&self, instance: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root().join("bases").join(instance))
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        // Receives still running end when their server goes; give them a moment.
        for _ in 0..50 {
            if self.driver.unmount().is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("could not unmount {}", self.tmp.path().display());
    }
}

/// Sends an instance from `from` to `to` and returns the last progress report.
async fn send(
    from: &Node,
    to: &Node,
    ticket: &str,
    instance: &str,
    target: &str,
    mode: v1::SendMode,
    instance_only: bool,
) -> Result<v1::TransferProgress, tonic::Status> {
    let mut stream = from
        .transfers
        .clone()
        .send_instance(v1::SendInstanceRequest {
            ticket: ticket.into(),
            instance: instance.into(),
            source_snapshot: String::new(),
            instance_only,
            mode: mode as i32,
            target_address: to.addr.to_string(),
            target_node: to.name.clone(),
            target_instance: target.into(),
        })
        .await
        .map_err(|e| e.status())?;
    let mut last = None;
    while let Some(p) = stream.next().await {
        let p = p?;
        if p.done {
            return Ok(p);
        }
        last = Some(p);
    }
    panic!("the progress stream ended without done (last {last:?})");
}

fn read(root: &Path, rel: &str) -> Vec<u8> {
    std::fs::read(root.join(rel)).unwrap()
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_send_then_incremental_refresh() {
    let ca = Ca::new();
    let n1 = Node::start("n1", &ca).await;
    let n2 = Node::start("n2", &ca).await;
    n1.make_instance("web");
    n1.write_random("web", "a.bin", 24);
    n1.snapshot("web", "snap0", 1000);
    n1.write_random("web", "b.bin", 8);
    n1.snapshot("web", "snap1", 2000);
    n1.write_random("web", "c.bin", 4);

    n2.expect("t1", v1::TransferKind::Instance, "copy", "n1", false);
    let p = send(&n1, &n2, "t1", "web", "copy", v1::SendMode::Full, false)
        .await
        .unwrap();
    assert!(p.bytes_sent > 36 << 20, "{p:?}");
    let full = p.bytes_sent;
    let c = n2.transfers.commit("t1").unwrap();
    let names: Vec<_> = c
        .snapshots
        .iter()
        .map(|s| (s.name.as_str(), s.created_at))
        .collect();
    assert_eq!(names, vec![("snap0", 1000), ("snap1", 2000)]);
    // Committing again answers the same.
    assert_eq!(n2.transfers.commit("t1").unwrap(), c);
    let (r1, r2) = (n1.root(), n2.root());
    for f in ["a.bin", "b.bin", "c.bin", "etc/hostname"] {
        let rel = format!("containers/web/rootfs/{f}");
        let rel2 = format!("containers/copy/rootfs/{f}");
        assert_eq!(sha(&read(&r1, &rel)), sha(&read(&r2, &rel2)), "{f}");
    }
    assert!(!read(&r2, "snapshots/copy/snap0/rootfs/a.bin").is_empty());
    assert!(std::fs::metadata(r2.join("snapshots/copy/snap0/rootfs/b.bin")).is_err());
    // The copy is writable, its snapshots are not.
    std::fs::write(r2.join("containers/copy/rootfs/new"), b"x").unwrap();
    assert!(std::fs::write(r2.join("snapshots/copy/snap1/rootfs/new"), b"x").is_err());
    assert!(n2.staged().is_empty(), "{:?}", n2.staged());
    assert_eq!(n1.bases("web").len(), 1);
    assert_eq!(n2.bases("copy").len(), 1);

    // A refresh after a small change sends only the change.
    n1.write_random("web", "d.bin", 2);
    n2.expect("t2", v1::TransferKind::Instance, "copy", "n1", true);
    let p = send(&n1, &n2, "t2", "web", "copy", v1::SendMode::Full, false)
        .await
        .unwrap();
    assert!(
        p.bytes_sent < full / 8,
        "refresh sent {} of {full}",
        p.bytes_sent
    );
    assert!(p.bytes_sent > 2 << 20, "{p:?}");
    assert!(p.reused.contains(&"snap0".to_string()), "{p:?}");
    n2.transfers.commit("t2").unwrap();
    assert_eq!(
        sha(&read(&r1, "containers/web/rootfs/d.bin")),
        sha(&read(&r2, "containers/copy/rootfs/d.bin"))
    );
    // The refresh replaced the volume: the file written on the copy is gone.
    assert!(std::fs::metadata(r2.join("containers/copy/rootfs/new")).is_err());
    assert_eq!(n1.bases("web").len(), 1, "{:?}", n1.bases("web"));
    assert_eq!(n2.bases("copy").len(), 1, "{:?}", n2.bases("copy"));
    assert!(n2.staged().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precopy_and_final_passes() {
    let ca = Ca::new();
    let n1 = Node::start("n1", &ca).await;
    let n2 = Node::start("n2", &ca).await;
    n1.make_instance("db");
    n1.write_random("db", "a.bin", 16);
    n1.snapshot("db", "s0", 100);
    n2.expect("mv1", v1::TransferKind::Instance, "db", "n1", false);
    let p1 = send(&n1, &n2, "mv1", "db", "db", v1::SendMode::Precopy, false)
        .await
        .unwrap();
    n1.write_random("db", "b.bin", 1);
    let p2 = send(&n1, &n2, "mv1", "db", "db", v1::SendMode::Precopy, false)
        .await
        .unwrap();
    assert!(
        p2.bytes_sent < p1.bytes_sent / 4,
        "{} vs {}",
        p2.bytes_sent,
        p1.bytes_sent
    );
    assert!(p2.reused.contains(&"s0".to_string()), "{p2:?}");
    assert_eq!(n1.bases("db").len(), 1, "{:?}", n1.bases("db"));
    n1.write_random("db", "c.bin", 1);
    let p3 = send(&n1, &n2, "mv1", "db", "db", v1::SendMode::Final, false)
        .await
        .unwrap();
    assert!(p3.bytes_sent < p1.bytes_sent / 4);
    // After the final pass the sender keeps no base for this target.
    assert!(n1.bases("db").is_empty(), "{:?}", n1.bases("db"));
    let c = n2.transfers.commit("mv1").unwrap();
    assert_eq!(c.snapshots.len(), 1);
    for f in ["a.bin", "b.bin", "c.bin"] {
        let rel = format!("containers/db/rootfs/{f}");
        assert_eq!(
            sha(&read(&n1.root(), &rel)),
            sha(&read(&n2.root(), &rel)),
            "{f}"
        );
    }
    assert!(n2.staged().is_empty());
}

/// A raw Transfer client with `identity`, for streams a real sender would never send.
async fn raw_client(
    to: &Node,
    identity: &Identity,
) -> v1::transfer_client::TransferClient<tonic::transport::Channel> {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&identity.ca_pem))
        .identity(tonic::transport::Identity::from_pem(
            &identity.cert_pem,
            &identity.key_pem,
        ))
        .domain_name(format!("{}.agent.berth", to.name));
    let ch = tonic::transport::Endpoint::from_shared(format!("https://{}", to.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    v1::transfer_client::TransferClient::new(ch)
}

fn chunk(m: transfer_chunk::Msg) -> v1::TransferChunk {
    v1::TransferChunk { msg: Some(m) }
}

/// Opens a raw stream with Begin; returns the sender and the reply stream after Have.
async fn raw_open(
    to: &Node,
    identity: &Identity,
    ticket: &str,
) -> Result<
    (
        mpsc::Sender<v1::TransferChunk>,
        tonic::Streaming<v1::TransferReply>,
    ),
    tonic::Status,
> {
    let mut client = raw_client(to, identity).await;
    let (tx, rx) = mpsc::channel(16);
    tx.send(chunk(transfer_chunk::Msg::Begin(v1::TransferBegin {
        ticket: ticket.into(),
    })))
    .await
    .unwrap();
    let mut replies = client.receive(ReceiverStream::new(rx)).await?.into_inner();
    match replies.message().await? {
        Some(v1::TransferReply {
            msg: Some(transfer_reply::Msg::Have(_)),
        }) => Ok((tx, replies)),
        other => panic!("expected Have, got {other:?}"),
    }
}

/// A read-only snapshot's full btrfs send stream and its uuid.
fn send_stream(node: &Node, rel: &str) -> (Vec<u8>, String) {
    let path = node.root().join(rel);
    let out = Command::new("btrfs")
        .args(["send", "-q"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let info = berth_agent::storage::send::subvol_info(&path).unwrap();
    (out.stdout, info.stream_uuid().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_truncated_streams_leave_nothing() {
    let ca = Ca::new();
    let n1 = Node::start("n1", &ca).await;
    let n2 = Node::start("n2", &ca).await;
    n1.make_instance("web");
    n1.write_random("web", "a.bin", 6);
    n1.snapshot("web", "s0", 10);
    let (data, uuid) = send_stream(&n1, "snapshots/web/s0");
    n2.expect("bad", v1::TransferKind::Instance, "web", "n1", false);
    let header = v1::VolumeHeader {
        role: v1::VolumeRole::Snapshot as i32,
        name: "s0".into(),
        parent_uuid: String::new(),
        uuid: uuid.clone(),
        created_at: 10,
        image: None,
    };

    // A flipped byte in the middle: refused as data loss, nothing staged.
    let (tx, mut replies) = raw_open(&n2, &n1.identity, "bad").await.unwrap();
    tx.send(chunk(transfer_chunk::Msg::Volume(header.clone())))
        .await
        .unwrap();
    let mut corrupt = data.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x55;
    for c in corrupt.chunks(1 << 20) {
        tx.send(chunk(transfer_chunk::Msg::Data(
            bytes::Bytes::copy_from_slice(c),
        )))
        .await
        .unwrap();
    }
    tx.send(chunk(transfer_chunk::Msg::End(v1::VolumeEnd {
        sha256: sha(&data),
        bytes: data.len() as u64,
    })))
    .await
    .unwrap();
    let err = replies.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DataLoss, "{err:?}");
    drop(tx);
    assert!(n2.staged().is_empty(), "{:?}", n2.staged());

    // Half the data, then the sender goes away: cleaned up.
    let (tx, replies) = raw_open(&n2, &n1.identity, "bad").await.unwrap();
    tx.send(chunk(transfer_chunk::Msg::Volume(header.clone())))
        .await
        .unwrap();
    for c in data[..data.len() / 2].chunks(1 << 20) {
        tx.send(chunk(transfer_chunk::Msg::Data(
            bytes::Bytes::copy_from_slice(c),
        )))
        .await
        .unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    drop(tx);
    drop(replies);
    let mut left = n2.staged();
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        left = n2.staged();
    }
    assert!(left.is_empty(), "{left:?}");
    assert!(n2.transfers.commit("bad").is_err());

    // The same ticket still works with an honest sender.
    let p = send(&n1, &n2, "bad", "web", "web", v1::SendMode::Full, false)
        .await
        .unwrap();
    assert!(p.done);
    n2.transfers.commit("bad").unwrap();
    assert!(n2.root().join("containers/web/rootfs/a.bin").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_unannounced_tickets_and_wrong_peers() {
    let ca = Ca::new();
    let n1 = Node::start("n1", &ca).await;
    let n2 = Node::start("n2", &ca).await;
    n1.make_instance("web");

    // No ExpectTransfer: the sender's call fails and nothing is left on either side.
    let err = send(&n1, &n2, "nope", "web", "web", v1::SendMode::Full, false)
        .await
        .unwrap_err();
    assert!(err.message().contains("unknown transfer ticket"), "{err:?}");
    assert!(n1.bases("web").is_empty(), "{:?}", n1.bases("web"));

    // Announced from n1, presented by n3 (a valid cluster certificate, the wrong node).
    n2.expect("t9", v1::TransferKind::Instance, "web", "n1", false);
    let n3 = ca.agent("n3");
    let err = raw_open(&n2, &n3, "t9").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    // A certificate from another CA does not even get a TLS session.
    let other = Ca::new().agent("n1");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&n1.identity.ca_pem))
        .identity(tonic::transport::Identity::from_pem(
            &other.cert_pem,
            &other.key_pem,
        ))
        .domain_name("n2.agent.berth");
    let ch = tonic::transport::Endpoint::from_shared(format!("https://{}", n2.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = ch {
        let mut c = v1::transfer_client::TransferClient::new(ch);
        let (tx, rx) = mpsc::channel(1);
        tx.send(chunk(transfer_chunk::Msg::Begin(v1::TransferBegin {
            ticket: "t9".into(),
        })))
        .await
        .unwrap();
        assert!(c.receive(ReceiverStream::new(rx)).await.is_err());
    }
    // The sender must reach the node it was told: n2 is not "n4".
    n2.expect("t10", v1::TransferKind::Instance, "web", "n1", false);
    let mut s = n1
        .transfers
        .clone()
        .send_instance(v1::SendInstanceRequest {
            ticket: "t10".into(),
            instance: "web".into(),
            mode: v1::SendMode::Full as i32,
            target_address: n2.addr.to_string(),
            target_node: "n4".into(),
            target_instance: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let last = s.next().await.unwrap();
    assert!(last.is_err(), "{last:?}");
    // Abort clears the tickets on both sides; a second abort succeeds too.
    n2.transfers.abort("t9").unwrap();
    n2.transfers.abort("t9").unwrap();
    n1.transfers.abort("t10").unwrap();
    assert!(n2.transfers.commit("t9").is_err());
    assert!(n1.bases("web").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_transfer() {
    let ca = Ca::new();
    let n1 = Node::start("n1", &ca).await;
    let n2 = Node::start("n2", &ca).await;
    let fp = "ab".repeat(32);
    let vol = n1.driver.create_image_volume(&fp).unwrap();
    std::fs::write(vol.join("rootfs/hello"), b"image").unwrap();
    std::fs::write(vol.join("metadata.yaml"), b"architecture: x86_64\n").unwrap();
    n1.driver.finish_image_volume(&fp).unwrap();
    n2.expect("img1", v1::TransferKind::Image, &fp, "n1", false);
    let image = v1::Image {
        fingerprint: fp.clone(),
        os: "busybox".into(),
        description: "test".into(),
        ..Default::default()
    };
    let mut s = n1
        .transfers
        .clone()
        .send_image(
            v1::SendImageRequest {
                ticket: "img1".into(),
                fingerprint: fp.clone(),
                target_address: n2.addr.to_string(),
                target_node: "n2".into(),
            },
            image,
        )
        .await
        .unwrap();
    let mut done = false;
    while let Some(p) = s.next().await {
        done = p.unwrap().done;
    }
    assert!(done);
    n2.transfers.commit("img1").unwrap();
    let got = n2.driver.image_volume(&fp).unwrap();
    assert_eq!(std::fs::read(got.join("rootfs/hello")).unwrap(), b"image");
    let rec =
        std::fs::read_to_string(n2.tmp.path().join(format!("state/images/{fp}.json"))).unwrap();
    assert!(rec.contains("busybox"), "{rec}");
    assert!(n2.staged().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_of_a_snapshot() {
    let ca = Ca::new();
    let n1 = Node::start("n1", &ca).await;
    let n2 = Node::start("n2", &ca).await;
    n1.make_instance("web");
    n1.write_random("web", "old.bin", 2);
    n1.snapshot("web", "s0", 5);
    n1.snapshot("web", "s1", 6);
    n1.write_random("web", "new.bin", 1);
    n2.expect(
        "snapcopy",
        v1::TransferKind::Instance,
        "fromsnap",
        "n1",
        false,
    );
    let mut s = n1
        .transfers
        .clone()
        .send_instance(v1::SendInstanceRequest {
            ticket: "snapcopy".into(),
            instance: "web".into(),
            source_snapshot: "s0".into(),
            mode: v1::SendMode::Full as i32,
            target_address: n2.addr.to_string(),
            target_node: "n2".into(),
            target_instance: "fromsnap".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut done = false;
    while let Some(p) = s.next().await {
        done = p.unwrap().done;
    }
    assert!(done);
    // Not before the stream finished, and only once it has: the snapshot's contents, no
    // snapshots.
    let c = n2.transfers.commit("snapcopy").unwrap();
    assert!(c.snapshots.is_empty(), "{c:?}");
    let r2 = n2.root();
    assert!(r2.join("containers/fromsnap/rootfs/old.bin").is_file());
    assert!(!r2.join("containers/fromsnap/rootfs/new.bin").exists());
    // An unknown snapshot is refused before anything is sent.
    let err = n1
        .transfers
        .clone()
        .send_instance(v1::SendInstanceRequest {
            ticket: "x1".into(),
            instance: "web".into(),
            source_snapshot: "nope".into(),
            target_address: n2.addr.to_string(),
            target_node: "n2".into(),
            target_instance: "y".into(),
            ..Default::default()
        })
        .await
        .err()
        .unwrap();
    assert_eq!(err.status().code(), tonic::Code::NotFound);
}

/// `stream` (a full btrfs send stream) with `cmd` inserted before its end command.
fn with_command_before_end(stream: &[u8], cmd: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (ty, value) in attrs {
        body.extend_from_slice(&ty.to_le_bytes());
        body.extend_from_slice(&(value.len() as u16).to_le_bytes());
        body.extend_from_slice(value);
    }
    let mut header = [0u8; 10];
    header[..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
    header[4..6].copy_from_slice(&cmd.to_le_bytes());
    let crc =
        berth_agent::storage::send::crc32c(berth_agent::storage::send::crc32c(0, &header), &body);
    header[6..].copy_from_slice(&crc.to_le_bytes());
    // The end command is the stream's last 10 bytes (it has no attributes).
    let (head, end) = stream.split_at(stream.len() - 10);
    assert_eq!(&end[4..6], &21u16.to_le_bytes());
    let mut out = head.to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&body);
    out.extend_from_slice(end);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_stream_cannot_touch_the_nodes_other_images() {
    let ca = Ca::new();
    let n1 = Node::start("n1", &ca).await;
    let n2 = Node::start("n2", &ca).await;
    let make = |node: &Node, fp: &str| {
        let vol = node.driver.create_image_volume(fp).unwrap();
        std::fs::write(vol.join("rootfs/hello"), fp.as_bytes()).unwrap();
        node.driver.finish_image_volume(fp).unwrap();
    };
    let (fp, victim) = ("ab".repeat(32), "cd".repeat(32));
    make(&n1, &fp);
    make(&n2, &victim);
    let (data, uuid) = send_stream(&n1, &format!("images/{fp}"));
    // A peer's stream that renames a sibling of its subvolume (btrfs receive allows "../"
    // within its --chroot directory).
    let from = format!("../{victim}");
    let evil = with_command_before_end(&data, 9, &[(15, from.as_bytes()), (16, b"../stolen")]);
    n2.expect("img2", v1::TransferKind::Image, &fp, "n1", false);
    let (tx, mut replies) = raw_open(&n2, &n1.identity, "img2").await.unwrap();
    tx.send(chunk(transfer_chunk::Msg::Volume(v1::VolumeHeader {
        role: v1::VolumeRole::Image as i32,
        name: fp.clone(),
        parent_uuid: String::new(),
        uuid,
        created_at: 1,
        image: None,
    })))
    .await
    .unwrap();
    tx.send(chunk(transfer_chunk::Msg::Data(bytes::Bytes::from(
        evil.clone(),
    ))))
    .await
    .unwrap();
    tx.send(chunk(transfer_chunk::Msg::End(v1::VolumeEnd {
        sha256: sha(&evil),
        bytes: evil.len() as u64,
    })))
    .await
    .unwrap();
    let answer = replies.message().await;
    assert!(
        answer.is_err(),
        "the rename had nothing to rename: {answer:?}"
    );
    drop(tx);
    let images = n2.root().join("images");
    assert!(images.join(&victim).join("rootfs/hello").is_file());
    assert!(!images.join("stolen").exists());
    assert!(n2.staged().is_empty(), "{:?}", n2.staged());
    n2.transfers.abort("img2").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_stream_cannot_change_what_is_beside_its_volume() {
    let ca = Ca::new();
    let n1 = Node::start("n1", &ca).await;
    let n2 = Node::start("n2", &ca).await;
    n1.make_instance("web");
    n1.snapshot("web", "s0", 10);
    n2.make_instance("web");
    n2.snapshot("web", "old", 5);
    let (data, uuid) = send_stream(&n1, "snapshots/web/s0");
    // Renames the target's own snapshot away and plants a symlink to the host's root.
    let evil = with_command_before_end(&data, 9, &[(15, b"../old"), (16, b"../gone")]);
    let ino = 999u64.to_le_bytes();
    let evil = with_command_before_end(&evil, 8, &[(15, b"../evil"), (3, &ino), (17, b"/")]);
    n2.expect("snap2", v1::TransferKind::Instance, "web", "n1", true);
    let (tx, mut replies) = raw_open(&n2, &n1.identity, "snap2").await.unwrap();
    tx.send(chunk(transfer_chunk::Msg::Volume(v1::VolumeHeader {
        role: v1::VolumeRole::Snapshot as i32,
        name: "s0".into(),
        parent_uuid: String::new(),
        uuid,
        created_at: 10,
        image: None,
    })))
    .await
    .unwrap();
    tx.send(chunk(transfer_chunk::Msg::Data(bytes::Bytes::from(
        evil.clone(),
    ))))
    .await
    .unwrap();
    tx.send(chunk(transfer_chunk::Msg::End(v1::VolumeEnd {
        sha256: sha(&evil),
        bytes: evil.len() as u64,
    })))
    .await
    .unwrap();
    let err = replies.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    drop(tx);
    let dir = n2.root().join("snapshots/web");
    assert!(dir.join("old/rootfs/etc/hostname").is_file());
    assert!(std::fs::symlink_metadata(dir.join("gone")).is_err());
    assert!(std::fs::symlink_metadata(dir.join("evil")).is_err());
    assert!(n2.staged().is_empty(), "{:?}", n2.staged());
    n2.transfers.abort("snap2").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_fails_at_commit_keeps_the_instance_volume() {
    let ca = Ca::new();
    let n1 = Node::start("n1", &ca).await;
    let n2 = Node::start("n2", &ca).await;
    n2.make_instance("web");
    n2.expect("ref1", v1::TransferKind::Instance, "web", "n1", true);
    let (tx, mut replies) = raw_open(&n2, &n1.identity, "ref1").await.unwrap();
    // A staged base that is not a subvolume: making the new volume from it fails.
    let bases = n2.root().join("bases/web");
    std::fs::create_dir_all(bases.join(".in-ref1-b-n1@web@ref1@1")).unwrap();
    tx.send(chunk(transfer_chunk::Msg::Finish(true)))
        .await
        .unwrap();
    assert!(replies.message().await.unwrap().is_some());
    drop(tx);
    assert!(n2.transfers.commit("ref1").is_err());
    let root = n2.root();
    assert!(root.join("containers/web/rootfs/etc/hostname").is_file());
    assert!(std::fs::symlink_metadata(root.join("containers/.old-web")).is_err());
    std::fs::remove_dir(bases.join(".in-ref1-b-n1@web@ref1@1")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_sender_is_dropped_and_leaves_nothing() {
    let ca = Ca::new();
    let n1 = Node::start("n1", &ca).await;
    let n2 = Node::start("n2", &ca).await;
    n1.make_instance("web");
    n1.snapshot("web", "s0", 10);
    let (data, uuid) = send_stream(&n1, "snapshots/web/s0");
    n2.transfers
        .set_receive_idle(std::time::Duration::from_millis(500));
    n2.expect("quiet", v1::TransferKind::Instance, "web", "n1", false);
    let (tx, mut replies) = raw_open(&n2, &n1.identity, "quiet").await.unwrap();
    tx.send(chunk(transfer_chunk::Msg::Volume(v1::VolumeHeader {
        role: v1::VolumeRole::Snapshot as i32,
        name: "s0".into(),
        parent_uuid: String::new(),
        uuid,
        created_at: 10,
        image: None,
    })))
    .await
    .unwrap();
    tx.send(chunk(transfer_chunk::Msg::Data(
        bytes::Bytes::copy_from_slice(&data[..data.len() / 2]),
    )))
    .await
    .unwrap();
    // The sender stays connected and says nothing more.
    let err = tokio::time::timeout(std::time::Duration::from_secs(20), replies.message())
        .await
        .expect("the receiver waits for ever")
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Aborted, "{err:?}");
    assert!(err.message().contains("nothing from the sender"), "{err:?}");
    assert!(n2.staged().is_empty(), "{:?}", n2.staged());
    drop(tx);
    n2.transfers.abort("quiet").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_stream_ending_does_not_free_the_reannounced_ticket() {
    let ca = Ca::new();
    let n1 = Node::start("n1", &ca).await;
    let n2 = Node::start("n2", &ca).await;
    n2.expect("again", v1::TransferKind::Instance, "web", "n1", false);
    let (old_tx, mut old_replies) = raw_open(&n2, &n1.identity, "again").await.unwrap();
    // The controller's next attempt: abort, announce again, a new stream.
    n2.transfers.abort("again").unwrap();
    n2.expect("again", v1::TransferKind::Instance, "web", "n1", false);
    let (new_tx, _new_replies) = raw_open(&n2, &n1.identity, "again").await.unwrap();
    // The old stream ends now (its replies end once the receiver is done with it, however
    // long that takes): the new one still holds the ticket.
    drop(old_tx);
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while let Ok(Some(_)) = old_replies.message().await {}
    })
    .await
    .expect("the old stream's replies never ended");
    drop(old_replies);
    let third = raw_open(&n2, &n1.identity, "again").await;
    let Err(err) = third else {
        panic!("a third stream took a held ticket");
    };
    assert_eq!(err.code(), tonic::Code::Aborted, "{err:?}");
    assert!(matches!(
        n2.transfers.commit("again"),
        Err(berth_agent::transfer::TransferError::Busy(_))
    ));
    drop(new_tx);
}
