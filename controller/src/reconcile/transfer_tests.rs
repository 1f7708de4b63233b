//! The reconciler's copies and moves against fake agents (gRPC over TLS on loopback, as real
//! agents are reached): the calls each node gets, in order, the switch, and the undo.

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use berth_proto::api::{InstanceStatusCode, Operation, OperationStatus, TransferMetadata};
use berth_proto::v1::{self, agent_server};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::*;
use crate::api::AppState;
use crate::api::key_hash;
use crate::api::projects::testkit::Api;
use crate::reconcile::Outcome;
use crate::state::{JoinKind, JoinTokenRecord};

type Log = Arc<Mutex<Vec<String>>>;
type Stream2<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A fake agent: records every call as "node method detail" in the shared log, keeps which
/// instances exist and run, fails the calls named in `fail`, and answers sends with the byte
/// counts queued in `sends` (then 0).
struct Fake {
    node: String,
    log: Log,
    fail: Arc<Mutex<HashSet<String>>>,
    sends: Arc<Mutex<VecDeque<u64>>>,
    /// Instance name -> running.
    instances: Arc<Mutex<HashMap<String, bool>>>,
}

impl Fake {
    fn note(&self, what: String) -> Result<(), Status> {
        let method = what.split(' ').next().unwrap_or_default().to_string();
        self.log
            .lock()
            .unwrap()
            .push(format!("{} {what}", self.node));
        if self.fail.lock().unwrap().contains(&method) {
            return Err(Status::failed_precondition(format!("{method} broke")));
        }
        Ok(())
    }

    fn status(&self, name: &str) -> v1::InstanceStatus {
        let running = self
            .instances
            .lock()
            .unwrap()
            .get(name)
            .copied()
            .unwrap_or(false);
        v1::InstanceStatus {
            name: name.to_string(),
            state: if running {
                v1::InstanceState::Running as i32
            } else {
                v1::InstanceState::Stopped as i32
            },
            pid: if running { 42 } else { 0 },
            ..Default::default()
        }
    }
}

fn unimplemented<T>() -> Result<T, Status> {
    Err(Status::unimplemented("not in the fake"))
}

#[tonic::async_trait]
impl agent_server::Agent for Fake {
    type ExecStream = Stream2<v1::ExecOutput>;
    type PullFileStream = Stream2<v1::FilePullChunk>;
    type ExportImageStream = Stream2<v1::ExportImageChunk>;
    type SendInstanceStream = Stream2<v1::TransferProgress>;
    type SendImageStream = Stream2<v1::TransferProgress>;

