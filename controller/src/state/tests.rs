//! Unit tests for `State::apply`.

use std::collections::BTreeMap;

use berth_proto::api::{InstanceStatusCode, Operation};

use super::*;

const NOW: &str = "2026-11-29T12:00:00Z";
const FP: &str = "aaaaaaaaaaaaaaaa0000000000000000";

fn key(id: &str, hash: &str) -> ApiKey {
    ApiKey {
        id: id.into(),
        name: id.into(),
        hash: hash.into(),
        role: Role::Admin,
        project: "default".into(),
        created_at: NOW.into(),
        expires_at: None,
    }
}

fn node(name: &str, cidr: &str) -> Node {
    Node {
        name: name.into(),
        address: "127.0.0.1:7443".into(),
        cert_fingerprint: "ff".into(),
        ipv4_cidr: cidr.into(),
        status: NodeStatus::Online,
        joined_at: NOW.into(),
        cpus: 2,
        memory_bytes: 1 << 30,
        ..Default::default()
    }
}

fn image(fp: &str, loc: &str) -> Image {
    Image {
        fingerprint: fp.into(),
        architecture: "x86_64".into(),
        locations: [loc.to_string()].into(),
        ..Default::default()
    }
}

fn inst(name: &str, node: &str) -> Instance {
    Instance {
        name: name.into(),
        node: node.into(),
        image: FP.into(),
        created_at: NOW.into(),
        ..Default::default()
    }
}

fn ok(s: &mut State, cmd: Command) -> ApplyOk {
    match s.apply(cmd) {
        Ok(v) => v,
        Err(e) => panic!("apply failed: {e}"),
    }
}

/// Applies `cmd`, expects an error of `kind`, and checks the state is unchanged.
fn rejected(s: &mut State, cmd: Command, kind: ApplyErrorKind) -> ApplyError {
    let before = s.clone();
    let err = s.apply(cmd).expect_err("command should be rejected");
    assert_eq!(err.kind, kind, "{err}");
    assert_eq!(*s, before, "state changed by a rejected command");
    err
}

/// A bootstrapped state with node n1 on `cidr` and image FP.
fn base(cidr: &str) -> State {
    let mut s = State::default();
    ok(
        &mut s,
        Command::Bootstrap {
            name: "c".into(),
            ca_cert_pem: "cert".into(),
            ca_key_pem: "key".into(),
            admin_key: key("admin", "h-admin"),
            now: NOW.into(),
        },
    );
    s.nodes.insert("n1".into(), node("n1", cidr));
    ok(
        &mut s,
        Command::PutImage {
            image: image(FP, "n1"),
        },
    );
    s
}

fn create(s: &mut State, name: &str) -> Result<Instance, ApplyError> {
    s.apply(Command::CreateInstance {
        instance: inst(name, "n1"),
        operation: None,
    })
    .map(|r| match r {
        ApplyOk::Instance(i) => i,
        other => panic!("create returned {other:?}"),
    })
}

#[test]
fn bootstrap_once() {
    let mut s = base("10.0.0.1/24");
    assert!(s.cluster.bootstrapped);
    assert_eq!(s.cluster.created_at, NOW);
    assert!(s.api_key_by_hash("h-admin").is_some());
    rejected(
        &mut s,
        Command::Bootstrap {
            name: "d".into(),
            ca_cert_pem: String::new(),
            ca_key_pem: String::new(),
            admin_key: key("other", "h-other"),
            now: NOW.into(),
        },
        ApplyErrorKind::Conflict,
    );
}

fn token(name: &str, expires: &str) -> JoinTokenRecord {
    JoinTokenRecord {
        node_name: name.into(),
        kind: JoinKind::Node,
        created_at: NOW.into(),
        expires_at: expires.into(),
    }
}

