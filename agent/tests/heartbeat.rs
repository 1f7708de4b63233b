//! Heartbeats against fake in-process controllers: following the leader a follower names,
//! moving on from a controller that hangs or fails, remembering the controllers, and mutual
//! TLS with the cluster CA and the controller name.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_agent::heartbeat::{Heartbeat, KnownControllers, Reporter, Timing, client_tls};
use berth_agent::tls::Identity;
use berth_proto::v1::controller_server::{Controller, ControllerServer};
use berth_proto::v1::{
    ForwardReply, ForwardRequest, HeartbeatReply, HeartbeatRequest, InstanceStatus, NodeCapacity,
    ReadIndexReply, ReadIndexRequest,
};
use tonic::{Request, Response, Status};

#[derive(Default)]
struct Behaviour {
    /// Whether this fake leads.
    leader: bool,
    /// The leader it names when it does not lead.
    names_leader: String,
    controllers: Vec<String>,
    /// Never answer.
    hang: bool,
    /// Answer UNAVAILABLE.
    fail: bool,
    /// Sequence numbers of the heartbeats received (answered or not).
    seen: Vec<u64>,
    /// Whether the client presented a certificate.
    client_cert: bool,
    /// The capacity last reported.
    capacity: Option<NodeCapacity>,
    /// The `recovering` flag of every heartbeat received.
    recovering: Vec<bool>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Behaviour>>);

impl Fake {
    fn with<T>(&self, f: impl FnOnce(&mut Behaviour) -> T) -> T {
        f(&mut self.0.lock().unwrap())
    }
}

#[tonic::async_trait]
impl Controller for Fake {
    async fn forward(&self, _: Request<ForwardRequest>) -> Result<Response<ForwardReply>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn read_index(
        &self,
        _: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexReply>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let client_cert = req.peer_certs().is_some_and(|c| !c.is_empty());
        let req = req.into_inner();
        let (hang, fail, reply) = self.with(|b| {
            b.seen.push(req.sequence);
            b.recovering.push(req.recovering);
            b.client_cert |= client_cert;
            b.capacity = req.capacity.clone();
            (
                b.hang,
                b.fail,
                HeartbeatReply {
                    accepted: b.leader,
                    leader: if b.leader {
                        String::new()
                    } else {
                        b.names_leader.clone()
                    },
                    controllers: b.controllers.clone(),
                    interval_ms: 50,
                },
            )
        });
        if hang {
            std::future::pending::<()>().await;
        }
        if fail {
            return Err(Status::unavailable("fake is down"));
        }
        Ok(Response::new(reply))
    }
}