    async fn info(&self, _: Request<v1::InfoRequest>) -> Result<Response<v1::NodeInfo>, Status> {
        unimplemented()
    }
    async fn create_instance(
        &self,
        r: Request<v1::CreateInstanceRequest>,
    ) -> Result<Response<v1::InstanceStatus>, Status> {
        let r = r.into_inner();
        let spec = r.spec.unwrap_or_default();
        let net = spec.network.clone().unwrap_or_default();
        self.note(format!(
            "create {} existing={} ip={} mac={}",
            spec.name, r.existing_volume, net.ipv4_cidr, net.hwaddr
        ))?;
        self.instances
            .lock()
            .unwrap()
            .entry(spec.name.clone())
            .or_insert(false);
        Ok(Response::new(self.status(&spec.name)))
    }
    async fn start_instance(
        &self,
        r: Request<v1::InstanceRef>,
    ) -> Result<Response<v1::InstanceStatus>, Status> {
        let name = r.into_inner().name;
        self.note(format!("start {name}"))?;
        self.instances.lock().unwrap().insert(name.clone(), true);
        Ok(Response::new(self.status(&name)))
    }
    async fn stop_instance(
        &self,
        r: Request<v1::StopInstanceRequest>,
    ) -> Result<Response<v1::InstanceStatus>, Status> {
        let r = r.into_inner();
        self.note(format!("stop {} timeout={}", r.name, r.timeout_secs))?;
        self.instances.lock().unwrap().insert(r.name.clone(), false);
        Ok(Response::new(self.status(&r.name)))
    }
    async fn restart_instance(
        &self,
        _: Request<v1::StopInstanceRequest>,
    ) -> Result<Response<v1::InstanceStatus>, Status> {
        unimplemented()
    }
    async fn delete_instance(
        &self,
        r: Request<v1::DeleteInstanceRequest>,
    ) -> Result<Response<v1::DeleteInstanceResponse>, Status> {
        let name = r.into_inner().name;
        self.note(format!("delete {name}"))?;
        match self.instances.lock().unwrap().remove(&name) {
            Some(_) => Ok(Response::new(v1::DeleteInstanceResponse {})),
            None => Err(Status::not_found("no such instance")),
        }
    }
    async fn instance_state(
        &self,
        _: Request<v1::InstanceRef>,
    ) -> Result<Response<v1::InstanceStatus>, Status> {
        unimplemented()
    }
    async fn list_instances(
        &self,
        _: Request<v1::ListInstancesRequest>,
    ) -> Result<Response<v1::ListInstancesResponse>, Status> {
        unimplemented()
    }
    async fn update_instance(
        &self,
        r: Request<v1::UpdateInstanceRequest>,
    ) -> Result<Response<v1::InstanceStatus>, Status> {
        let name = r.into_inner().name;
        self.note(format!("update {name}"))?;
        Ok(Response::new(self.status(&name)))
    }
    async fn rename_instance(
        &self,
        _: Request<v1::RenameInstanceRequest>,
    ) -> Result<Response<v1::InstanceStatus>, Status> {
        unimplemented()
    }
    async fn console_log(
        &self,
        _: Request<v1::ConsoleLogRequest>,
    ) -> Result<Response<v1::ConsoleLogResponse>, Status> {
        unimplemented()
    }
    async fn exec(
        &self,
        _: Request<Streaming<v1::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        unimplemented()
    }
    async fn push_file(
        &self,
        _: Request<Streaming<v1::FilePushChunk>>,
    ) -> Result<Response<v1::FileInfo>, Status> {
        unimplemented()
    }
    async fn pull_file(
        &self,
        _: Request<v1::FilePullRequest>,
    ) -> Result<Response<Self::PullFileStream>, Status> {
        unimplemented()
    }
    async fn delete_file(
        &self,
        _: Request<v1::FileDeleteRequest>,
    ) -> Result<Response<v1::FileDeleteResponse>, Status> {
        unimplemented()
    }
    async fn build_image(
        &self,
        _: Request<v1::BuildImageRequest>,
    ) -> Result<Response<v1::Image>, Status> {
        unimplemented()
    }
    async fn import_image(
        &self,
        _: Request<Streaming<v1::ImageImportChunk>>,
    ) -> Result<Response<v1::Image>, Status> {
        unimplemented()
    }
    async fn list_images(
        &self,
        _: Request<v1::ListImagesRequest>,
    ) -> Result<Response<v1::ListImagesResponse>, Status> {
        unimplemented()
    }
    async fn delete_image(
        &self,
        _: Request<v1::DeleteImageRequest>,
    ) -> Result<Response<v1::DeleteImageResponse>, Status> {
        unimplemented()
    }
    async fn create_snapshot(
        &self,
        _: Request<v1::SnapshotRequest>,
    ) -> Result<Response<v1::SnapshotInfo>, Status> {
        unimplemented()
    }
    async fn delete_snapshot(
        &self,
        _: Request<v1::SnapshotRequest>,
    ) -> Result<Response<v1::DeleteSnapshotResponse>, Status> {
        unimplemented()
    }
    async fn rename_snapshot(
        &self,
        _: Request<v1::RenameSnapshotRequest>,
    ) -> Result<Response<v1::SnapshotInfo>, Status> {
        unimplemented()
    }
    async fn list_snapshots(
        &self,
        _: Request<v1::InstanceRef>,
    ) -> Result<Response<v1::ListSnapshotsResponse>, Status> {
        unimplemented()
    }
    async fn restore_snapshot(
        &self,
        _: Request<v1::SnapshotRequest>,
    ) -> Result<Response<v1::InstanceStatus>, Status> {
        unimplemented()
    }
    async fn copy_volume(
        &self,
        r: Request<v1::CopyVolumeRequest>,
    ) -> Result<Response<v1::CopyVolumeResponse>, Status> {
        let r = r.into_inner();
        self.note(format!(
            "copy_volume {}->{} snapshot={:?} instance_only={} refresh={}",
            r.source, r.target, r.source_snapshot, r.instance_only, r.refresh
        ))?;
        Ok(Response::new(v1::CopyVolumeResponse {}))
    }
    async fn publish_image(
        &self,
        _: Request<v1::PublishImageRequest>,
    ) -> Result<Response<v1::Image>, Status> {
        unimplemented()
    }
    async fn export_image(
        &self,
        _: Request<v1::ExportImageRequest>,
    ) -> Result<Response<Self::ExportImageStream>, Status> {
        unimplemented()
    }
    async fn expect_transfer(
        &self,
        r: Request<v1::ExpectTransferRequest>,
    ) -> Result<Response<v1::ExpectTransferResponse>, Status> {
        let r = r.into_inner();
        self.note(format!(
            "expect_transfer {} {} from={} refresh={}",
            r.ticket, r.name, r.source_node, r.refresh
        ))?;
        Ok(Response::new(v1::ExpectTransferResponse {}))
    }
    async fn send_instance(
        &self,
        r: Request<v1::SendInstanceRequest>,
    ) -> Result<Response<Self::SendInstanceStream>, Status> {
        let r = r.into_inner();
        let mode = v1::SendMode::try_from(r.mode).unwrap_or_default();
        self.note(format!(
            "send_instance {:?} {}->{}@{} {} snapshot={:?}",
            mode, r.instance, r.target_instance, r.target_node, r.ticket, r.source_snapshot
        ))?;
        let bytes = self.sends.lock().unwrap().pop_front().unwrap_or(0);
        let reports = vec![
            Ok(v1::TransferProgress {
                bytes_sent: bytes / 2,
                rate: bytes,
                volume: "rootfs".into(),
                ..Default::default()
            }),
            Ok(v1::TransferProgress {
                bytes_sent: bytes,
                done: true,
                ..Default::default()
            }),
        ];
        Ok(Response::new(Box::pin(tokio_stream::iter(reports))))
    }
    async fn send_image(
        &self,
        _: Request<v1::SendImageRequest>,
    ) -> Result<Response<Self::SendImageStream>, Status> {
        unimplemented()
    }
    async fn commit_transfer(
        &self,
        r: Request<v1::TransferRef>,
    ) -> Result<Response<v1::CommitTransferResponse>, Status> {
        self.note(format!("commit_transfer {}", r.into_inner().ticket))?;
        Ok(Response::new(v1::CommitTransferResponse::default()))
    }
    async fn abort_transfer(
        &self,
        r: Request<v1::TransferRef>,
    ) -> Result<Response<v1::AbortTransferResponse>, Status> {
        self.note(format!("abort_transfer {}", r.into_inner().ticket))?;
        Ok(Response::new(v1::AbortTransferResponse {}))
    }
}