#[test]
fn join_node_consumes_token() {
    let mut s = base("10.0.0.1/24");
    ok(
        &mut s,
        Command::AddJoinToken {
            hash: "t1".into(),
            record: token("n2", "2026-11-29T13:00:00Z"),
        },
    );
    rejected(
        &mut s,
        Command::AddJoinToken {
            hash: "t1".into(),
            record: token("n3", "2026-11-29T13:00:00Z"),
        },
        ApplyErrorKind::Conflict,
    );
    let join = |hash: &str, name: &str, now: &str| Command::JoinNode {
        token_hash: hash.into(),
        node: node(name, "10.0.1.1/24"),
        now: now.into(),
    };
    rejected(&mut s, join("nope", "n2", NOW), ApplyErrorKind::NotFound);
    rejected(&mut s, join("t1", "n9", NOW), ApplyErrorKind::Invalid);
    ok(&mut s, join("t1", "n2", "2026-11-29T12:59:59.999Z"));
    assert!(s.nodes.contains_key("n2"));
    assert!(s.join_tokens.is_empty());
    // The token is used up.
    rejected(&mut s, join("t1", "n2", NOW), ApplyErrorKind::NotFound);
}

#[test]
fn join_token_expiry_and_duplicate_node() {
    let mut s = base("10.0.0.1/24");
    ok(
        &mut s,
        Command::AddJoinToken {
            hash: "t".into(),
            record: token("n2", "2026-11-29T13:00:00Z"),
        },
    );
    let join = |name: &str, now: &str| Command::JoinNode {
        token_hash: "t".into(),
        node: node(name, "10.0.1.1/24"),
        now: now.into(),
    };
    rejected(
        &mut s,
        join("n2", "2026-11-29T13:00:00Z"),
        ApplyErrorKind::Invalid,
    );
    // Same instant written with an offset: still expired.
    rejected(
        &mut s,
        join("n2", "2026-11-29T14:30:00+01:30"),
        ApplyErrorKind::Invalid,
    );
    rejected(&mut s, join("n2", "not a time"), ApplyErrorKind::Invalid);
    rejected(
        &mut s,
        Command::JoinNode {
            token_hash: "t".into(),
            node: node("n2", "10.0.1.1/33"),
            now: NOW.into(),
        },
        ApplyErrorKind::Invalid,
    );
    ok(
        &mut s,
        Command::AddJoinToken {
            hash: "t-n1".into(),
            record: token("n1", "2026-11-29T13:00:00Z"),
        },
    );
    rejected(
        &mut s,
        Command::JoinNode {
            token_hash: "t-n1".into(),
            node: node("n1", "10.0.1.1/24"),
            now: NOW.into(),
        },
        ApplyErrorKind::Conflict,
    );
}

#[test]
fn node_status() {
    let mut s = base("10.0.0.1/24");
    ok(
        &mut s,
        Command::SetNodeStatus {
            name: "n1".into(),
            status: NodeStatus::Offline,
        },
    );
    assert_eq!(s.nodes["n1"].status, NodeStatus::Offline);
    rejected(
        &mut s,
        Command::SetNodeStatus {
            name: "x".into(),
            status: NodeStatus::Online,
        },
        ApplyErrorKind::NotFound,
    );
}

#[test]
fn create_instance_allocates_lowest_free_address() {
    let mut s = base("10.87.3.1/24");
    let op = Operation {
        id: "op1".into(),
        ..Default::default()
    };
    let r = ok(
        &mut s,
        Command::CreateInstance {
            instance: inst("a", "n1"),
            operation: Some(op),
        },
    );
    // .0 is the network, .1 the gateway.
    assert!(matches!(r, ApplyOk::Instance(ref i) if i.ipv4 == "10.87.3.2"));
    assert!(s.operations.contains_key("op1"));
    assert_eq!(create(&mut s, "b").unwrap().ipv4, "10.87.3.3");
    assert_eq!(s.instances["b"].ipv4, "10.87.3.3");
}