async fn serve(fake: Fake, tls: Option<tonic::transport::ServerTlsConfig>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut b = tonic::transport::Server::builder();
    if let Some(t) = tls {
        b = b.tls_config(t).unwrap();
    }
    let router = b.add_service(ControllerServer::new(fake));
    tokio::spawn(async move {
        let _ = router
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    addr
}

struct Fixed;

impl Reporter for Fixed {
    async fn report(&self) -> (NodeCapacity, Vec<InstanceStatus>) {
        (
            NodeCapacity {
                cpus: 3,
                memory_bytes: 1 << 30,
                architecture: "x86_64".into(),
                ..Default::default()
            },
            vec![InstanceStatus {
                name: "w1".into(),
                ..Default::default()
            }],
        )
    }
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn timing() -> Timing {
    Timing {
        interval: Duration::from_millis(50),
        call_timeout: Duration::from_millis(400),
        retry_pause: Duration::from_millis(100),
    }
}

/// Aborts the heartbeat task even when the test fails.
struct Abort(tokio::task::JoinHandle<()>);
impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test]
async fn follows_the_leader_and_moves_on_when_it_hangs() {
    let (a, b, c) = (Fake::default(), Fake::default(), Fake::default());
    let aa = serve(a.clone(), None).await.to_string();
    let ba = serve(b.clone(), None).await.to_string();
    let ca = serve(c.clone(), None).await.to_string();
    let all = vec![aa.clone(), ba.clone(), ca.clone()];
    for (f, lead) in [(&a, false), (&b, true), (&c, false)] {
        f.with(|x| {
            x.leader = lead;
            x.names_leader = ba.clone();
            x.controllers = all.clone();
        });
    }
    let dir = tempfile::tempdir().unwrap();
    // The agent knows only A (a follower): it must end up beating to B.
    let hb = Heartbeat::new(
        "n1".into(),
        dir.path().to_path_buf(),
        None,
        Fixed,
        vec![aa.clone()],
    )
    .with_timing(timing());
    let _task = Abort(tokio::spawn(hb.run()));
    wait_for("beats at the leader", Duration::from_secs(10), || {
        b.with(|x| x.seen.len() >= 3)
    })
    .await;
    let seen = b.with(|x| x.seen.clone());
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    let cap = b.with(|x| x.capacity.clone()).unwrap();
    assert_eq!(cap.cpus, 3);
    // The controllers and the leader are remembered.
    wait_for("controllers.json", Duration::from_secs(5), || {
        KnownControllers::load(dir.path()).is_some_and(|k| k.controllers == all && k.leader == ba)
    })
    .await;
    // Only one beat went to A (the redirect), the rest to B.
    let at_a = a.with(|x| x.seen.len());
    assert_eq!(at_a, 1);

    // B hangs; C takes over and A now names C.
    b.with(|x| {
        x.hang = true;
        x.leader = false;
    });
    for f in [&a, &c] {
        f.with(|x| x.names_leader = ca.clone());
    }
    c.with(|x| x.leader = true);
    let started = Instant::now();
    wait_for("beats at the new leader", Duration::from_secs(10), || {
        c.with(|x| x.seen.len() >= 2)
    })
    .await;
    println!("moved to the new leader in {:?}", started.elapsed());
    wait_for("the new leader remembered", Duration::from_secs(5), || {
        KnownControllers::load(dir.path()).is_some_and(|k| k.leader == ca)
    })
    .await;

    // Every controller fails: the loop keeps trying (it neither stops nor spins).
    for f in [&a, &b, &c] {
        f.with(|x| {
            x.hang = false;
            x.fail = true;
        });
    }
    let before: usize = [&a, &b, &c].iter().map(|f| f.with(|x| x.seen.len())).sum();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after: usize = [&a, &b, &c].iter().map(|f| f.with(|x| x.seen.len())).sum();
    assert!(after > before, "no retries while every controller fails");
    assert!(after - before < 60, "retries too fast: {}", after - before);
    // One comes back as leader: beats resume there.
    a.with(|x| {
        x.fail = false;
        x.leader = true;
    });
    let at_a = a.with(|x| x.seen.len());
    wait_for("beats resume", Duration::from_secs(10), || {
        a.with(|x| x.seen.len() >= at_a + 3)
    })
    .await;
}

#[tokio::test]
async fn a_dead_address_is_skipped() {
    let leader = Fake::default();
    // A port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let la = serve(leader.clone(), None).await.to_string();
    leader.with(|x| {
        x.leader = true;
        x.controllers = vec![dead.clone(), la.clone()];
    });
    let dir = tempfile::tempdir().unwrap();
    KnownControllers {
        controllers: vec![dead.clone(), la.clone()],
        leader: dead.clone(),
    }
    .save(dir.path())
    .unwrap();
    // The state directory's addresses come first, then the configured seeds.
    let hb = Heartbeat::new(
        "n1".into(),
        dir.path().to_path_buf(),
        None,
        Fixed,
        vec!["127.0.0.1:1".into()],
    )
    .with_timing(timing());
    let _task = Abort(tokio::spawn(hb.run()));
    wait_for(
        "beats at the live controller",
        Duration::from_secs(10),
        || leader.with(|x| x.seen.len() >= 2),
    )
    .await;
}

struct Pki {
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_pem: String,
}

impl Pki {
    fn new() -> Pki {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).unwrap();
        let ca_pem = cert.pem();
        Pki {
            ca: rcgen::Issuer::from_ca_cert_pem(&ca_pem, key).unwrap(),
            ca_pem,
        }
    }

    fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn server_tls(&self, names: &[&str]) -> tonic::transport::ServerTlsConfig {
        let (cert, key) = self.leaf(names);
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert, key))
            .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca_pem))
    }

    /// A server that asks for no client certificate, so only the agent's check can refuse it.
    fn open_server_tls(&self, names: &[&str]) -> tonic::transport::ServerTlsConfig {
        let (cert, key) = self.leaf(names);
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert, key))
    }

    fn agent(&self) -> Identity {
        let (cert_pem, key_pem) = self.leaf(&["n1.agent.berth"]);
        Identity {
            cert_pem,
            key_pem,
            ca_pem: self.ca_pem.clone(),
        }
    }
}