/// Two fake nodes, n1 and n2, members of a test cluster, with the controller's state.
struct Rig {
    api: Api,
    state: Arc<AppState>,
    log: Log,
    fail: Arc<Mutex<HashSet<String>>>,
    sends: Arc<Mutex<VecDeque<u64>>>,
    instances: HashMap<String, Arc<Mutex<HashMap<String, bool>>>>,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for s in &self.servers {
            s.abort();
        }
    }
}

impl Rig {
    async fn start() -> Rig {
        let api = Api::start().await;
        let ca = crate::tls::ClusterCa::generate("fake").unwrap();
        let state = AppState::for_test(api.cp.clone(), ca.clone());
        let log: Log = Arc::default();
        let fail: Arc<Mutex<HashSet<String>>> = Arc::default();
        let sends: Arc<Mutex<VecDeque<u64>>> = Arc::default();
        let mut instances = HashMap::new();
        let mut servers = Vec::new();
        for (n, name) in ["n1", "n2"].into_iter().enumerate() {
            let cert = ca
                .issue(name, &[crate::agents::agent_tls_name(name)])
                .unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let held: Arc<Mutex<HashMap<String, bool>>> = Arc::default();
            instances.insert(name.to_string(), held.clone());
            let fake = Fake {
                node: name.to_string(),
                log: log.clone(),
                fail: fail.clone(),
                sends: sends.clone(),
                instances: held,
            };
            let tls = tonic::transport::ServerTlsConfig::new().identity(
                tonic::transport::Identity::from_pem(&cert.cert_pem, &cert.key_pem),
            );
            let server = tonic::transport::Server::builder()
                .tls_config(tls)
                .unwrap()
                .add_service(agent_server::AgentServer::new(fake))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
            servers.push(tokio::spawn(async move {
                let _ = server.await;
            }));
            let secret = format!("t-{name}");
            api.cp
                .write(Command::AddJoinToken {
                    hash: key_hash(&secret),
                    record: JoinTokenRecord {
                        node_name: name.into(),
                        kind: JoinKind::Node,
                        created_at: clock::now(),
                        expires_at: clock::after(Duration::from_secs(60)),
                    },
                })
                .await
                .unwrap();
            api.cp
                .write(Command::JoinNode {
                    token_hash: key_hash(&secret),
                    node: Node {
                        name: name.into(),
                        address: addr.to_string(),
                        ipv4_cidr: format!("10.87.{}.1/24", n + 1),
                        cpus: 4,
                        memory_bytes: 8 << 30,
                        ..Default::default()
                    },
                    now: clock::now(),
                })
                .await
                .unwrap();
        }
        api.cp
            .write(Command::PutImage {
                image: crate::state::Image {
                    fingerprint: "img".into(),
                    locations: ["n1".to_string(), "n2".to_string()].into(),
                    ..Default::default()
                },
            })
            .await
            .unwrap();
        Rig {
            api,
            state,
            log,
            fail,
            sends,
            instances,
            servers,
        }
    }