#[test]
fn create_instance_errors() {
    let mut s = base("10.0.0.1/24");
    create(&mut s, "a").unwrap();
    rejected(
        &mut s,
        Command::CreateInstance {
            instance: inst("a", "n1"),
            operation: None,
        },
        ApplyErrorKind::Conflict,
    );
    rejected(
        &mut s,
        Command::CreateInstance {
            instance: inst("b", "nowhere"),
            operation: None,
        },
        ApplyErrorKind::Invalid,
    );
    let mut no_image = inst("c", "n1");
    no_image.image = "bbbb".into();
    rejected(
        &mut s,
        Command::CreateInstance {
            instance: no_image,
            operation: None,
        },
        ApplyErrorKind::NotFound,
    );
}

#[test]
fn gateway_in_the_middle_is_skipped() {
    // Gateway .2 in a /29: hosts are .1-.6, .2 is taken by the gateway.
    let mut s = base("192.168.0.2/29");
    let ips: Vec<String> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|n| create(&mut s, n).unwrap().ipv4)
        .collect();
    assert_eq!(
        ips,
        [
            "192.168.0.1",
            "192.168.0.3",
            "192.168.0.4",
            "192.168.0.5",
            "192.168.0.6"
        ]
    );
    // .7 is broadcast: the subnet is full.
    let err = rejected(
        &mut s,
        Command::CreateInstance {
            instance: inst("f", "n1"),
            operation: None,
        },
        ApplyErrorKind::Conflict,
    );
    assert!(err.message.contains("no free address"), "{err}");
}

#[test]
fn delete_frees_address_for_reuse() {
    let mut s = base("10.0.0.1/30"); // only .2 is usable
    assert_eq!(create(&mut s, "a").unwrap().ipv4, "10.0.0.2");
    assert!(create(&mut s, "b").is_err());
    ok(&mut s, Command::DeleteInstance { name: "a".into() });
    assert_eq!(create(&mut s, "b").unwrap().ipv4, "10.0.0.2");
    rejected(
        &mut s,
        Command::DeleteInstance { name: "a".into() },
        ApplyErrorKind::NotFound,
    );

    let mut s = base("10.0.0.1/24");
    for n in ["a", "b", "c"] {
        create(&mut s, n).unwrap();
    }
    ok(&mut s, Command::DeleteInstance { name: "b".into() });
    assert_eq!(create(&mut s, "d").unwrap().ipv4, "10.0.0.3");
}

#[test]
fn invalid_cidr_is_rejected() {
    let mut s = base("garbage");
    let err = rejected(
        &mut s,
        Command::CreateInstance {
            instance: inst("a", "n1"),
            operation: None,
        },
        ApplyErrorKind::Invalid,
    );
    assert!(err.message.contains("cidr"));
}

#[test]
fn node_without_subnet_gets_no_address() {
    let mut s = base("");
    assert_eq!(create(&mut s, "a").unwrap().ipv4, "");
    ok(
        &mut s,
        Command::AddJoinToken {
            hash: "t".into(),
            record: token("n2", "2026-11-29T13:00:00Z"),
        },
    );
    ok(
        &mut s,
        Command::JoinNode {
            token_hash: "t".into(),
            node: node("n2", ""),
            now: NOW.into(),
        },
    );
}