#[tokio::test]
async fn mutual_tls_with_the_controller_name() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = Pki::new();
    // An impostor: right CA, but its certificate does not name the controller role.
    let impostor = Fake::default();
    let ia = serve(
        impostor.clone(),
        Some(pki.open_server_tls(&["n2.agent.berth", "127.0.0.1"])),
    )
    .await
    .to_string();
    let real = Fake::default();
    let ra = serve(
        real.clone(),
        Some(pki.server_tls(&[berth_proto::CONTROLLER_TLS_NAME, "127.0.0.1"])),
    )
    .await
    .to_string();
    for f in [&impostor, &real] {
        f.with(|x| {
            x.leader = true;
            x.controllers = vec![ia.clone(), ra.clone()];
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let hb = Heartbeat::new(
        "n1".into(),
        dir.path().to_path_buf(),
        Some(client_tls(&pki.agent())),
        Fixed,
        vec![ia.clone(), ra.clone()],
    )
    .with_timing(timing());
    let _task = Abort(tokio::spawn(hb.run()));
    wait_for("beats over mutual TLS", Duration::from_secs(10), || {
        real.with(|x| x.seen.len() >= 2)
    })
    .await;
    assert!(
        real.with(|x| x.client_cert),
        "the agent presented no certificate"
    );
    assert!(
        impostor.with(|x| x.seen.is_empty()),
        "a server without the controller name got heartbeats"
    );

    // A controller certificate from another CA is refused too.
    let other = Pki::new();
    let stranger = Fake::default();
    stranger.with(|x| x.leader = true);
    let sa = serve(
        stranger.clone(),
        Some(other.open_server_tls(&[berth_proto::CONTROLLER_TLS_NAME])),
    )
    .await
    .to_string();
    let dir2 = tempfile::tempdir().unwrap();
    let hb = Heartbeat::new(
        "n1".into(),
        dir2.path().to_path_buf(),
        Some(client_tls(&pki.agent())),
        Fixed,
        vec![sa],
    )
    .with_timing(timing());
    let _task2 = Abort(tokio::spawn(hb.run()));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        stranger.with(|x| x.seen.is_empty()),
        "a controller from another CA got heartbeats"
    );
}

#[tokio::test]
async fn silent_controllers_are_each_tried_once_per_round() {
    let fakes = [Fake::default(), Fake::default(), Fake::default()];
    let mut addrs = Vec::new();
    for f in &fakes {
        f.with(|x| x.hang = true);
        addrs.push(serve(f.clone(), None).await.to_string());
    }
    let dir = tempfile::tempdir().unwrap();
    let hb = Heartbeat::new("n1".into(), dir.path().to_path_buf(), None, Fixed, addrs)
        .with_timing(timing());
    let _task = Abort(tokio::spawn(hb.run()));
    // A round is 3 calls of 400 ms then a 100 ms pause: in 2.6 s two rounds, so each controller
    // sees 2 calls (3 at most, with timing slack).
    tokio::time::sleep(Duration::from_millis(2600)).await;
    for f in &fakes {
        let n = f.with(|x| x.seen.len());
        assert!((1..=3).contains(&n), "{n} calls to one controller");
    }
}

#[tokio::test]
async fn a_stale_leader_does_not_hide_the_real_one() {
    // A still names a dead controller as leader; B leads. Known order: dead, A, B.
    let (a, b) = (Fake::default(), Fake::default());
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let aa = serve(a.clone(), None).await.to_string();
    let ba = serve(b.clone(), None).await.to_string();
    let all = vec![dead.clone(), aa.clone(), ba.clone()];
    a.with(|x| {
        x.names_leader = dead.clone();
        x.controllers = all.clone();
    });
    b.with(|x| {
        x.leader = true;
        x.controllers = all.clone();
    });
    let dir = tempfile::tempdir().unwrap();
    let hb = Heartbeat::new("n1".into(), dir.path().to_path_buf(), None, Fixed, all)
        .with_timing(timing());
    let _task = Abort(tokio::spawn(hb.run()));
    wait_for("beats at the real leader", Duration::from_secs(5), || {
        b.with(|x| x.seen.len() >= 2)
    })
    .await;
}

#[tokio::test]
async fn a_restarted_agent_continues_its_sequence() {
    let leader = Fake::default();
    let la = serve(leader.clone(), None).await.to_string();
    leader.with(|x| {
        x.leader = true;
        x.controllers = vec![la.clone()];
    });
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        let hb = Heartbeat::new(
            "n1".into(),
            dir.path().to_path_buf(),
            None,
            Fixed,
            vec![la.clone()],
        )
        .with_timing(timing());
        Abort(tokio::spawn(hb.run()))
    };
    let first = start();
    wait_for("beats", Duration::from_secs(5), || {
        leader.with(|x| x.seen.len() >= 3)
    })
    .await;
    drop(first);
    let before = leader.with(|x| x.seen.len());
    let _second = start();
    wait_for("beats after the restart", Duration::from_secs(5), || {
        leader.with(|x| x.seen.len() >= before + 2)
    })
    .await;
    let seen = leader.with(|x| x.seen.clone());
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
}