    /// Instance `web` on n1, known to n1's agent, `running` or not.
    async fn web(&self, running: bool) -> Instance {
        self.api.add_instance("default", "web", &[]).await;
        self.instances["n1"]
            .lock()
            .unwrap()
            .insert("web".into(), running);
        if running {
            crate::api::transfers::testsupport::observe(
                &self.api,
                "web",
                InstanceStatusCode::Running,
            )
            .await;
        }
        self.api.model().await.instances["web"].clone()
    }

    /// Records `action` as pending on `name` with a running operation; returns it.
    async fn pend(&self, name: &str, action: Action) -> PendingAction {
        let op = uuid::Uuid::new_v4().to_string();
        let pending = PendingAction {
            op: op.clone(),
            action,
            since: clock::now(),
        };
        self.api
            .cp
            .write(Command::SetInstanceAction {
                name: name.into(),
                pending: pending.clone(),
                desired: None,
                operation: Operation {
                    id: op,
                    status: OperationStatus::Running,
                    ..Default::default()
                },
                now: clock::now(),
            })
            .await
            .unwrap();
        pending
    }

    fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    async fn metadata(&self, op: &str) -> TransferMetadata {
        let m = self.api.model().await;
        serde_json::from_value(m.operations[op].metadata.clone()).unwrap_or_default()
    }
}