#[test]
fn update_rename_desired_observe() {
    let mut s = base("10.0.0.1/24");
    let ip = create(&mut s, "a").unwrap().ipv4;
    let config: BTreeMap<String, String> = [("limits.cpu".to_string(), "2".to_string())].into();
    ok(
        &mut s,
        Command::UpdateInstance {
            profiles: None,
            name: "a".into(),
            config: config.clone(),
            description: "web".into(),
            now: NOW.into(),
        },
    );
    assert_eq!(s.instances["a"].config, config);
    assert_eq!(s.instances["a"].description, "web");
    rejected(
        &mut s,
        Command::UpdateInstance {
            profiles: None,
            name: "x".into(),
            config: BTreeMap::new(),
            description: String::new(),
            now: NOW.into(),
        },
        ApplyErrorKind::NotFound,
    );

    create(&mut s, "b").unwrap();
    rejected(
        &mut s,
        Command::RenameInstance {
            from: "a".into(),
            to: "b".into(),
        },
        ApplyErrorKind::Conflict,
    );
    rejected(
        &mut s,
        Command::RenameInstance {
            from: "x".into(),
            to: "y".into(),
        },
        ApplyErrorKind::NotFound,
    );
    ok(
        &mut s,
        Command::RenameInstance {
            from: "a".into(),
            to: "c".into(),
        },
    );
    assert!(!s.instances.contains_key("a"));
    assert_eq!(s.instances["c"].name, "c");
    assert_eq!(s.instances["c"].ipv4, ip, "rename keeps the address");

    let later = "2026-11-29T12:30:00Z";
    ok(
        &mut s,
        Command::SetDesiredState {
            name: "c".into(),
            desired: DesiredState::Stopped,
            now: later.into(),
        },
    );
    assert_eq!(s.instances["c"].last_used_at, "");
    ok(
        &mut s,
        Command::SetDesiredState {
            name: "c".into(),
            desired: DesiredState::Running,
            now: later.into(),
        },
    );
    assert_eq!(s.instances["c"].desired, DesiredState::Running);
    assert_eq!(s.instances["c"].last_used_at, later);
    rejected(
        &mut s,
        Command::SetDesiredState {
            name: "x".into(),
            desired: DesiredState::Running,
            now: later.into(),
        },
        ApplyErrorKind::NotFound,
    );

    let observed = Observed {
        status: InstanceStatusCode::Running,
        pid: 42,
        updated_at: later.into(),
        error: String::new(),
    };
    let based_on = s.instances["c"].observed.updated_at.clone();
    ok(
        &mut s,
        Command::ObserveInstance {
            name: "c".into(),
            observed: observed.clone(),
            based_on,
        },
    );
    assert_eq!(s.instances["c"].observed, observed);
    let before = s.clone();
    ok(
        &mut s,
        Command::ObserveInstance {
            name: "gone".into(),
            observed,
            based_on: String::new(),
        },
    );
    assert_eq!(s, before);
}

#[test]
fn images_and_aliases() {
    let mut s = base("10.0.0.1/24");
    ok(
        &mut s,
        Command::PutImage {
            image: image(FP, "n2"),
        },
    );
    assert_eq!(
        s.images[FP].locations,
        ["n1".to_string(), "n2".to_string()].into()
    );
    let fp2 = "aaaaaaaaaaaaaaab1111";
    ok(
        &mut s,
        Command::PutImage {
            image: image(fp2, "n1"),
        },
    );
    let alias = |name: &str, target: &str| Alias {
        project: "default".into(),
        name: name.into(),
        target: target.into(),
        description: String::new(),
    };
    ok(
        &mut s,
        Command::PutAlias {
            alias: alias("debian", FP),
        },
    );
    ok(
        &mut s,
        Command::PutAlias {
            alias: alias("other", fp2),
        },
    );
    rejected(
        &mut s,
        Command::PutAlias {
            alias: alias("x", "missing"),
        },
        ApplyErrorKind::NotFound,
    );

    assert_eq!(s.resolve_image("debian").unwrap().fingerprint, FP);
    assert_eq!(s.resolve_image(FP).unwrap().fingerprint, FP);
    assert_eq!(s.resolve_image("aaaaaaaaaaaaaaaa").unwrap().fingerprint, FP);
    assert_eq!(
        s.resolve_image("aaaaaaaaaaaaaaab").unwrap().fingerprint,
        fp2
    );
    assert!(
        s.resolve_image("aaaaaaaaaaaa").is_none(),
        "ambiguous prefix"
    );
    assert!(s.resolve_image("aaaaaaaaaaa").is_none(), "prefix too short");
    assert!(s.resolve_image("nothing").is_none());

    // Re-pointing an alias is an upsert.
    ok(
        &mut s,
        Command::PutAlias {
            alias: alias("other", FP),
        },
    );
    assert_eq!(s.aliases["other"].target, FP);
    ok(
        &mut s,
        Command::PutAlias {
            alias: alias("keep", fp2),
        },
    );

    create(&mut s, "uses-it").unwrap();
    ok(
        &mut s,
        Command::DeleteImage {
            fingerprint: FP.into(),
        },
    );
    assert!(!s.images.contains_key(FP));
    assert_eq!(s.aliases.keys().collect::<Vec<_>>(), ["keep"]);
    assert!(s.instances.contains_key("uses-it"));
    rejected(
        &mut s,
        Command::DeleteImage {
            fingerprint: FP.into(),
        },
        ApplyErrorKind::NotFound,
    );
    ok(
        &mut s,
        Command::DeleteAlias {
            name: "keep".into(),
        },
    );
    rejected(
        &mut s,
        Command::DeleteAlias {
            name: "keep".into(),
        },
        ApplyErrorKind::NotFound,
    );
}

