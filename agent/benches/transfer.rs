//! Cross-pool copy throughput: raw `btrfs send | btrfs receive` beside Berth's transfer
//! (the same stream over gRPC with mutual TLS, checksummed, through two agents' Transfer
//! code) on this machine. Run as root: `cargo bench -p berth-agent --bench transfer`
//! (`BERTH_BENCH_MIB`, default 256, sets the data size). Two sparse loop pools in a temp dir,
//! unmounted and detached at the end, also on failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use berth_agent::storage::{BtrfsConfig, BtrfsDriver, BtrfsSource, StorageDriver};
use berth_agent::tls::Identity;
use berth_agent::transfer::{TransferService, TransferSetup, Transfers};
use berth_proto::v1;
use futures::StreamExt;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio_stream::wrappers::TcpListenerStream;

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Pool {
    driver: Arc<BtrfsDriver>,
    _tmp: tempfile::TempDir,
}

impl Pool {
    fn new() -> Pool {
        let tmp = tempfile::tempdir().unwrap();
        let driver = BtrfsDriver::open(BtrfsConfig {
            source: BtrfsSource::LoopFile {
                path: tmp.path().join("pool.img"),
                size_bytes: 4 << 30,
            },
            mount_point: tmp.path().join("mnt"),
        })
        .unwrap();
        Pool {
            driver: Arc::new(driver),
            _tmp: tmp,
        }
    }
    fn root(&self) -> PathBuf {
        self.driver.root().to_path_buf()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for _ in 0..50 {
            if self.driver.unmount().is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

fn identities() -> (Identity, Identity) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let make = |node: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![format!("{node}.agent.berth")])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: ca_pem.clone(),
        }
    };
    (make("n1"), make("n2"))
}

fn transfers(pool: &Pool, node: &str, id: &Identity) -> Arc<Transfers> {
    let t = Arc::new(Transfers::default());
    t.configure(TransferSetup {
        node: node.into(),
        pool_root: pool.root(),
        image_records: pool.root().join("records"),
        storage: pool.driver.clone() as Arc<dyn StorageDriver>,
        identity: Some(id.clone()),
    })
    .unwrap();
    t
}

fn main() {
    let mib: usize = std::env::var("BERTH_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let (src, dst) = (Pool::new(), Pool::new());
    let vol = src.root().join("containers/bench");
    run(&["btrfs", "subvolume", "create", vol.to_str().unwrap()]);
    std::fs::create_dir_all(vol.join("rootfs")).unwrap();
    run(&[
        "dd",
        "if=/dev/urandom",
        &format!("of={}", vol.join("rootfs/data").display()),
        "bs=1M",
        &format!("count={mib}"),
        "status=none",
    ]);
    let snap = src.root().join("raw-snap");
    run(&[
        "btrfs",
        "subvolume",
        "snapshot",
        "-r",
        vol.to_str().unwrap(),
        snap.to_str().unwrap(),
    ]);
    run(&["sync"]);

    let raw_once = |round: usize| -> f64 {
        let raw_dir = dst.root().join(format!("raw{round}"));
        std::fs::create_dir_all(&raw_dir).unwrap();
        run(&["sync"]);
        let started = Instant::now();
        let mut send = Command::new("btrfs")
            .args(["send", "-q"])
            .arg(&snap)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let recv = Command::new("btrfs")
            .args(["receive", "-q"])
            .arg(&raw_dir)
            .stdin(send.stdout.take().unwrap())
            .status()
            .unwrap();
        assert!(send.wait().unwrap().success() && recv.success());
        let secs = started.elapsed().as_secs_f64();
        let copy = raw_dir.join("raw-snap");
        run(&["btrfs", "subvolume", "delete", copy.to_str().unwrap()]);
        secs
    };

    // Berth: the same data through two agents' transfer code.
    let (id1, id2) = identities();
    let t1 = transfers(&src, "n1", &id1);
    let t2 = transfers(&dst, "n2", &id2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .initial_stream_window_size(Some(berth_agent::transfer::WINDOW))
            .initial_connection_window_size(Some(2 * berth_agent::transfer::WINDOW))
            .max_frame_size(Some(berth_agent::transfer::FRAME))
            .tls_config(id2.server_tls())
            .unwrap()
            .add_service(TransferService::new(t2.clone()).server());
        tokio::spawn(server.serve_with_incoming(TcpListenerStream::new(listener)));
        addr
    });
    let berth_once = |round: usize| -> (f64, u64) {
        run(&["sync"]);
        let name = format!("bench{round}");
        rt.block_on(async {
            t2.expect(&v1::ExpectTransferRequest {
                ticket: name.clone(),
                kind: v1::TransferKind::Instance as i32,
                name: name.clone(),
                source_node: "n1".into(),
                refresh: false,
            })
            .unwrap();
            let started = Instant::now();
            let mut s = t1
                .clone()
                .send_instance(v1::SendInstanceRequest {
                    ticket: name.clone(),
                    instance: "bench".into(),
                    instance_only: true,
                    mode: v1::SendMode::Full as i32,
                    target_address: addr.to_string(),
                    target_node: "n2".into(),
                    target_instance: name.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
            let mut bytes = 0;
            while let Some(p) = s.next().await {
                bytes = p.unwrap().bytes_sent;
            }
            let secs = started.elapsed().as_secs_f64();
            t2.commit(&name).unwrap();
            // Only the measurement matters: free the space for the next round.
            dst.driver.delete_instance_volume(&name).unwrap();
            let bases = dst.root().join("bases").join(&name);
            for e in std::fs::read_dir(&bases).unwrap() {
                let p = e.unwrap().path();
                run(&["btrfs", "subvolume", "delete", p.to_str().unwrap()]);
            }
            (secs, bytes)
        })
    };
    // Alternating rounds, best of each (the machine may be busy with other work).
    let mut raw = f64::MAX;
    let mut berth = (f64::MAX, 0);
    for round in 0..3 {
        raw = raw.min(raw_once(round));
        let b = berth_once(round);
        if b.0 < berth.0 {
            berth = b;
        }
    }
    let mb = |s: f64| mib as f64 / s;
    println!(
        "data {mib} MiB: raw btrfs send|receive {raw:.2}s ({:.0} MiB/s); berth transfer {:.2}s ({:.0} MiB/s, {} stream bytes); ratio {:.2}",
        mb(raw),
        berth.0,
        mb(berth.0),
        berth.1,
        raw / berth.0
    );
}