/// What an outcome was, for assertions.
fn shown(o: &Outcome) -> String {
    match o {
        Outcome::Done(obs) => format!("done {:?}", obs.as_ref().map(|o| o.status)),
        Outcome::Failed(obs, e) => format!("failed {:?}: {e}", obs.as_ref().map(|o| o.status)),
        Outcome::Retry(e) => format!("retry: {e}"),
        Outcome::Gone => "gone".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_move_sends_once_switches_and_cleans_the_source() {
    let rig = Rig::start().await;
    let web = rig.web(false).await;
    rig.sends.lock().unwrap().push_back(5 << 20);
    let p = rig
        .pend(
            "web",
            Action::Migrate {
                from: "n1".into(),
                to: "n2".into(),
                live: false,
            },
        )
        .await;
    let out = crate::reconcile::execute(&rig.state, "web", &p).await;
    assert_eq!(shown(&out), "done Some(Stopped)");
    let t = ticket_for(&p.op);
    let spec = format!("ip={}/24 mac={}", web.ipv4, web.hwaddr);
    assert_eq!(
        rig.take_log(),
        [
            "n2 delete web".to_string(),
            format!("n2 abort_transfer {t}"),
            format!("n1 abort_transfer {t}"),
            format!("n2 expect_transfer {t} web from=n1 refresh=false"),
            format!("n1 send_instance Full web->web@n2 {t} snapshot=\"\""),
            format!("n2 commit_transfer {t}"),
            format!("n2 create web existing=true {spec}"),
            "n1 delete web".to_string(),
            format!("n1 abort_transfer {t}"),
        ]
    );
    let m = rig.api.model().await;
    assert_eq!(m.instances["web"].node, "n2");
    assert_eq!(m.instances["web"].ipv4, web.ipv4, "the address stays");
    let meta = rig.metadata(&p.op).await;
    assert_eq!(meta.passes.len(), 1);
    assert_eq!(meta.passes[0].kind, "full");
    assert_eq!(meta.bytes, 5 << 20);
    assert_eq!(meta.downtime_ms, None);
    rig.api.cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_move_precopies_until_a_pass_is_small_then_stops_briefly() {
    let rig = Rig::start().await;
    rig.web(true).await;
    rig.sends
        .lock()
        .unwrap()
        .extend([300 << 20, 40 << 20, 1 << 20, 100 << 10]);
    let p = rig
        .pend(
            "web",
            Action::Migrate {
                from: "n1".into(),
                to: "n2".into(),
                live: true,
            },
        )
        .await;
    let out = crate::reconcile::execute(&rig.state, "web", &p).await;
    assert_eq!(shown(&out), "done Some(Running)");
    let log: Vec<String> = rig
        .take_log()
        .into_iter()
        .filter(|l| !l.contains("abort_transfer") && !l.contains("expect_transfer"))
        .map(|l| l.split(" op-").next().unwrap_or_default().to_string())
        .map(|l| l.split(" ip=").next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        log,
        [
            "n2 delete web",
            "n1 send_instance Precopy web->web@n2",
            "n1 send_instance Precopy web->web@n2",
            "n1 send_instance Precopy web->web@n2",
            "n1 stop web timeout=0",
            "n1 send_instance Final web->web@n2",
            "n2 commit_transfer",
            "n2 create web existing=true",
            "n2 start web",
            "n1 delete web",
        ]
    );
    let meta = rig.metadata(&p.op).await;
    let kinds: Vec<&str> = meta.passes.iter().map(|p| p.kind.as_str()).collect();
    assert_eq!(kinds, ["pre-copy", "pre-copy", "pre-copy", "final"]);
    assert_eq!(
        meta.bytes,
        (300 << 20) + (40 << 20) + (1 << 20) + (100 << 10)
    );
    assert!(meta.downtime_ms.is_some());
    assert_eq!(rig.api.model().await.instances["web"].node, "n2");
    rig.api.cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_move_that_fails_before_the_switch_runs_again_on_its_node() {
    let rig = Rig::start().await;
    rig.web(true).await;
    rig.fail.lock().unwrap().insert("commit_transfer".into());
    let p = rig
        .pend(
            "web",
            Action::Migrate {
                from: "n1".into(),
                to: "n2".into(),
                live: true,
            },
        )
        .await;
    let out = crate::reconcile::execute(&rig.state, "web", &p).await;
    let text = shown(&out);
    assert!(
        text.starts_with("failed Some(Running): could not move the instance to node n2"),
        "{text}"
    );
    assert!(text.contains("commit_transfer broke"), "{text}");
    let log = rig.take_log();
    let tail: Vec<&str> = log
        .iter()
        .rev()
        .take(4)
        .rev()
        .map(|l| l.split(" op-").next().unwrap_or_default())
        .collect();
    assert_eq!(
        tail,
        [
            "n2 abort_transfer",
            "n2 delete web",
            "n1 abort_transfer",
            "n1 start web"
        ]
    );
    assert_eq!(rig.api.model().await.instances["web"].node, "n1");
    assert!(rig.instances["n1"].lock().unwrap()["web"], "running again");
    rig.api.cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_after_the_switch_only_cleans_the_source() {
    let rig = Rig::start().await;
    rig.web(false).await;
    let p = rig
        .pend(
            "web",
            Action::Migrate {
                from: "n1".into(),
                to: "n2".into(),
                live: false,
            },
        )
        .await;
    rig.api
        .cp
        .write(Command::SwitchNode {
            name: "web".into(),
            op: p.op.clone(),
            node: "n2".into(),
        })
        .await
        .unwrap();
    let out = crate::reconcile::execute(&rig.state, "web", &p).await;
    assert_eq!(shown(&out), "done None");
    let t = ticket_for(&p.op);
    assert_eq!(
        rig.take_log(),
        [
            "n1 delete web".to_string(),
            format!("n1 abort_transfer {t}")
        ]
    );
    rig.api.cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_on_the_same_node_snapshot_and_on_another_node_send() {
    let rig = Rig::start().await;
    rig.web(false).await;
    for (name, node) in [("c1", "n1"), ("c2", "n2")] {
        rig.api
            .cp
            .write(Command::CreateInstance {
                instance: Instance {
                    name: name.into(),
                    node: node.into(),
                    image: "img".into(),
                    created_at: clock::now(),
                    hwaddr: "00:16:3e:00:00:0c".into(),
                    observed: Observed {
                        status: InstanceStatusCode::Pending,
                        ..Default::default()
                    },
                    pending: Some(PendingAction {
                        op: format!("op{name}"),
                        action: Action::CopyFrom {
                            source: "web".into(),
                            snapshot: String::new(),
                            instance_only: false,
                            refresh: false,
                            start: true,
                        },
                        since: clock::now(),
                    }),
                    ..Default::default()
                },
                operation: Some(Operation {
                    id: format!("op{name}"),
                    status: OperationStatus::Running,
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }
    let m = rig.api.model().await;
    let p1 = m.instances["c1"].pending.clone().unwrap();
    let out = crate::reconcile::execute(&rig.state, "c1", &p1).await;
    assert_eq!(shown(&out), "done Some(Running)");
    let log: Vec<String> = rig
        .take_log()
        .into_iter()
        .map(|l| l.split(" ip=").next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        log,
        [
            "n1 delete c1",
            "n1 copy_volume web->c1 snapshot=\"\" instance_only=false refresh=false",
            "n1 create c1 existing=true",
            "n1 start c1",
        ]
    );
    // Another node: a send that breaks leaves nothing on either side, and the record is
    // still Pending (FinishAction removes it).
    rig.fail.lock().unwrap().insert("send_instance".into());
    let p2 = m.instances["c2"].pending.clone().unwrap();
    let out = crate::reconcile::execute(&rig.state, "c2", &p2).await;
    let text = shown(&out);
    assert!(
        text.starts_with("failed None: could not send instance web"),
        "{text}"
    );
    let t = ticket_for("opc2");
    assert_eq!(
        rig.take_log(),
        [
            "n2 delete c2".to_string(),
            format!("n2 abort_transfer {t}"),
            format!("n1 abort_transfer {t}"),
            format!("n2 expect_transfer {t} c2 from=n1 refresh=false"),
            format!("n1 send_instance Full web->c2@n2 {t} snapshot=\"\""),
            format!("n2 abort_transfer {t}"),
            format!("n1 abort_transfer {t}"),
        ]
    );
    assert_eq!(
        rig.api.model().await.instances["c2"].observed.status,
        InstanceStatusCode::Pending
    );
    // Without the fault it goes through: commit, create, start on n2.
    rig.fail.lock().unwrap().clear();
    let out = crate::reconcile::execute(&rig.state, "c2", &p2).await;
    assert_eq!(shown(&out), "done Some(Running)");
    let tail: Vec<String> = rig
        .take_log()
        .into_iter()
        .rev()
        .take(3)
        .rev()
        .map(|l| l.split(" ip=").next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        tail,
        [
            format!("n2 commit_transfer {t}"),
            "n2 create c2 existing=true".to_string(),
            "n2 start c2".to_string()
        ]
    );
    rig.api.cp.shutdown().await;
}

/// Polls the model until `f` holds (at most 8 s, under the liveness threshold).
async fn until(rig: &Rig, what: &str, f: impl Fn(&crate::state::State) -> bool) {
    for _ in 0..80 {
        if f(&rig.api.model().await) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Posts a member state change and waits for its operation; answers the operation.
async fn member_state(rig: &Rig, body: serde_json::Value) -> Operation {
    use crate::api::projects::testkit::OPERATOR;
    let (s, answer) = rig
        .api
        .call(
            OPERATOR,
            "POST",
            "/1.0/cluster/members/n1/state",
            Some(body),
        )
        .await;
    assert_eq!(s, 202, "{answer}");
    let id = answer["metadata"]["id"].as_str().unwrap().to_string();
    until(rig, "the evacuation operation", |m| {
        m.operations[&id].status.is_final()
    })
    .await;
    rig.api.model().await.operations[&id].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evacuation_moves_everything_away_and_restore_brings_it_back() {
    let rig = Rig::start().await;
    rig.web(true).await;
    rig.api.add_instance("default", "db", &[]).await;
    rig.instances["n1"]
        .lock()
        .unwrap()
        .insert("db".into(), false);
    let reconciler = tokio::spawn(crate::reconcile::run(rig.state.clone()));
    let op = member_state(&rig, serde_json::json!({"action": "evacuate"})).await;
    assert_eq!(op.status, OperationStatus::Success, "{}", op.err);
    let results: Vec<(String, String, String)> = op.metadata["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["instance"].as_str().unwrap().to_string(),
                r["result"].as_str().unwrap().to_string(),
                r["node"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        results,
        [
            ("db".to_string(), "moved".to_string(), "n2".to_string()),
            ("web".to_string(), "moved".to_string(), "n2".to_string())
        ]
    );
    let m = rig.api.model().await;
    assert!(m.nodes["n1"].evacuated);
    for (name, was_running) in [("web", true), ("db", false)] {
        let i = &m.instances[name];
        assert_eq!(i.node, "n2", "{name}");
        assert!(i.pending.is_none(), "{name}");
        let mark = i.evacuated_from.clone().unwrap();
        assert_eq!((mark.node.as_str(), mark.mode.as_str()), ("n1", "move"));
        assert_eq!(mark.was_running, was_running, "{name}");
    }
    assert_eq!(
        m.instances["web"].observed.status,
        InstanceStatusCode::Running
    );
    assert!(rig.instances["n2"].lock().unwrap()["web"]);
    assert!(rig.instances["n1"].lock().unwrap().is_empty());

    let op = member_state(&rig, serde_json::json!({"action": "restore"})).await;
    assert_eq!(op.status, OperationStatus::Success, "{}", op.err);
    let m = rig.api.model().await;
    assert!(!m.nodes["n1"].evacuated);
    for name in ["web", "db"] {
        let i = &m.instances[name];
        assert_eq!(i.node, "n1", "{name}");
        assert_eq!(i.evacuated_from, None, "{name}");
    }
    assert_eq!(
        m.instances["web"].observed.status,
        InstanceStatusCode::Running
    );
    assert_eq!(
        m.instances["db"].observed.status,
        InstanceStatusCode::Stopped
    );
    assert!(rig.instances["n1"].lock().unwrap()["web"]);
    assert!(rig.instances["n2"].lock().unwrap().is_empty());
    reconciler.abort();
    rig.api.cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evacuation_by_stopping_remembers_what_ran() {
    let rig = Rig::start().await;
    rig.web(true).await;
    let reconciler = tokio::spawn(crate::reconcile::run(rig.state.clone()));
    let op = member_state(
        &rig,
        serde_json::json!({"action": "evacuate", "mode": "stop"}),
    )
    .await;
    assert_eq!(op.status, OperationStatus::Success, "{}", op.err);
    assert_eq!(op.metadata["instances"][0]["result"], "stopped");
    let m = rig.api.model().await;
    let web = &m.instances["web"];
    assert_eq!(web.node, "n1");
    assert_eq!(web.observed.status, InstanceStatusCode::Stopped);
    assert!(web.evacuated_from.as_ref().unwrap().was_running);
    // Evacuating again keeps the mark (it still knows the instance ran).
    let op = member_state(
        &rig,
        serde_json::json!({"action": "evacuate", "mode": "stop"}),
    )
    .await;
    assert_eq!(op.status, OperationStatus::Success, "{}", op.err);
    assert!(
        rig.api.model().await.instances["web"]
            .evacuated_from
            .as_ref()
            .unwrap()
            .was_running
    );
    let op = member_state(&rig, serde_json::json!({"action": "restore"})).await;
    assert_eq!(op.status, OperationStatus::Success, "{}", op.err);
    assert_eq!(op.metadata["instances"][0]["result"], "started");
    let m = rig.api.model().await;
    assert_eq!(
        m.instances["web"].observed.status,
        InstanceStatusCode::Running
    );
    assert_eq!(m.instances["web"].evacuated_from, None);
    reconciler.abort();
    rig.api.cp.shutdown().await;
}