#[test]
fn operations() {
    let mut s = State::default();
    let op = |id: &str, desc: &str| Operation {
        id: id.into(),
        description: desc.into(),
        ..Default::default()
    };
    ok(
        &mut s,
        Command::PutOperation {
            operation: op("1", "a"),
        },
    );
    ok(
        &mut s,
        Command::PutOperation {
            operation: op("1", "b"),
        },
    );
    ok(
        &mut s,
        Command::PutOperation {
            operation: op("2", "c"),
        },
    );
    assert_eq!(s.operations["1"].description, "b");
    ok(
        &mut s,
        Command::DeleteOperations {
            ids: vec!["1".into(), "missing".into()],
        },
    );
    assert_eq!(s.operations.keys().collect::<Vec<_>>(), ["2"]);
}

#[test]
fn api_keys() {
    let mut s = base("10.0.0.1/24");
    ok(
        &mut s,
        Command::AddApiKey {
            key: key("k1", "h1"),
        },
    );
    assert_eq!(s.api_key_by_hash("h1").unwrap().id, "k1");
    rejected(
        &mut s,
        Command::AddApiKey {
            key: key("k1", "h2"),
        },
        ApplyErrorKind::Conflict,
    );
    rejected(
        &mut s,
        Command::AddApiKey {
            key: key("k2", "h1"),
        },
        ApplyErrorKind::Conflict,
    );
    ok(
        &mut s,
        Command::DeleteApiKey {
            id: "k1".into(),
            now: String::new(),
        },
    );
    assert!(s.api_key_by_hash("h1").is_none());
    rejected(
        &mut s,
        Command::DeleteApiKey {
            id: "k1".into(),
            now: String::new(),
        },
        ApplyErrorKind::NotFound,
    );
}

fn script() -> Vec<Command> {
    let mut cmds = vec![
        Command::Bootstrap {
            name: "c".into(),
            ca_cert_pem: "cert".into(),
            ca_key_pem: "key".into(),
            admin_key: key("admin", "h"),
            now: NOW.into(),
        },
        Command::AddJoinToken {
            hash: "t".into(),
            record: token("n1", "2027-01-01T00:00:00Z"),
        },
        Command::JoinNode {
            token_hash: "t".into(),
            node: node("n1", "10.1.0.1/24"),
            now: NOW.into(),
        },
        Command::PutImage {
            image: image(FP, "n1"),
        },
    ];
    for i in 0..20 {
        cmds.push(Command::CreateInstance {
            instance: inst(&format!("i{i}"), "n1"),
            operation: None,
        });
        if i % 3 == 0 {
            cmds.push(Command::DeleteInstance {
                name: format!("i{}", i / 2),
            });
        }
    }
    cmds.push(Command::RenameInstance {
        from: "i1".into(),
        to: "renamed".into(),
    });
    cmds.push(Command::DeleteImage {
        fingerprint: "nope".into(),
    });
    cmds
}