#[tokio::test]
async fn beats_say_recovering_until_recovery_has_finished() {
    let leader = Fake::default();
    let la = serve(leader.clone(), None).await.to_string();
    leader.with(|x| {
        x.leader = true;
        x.controllers = vec![la.clone()];
    });
    let dir = tempfile::tempdir().unwrap();
    let recovering = Arc::new(AtomicBool::new(true));
    let hb = Heartbeat::new(
        "n1".into(),
        dir.path().to_path_buf(),
        None,
        Fixed,
        vec![la.clone()],
    )
    .with_timing(timing())
    .with_recovering(recovering.clone());
    let _task = Abort(tokio::spawn(hb.run()));
    wait_for("beats while recovering", Duration::from_secs(5), || {
        leader.with(|x| x.seen.len() >= 2)
    })
    .await;
    recovering.store(false, Ordering::Release);
    let before = leader.with(|x| x.seen.len());
    wait_for("beats after recovery", Duration::from_secs(5), || {
        leader.with(|x| x.seen.len() >= before + 3)
    })
    .await;
    let flags = leader.with(|x| x.recovering.clone());
    assert!(flags[..before].iter().all(|r| *r), "{flags:?}");
    // At most the beat in flight when the flag changed still says recovering.
    assert!(flags[before + 1..].iter().all(|r| !*r), "{flags:?}");
}

#[tokio::test]
async fn configured_controllers_are_tried_after_a_stale_file() {
    // controllers.json names only a dead controller; the configured one leads.
    let leader = Fake::default();
    let la = serve(leader.clone(), None).await.to_string();
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    leader.with(|x| {
        x.leader = true;
        x.controllers = vec![la.clone()];
    });
    let dir = tempfile::tempdir().unwrap();
    KnownControllers {
        controllers: vec![dead.clone()],
        leader: dead.clone(),
    }
    .save(dir.path())
    .unwrap();
    let hb = Heartbeat::new(
        "n1".into(),
        dir.path().to_path_buf(),
        None,
        Fixed,
        vec![la.clone()],
    )
    .with_timing(timing());
    let _task = Abort(tokio::spawn(hb.run()));
    wait_for(
        "beats at the configured controller",
        Duration::from_secs(10),
        || leader.with(|x| x.seen.len() >= 2),
    )
    .await;
}