#[test]
fn apply_is_deterministic() {
    let run = || {
        let mut s = State::default();
        let results: Vec<ApplyResult> = script().into_iter().map(|c| s.apply(c)).collect();
        (s, results)
    };
    let (a, ra) = run();
    let (b, rb) = run();
    assert_eq!(a, b);
    assert_eq!(ra, rb);
    assert_eq!(
        serde_json::to_string(&a).unwrap(),
        serde_json::to_string(&b).unwrap()
    );
}

#[test]
fn touched_objects_round_trip() {
    // Persisting only the touched objects and reloading them must give the same state.
    let mut live = State::default();
    let mut store: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for cmd in script() {
        let keys = cmd.touched(&live);
        if live.apply(cmd).is_ok() {
            for k in keys {
                match live.encode_object(&k).unwrap() {
                    Some(v) => store.insert(k.to_storage_key(), v),
                    None => store.remove(&k.to_storage_key()),
                };
            }
        }
    }
    let mut reloaded = State::default();
    for (k, v) in &store {
        reloaded.load_object(k, v).unwrap();
    }
    assert_eq!(reloaded, live);
    let all: BTreeMap<String, Vec<u8>> = live.all_objects().unwrap().into_iter().collect();
    assert_eq!(all, store);
    assert!(reloaded.load_object("bogus/x", b"{}").is_err());
}

fn op(id: &str) -> Operation {
    Operation {
        id: id.into(),
        status: berth_proto::api::OperationStatus::Running,
        ..Default::default()
    }
}

fn pending(op: &str, action: Action) -> PendingAction {
    PendingAction {
        op: op.into(),
        action,
        since: NOW.into(),
    }
}

fn observed(status: InstanceStatusCode) -> Observed {
    Observed {
        status,
        pid: 7,
        updated_at: NOW.into(),
        error: String::new(),
    }
}

#[test]
fn actions_are_exclusive_and_finish_their_operation() {
    let mut s = base("10.0.0.1/24");
    create(&mut s, "a").unwrap();
    ok(
        &mut s,
        Command::SetInstanceAction {
            name: "a".into(),
            pending: pending("op1", Action::Start),
            desired: Some(DesiredState::Running),
            operation: op("op1"),
            now: NOW.into(),
        },
    );
    assert_eq!(s.instances["a"].desired, DesiredState::Running);
    assert_eq!(s.instances["a"].last_used_at, NOW);
    let busy = rejected(
        &mut s,
        Command::SetInstanceAction {
            name: "a".into(),
            pending: pending(
                "op2",
                Action::Stop {
                    force: false,
                    timeout_secs: 30,
                },
            ),
            desired: Some(DesiredState::Stopped),
            operation: op("op2"),
            now: NOW.into(),
        },
        ApplyErrorKind::Conflict,
    );
    assert!(busy.message.contains("op1"), "{busy}");
    // A stale id changes nothing.
    let before = s.clone();
    ok(
        &mut s,
        Command::FinishAction {
            name: "a".into(),
            op: "other".into(),
            observed: None,
            error: String::new(),
            now: NOW.into(),
        },
    );
    assert_eq!(s, before);
    ok(
        &mut s,
        Command::FinishAction {
            name: "a".into(),
            op: "op1".into(),
            observed: Some(observed(InstanceStatusCode::Running)),
            error: String::new(),
            now: "2026-11-29T12:00:05Z".into(),
        },
    );
    let a = &s.instances["a"];
    assert!(a.pending.is_none());
    assert_eq!(a.observed.status, InstanceStatusCode::Running);
    let o = &s.operations["op1"];
    assert_eq!(o.status, berth_proto::api::OperationStatus::Success);
    assert_eq!(o.updated_at, "2026-11-29T12:00:05Z");
}

#[test]
fn failed_create_removes_the_record_and_delete_removes_the_instance() {
    let mut s = base("10.0.0.1/24");
    let mut i = inst("a", "n1");
    i.observed.status = InstanceStatusCode::Pending;
    i.pending = Some(pending("op1", Action::Create { start: true }));
    ok(
        &mut s,
        Command::CreateInstance {
            instance: i,
            operation: Some(op("op1")),
        },
    );
    ok(
        &mut s,
        Command::FinishAction {
            name: "a".into(),
            op: "op1".into(),
            observed: None,
            error: "no space left".into(),
            now: NOW.into(),
        },
    );
    assert!(!s.instances.contains_key("a"));
    assert_eq!(
        s.operations["op1"].status,
        berth_proto::api::OperationStatus::Failure
    );
    assert_eq!(s.operations["op1"].err, "no space left");

    // Created but not started: the instance stays, with the error.
    let mut i = inst("b", "n1");
    i.observed.status = InstanceStatusCode::Pending;
    i.pending = Some(pending("op2", Action::Create { start: true }));
    ok(
        &mut s,
        Command::CreateInstance {
            instance: i,
            operation: Some(op("op2")),
        },
    );
    ok(
        &mut s,
        Command::FinishAction {
            name: "b".into(),
            op: "op2".into(),
            observed: Some(observed(InstanceStatusCode::Stopped)),
            error: "init exited".into(),
            now: NOW.into(),
        },
    );
    assert_eq!(s.instances["b"].observed.error, "init exited");

    ok(
        &mut s,
        Command::SetInstanceAction {
            name: "b".into(),
            pending: pending("op3", Action::Delete { force: false }),
            desired: None,
            operation: op("op3"),
            now: NOW.into(),
        },
    );
    ok(
        &mut s,
        Command::FinishAction {
            name: "b".into(),
            op: "op3".into(),
            observed: None,
            error: String::new(),
            now: NOW.into(),
        },
    );
    assert!(!s.instances.contains_key("b"));
    assert_eq!(
        s.operations["op3"].status,
        berth_proto::api::OperationStatus::Success
    );
}

#[test]
fn an_instance_that_powers_itself_off_is_wanted_stopped() {
    let mut s = base("10.0.0.1/24");
    create(&mut s, "a").unwrap();
    s.instances.get_mut("a").unwrap().desired = DesiredState::Running;
    let based_on = s.instances["a"].observed.updated_at.clone();
    ok(
        &mut s,
        Command::ObserveInstance {
            name: "a".into(),
            observed: observed(InstanceStatusCode::Running),
            based_on,
        },
    );
    assert_eq!(s.instances["a"].desired, DesiredState::Running);
    // A report compared with an older observation is stale: ignored.
    let before = s.clone();
    ok(
        &mut s,
        Command::ObserveInstance {
            name: "a".into(),
            observed: observed(InstanceStatusCode::Stopped),
            based_on: "2000-01-01T00:00:00Z".into(),
        },
    );
    assert_eq!(s, before);
    ok(
        &mut s,
        Command::ObserveInstance {
            name: "a".into(),
            observed: Observed {
                updated_at: "2026-11-29T12:00:09Z".into(),
                ..observed(InstanceStatusCode::Stopped)
            },
            based_on: NOW.into(),
        },
    );
    assert_eq!(s.instances["a"].desired, DesiredState::Stopped);
}

#[test]
fn controllers_join_with_their_own_tokens() {
    let mut s = base("10.0.0.1/24");
    ok(
        &mut s,
        Command::RegisterController {
            record: ControllerRecord {
                name: "c1".into(),
                id: 1,
                peer_address: "10.0.0.11:8444".into(),
                api_address: "10.0.0.11:8443".into(),
                joined_at: NOW.into(),
                cert_fingerprint: "f1".into(),
            },
        },
    );
    let mut t = token("c2", "2026-11-30T12:00:00Z");
    t.kind = JoinKind::Controller;
    s.join_tokens.insert("tc".into(), t);
    s.join_tokens
        .insert("tn".into(), token("c3", "2026-11-30T12:00:00Z"));
    let join = |hash: &str, name: &str, peer: &str| Command::JoinController {
        token_hash: hash.into(),
        name: name.into(),
        peer_address: peer.into(),
        api_address: "x:1".into(),
        cert_fingerprint: "f2".into(),
        now: NOW.into(),
    };
    // A node token does not admit a controller.
    rejected(
        &mut s,
        join("tn", "c3", "10.0.0.13:8444"),
        ApplyErrorKind::Invalid,
    );
    // Nor does a token for another name, nor a peer address in use.
    rejected(
        &mut s,
        join("tc", "c9", "10.0.0.12:8444"),
        ApplyErrorKind::Invalid,
    );
    rejected(
        &mut s,
        join("tc", "c2", "10.0.0.11:8444"),
        ApplyErrorKind::Conflict,
    );
    assert_eq!(
        ok(&mut s, join("tc", "c2", "10.0.0.12:8444")),
        ApplyOk::ControllerId(2)
    );
    // Used once.
    rejected(
        &mut s,
        join("tc", "c2", "10.0.0.12:8444"),
        ApplyErrorKind::NotFound,
    );
    ok(&mut s, Command::RemoveController { name: "c2".into() });
    assert!(!s.controllers.contains_key("c2"));
    assert!(s.cluster.removed_controllers.contains("f2"));
    // A later controller never gets the removed one's id.
    let mut t = token("c4", "2026-11-30T12:00:00Z");
    t.kind = JoinKind::Controller;
    s.join_tokens.insert("t4".into(), t);
    assert_eq!(
        ok(&mut s, join("t4", "c4", "10.0.0.14:8444")),
        ApplyOk::ControllerId(3)
    );
    // The removed controller cannot put itself back by registering.
    let back = rejected(
        &mut s,
        Command::RegisterController {
            record: ControllerRecord {
                name: "c2".into(),
                id: 2,
                peer_address: "10.0.0.12:8444".into(),
                api_address: "x:1".into(),
                joined_at: NOW.into(),
                cert_fingerprint: "f2".into(),
            },
        },
        ApplyErrorKind::Invalid,
    );
    assert!(back.message.contains("removed"), "{back}");
}

#[test]
fn nodes_and_controllers_never_share_a_name() {
    let mut s = base("10.0.0.1/24");
    s.controllers.insert(
        "c1".into(),
        ControllerRecord {
            name: "c1".into(),
            id: 1,
            ..Default::default()
        },
    );
    s.join_tokens
        .insert("tn".into(), token("c1", "2026-11-30T12:00:00Z"));
    rejected(
        &mut s,
        Command::JoinNode {
            token_hash: "tn".into(),
            node: node("c1", ""),
            now: NOW.into(),
        },
        ApplyErrorKind::Conflict,
    );
    let mut t = token("n1", "2026-11-30T12:00:00Z");
    t.kind = JoinKind::Controller;
    s.join_tokens.insert("tc".into(), t);
    rejected(
        &mut s,
        Command::JoinController {
            token_hash: "tc".into(),
            name: "n1".into(),
            peer_address: "10.0.0.9:8444".into(),
            api_address: "10.0.0.9:8443".into(),
            cert_fingerprint: String::new(),
            now: NOW.into(),
        },
        ApplyErrorKind::Conflict,
    );
}

#[test]
fn nodes_with_instances_are_not_removed() {
    let mut s = base("10.0.0.1/24");
    create(&mut s, "a").unwrap();
    rejected(
        &mut s,
        Command::RemoveNode { name: "n1".into() },
        ApplyErrorKind::Conflict,
    );
    ok(&mut s, Command::DeleteInstance { name: "a".into() });
    ok(&mut s, Command::RemoveNode { name: "n1".into() });
    assert!(s.nodes.is_empty());
}
