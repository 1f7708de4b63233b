//! Unit tests of projects, profiles, quotas and ETags in `State::apply`.

use std::collections::BTreeMap;

use super::*;

const NOW: &str = "2026-11-29T12:00:00Z";
const FP: &str = "bbbbbbbbbbbbbbbb0000000000000000";

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

fn config(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A bootstrapped state with a big node and an image, and project `p` with `quota`.
fn base(quota: &[(&str, &str)]) -> State {
    let mut s = State::default();
    ok(
        &mut s,
        Command::Bootstrap {
            name: "c".into(),
            ca_cert_pem: "cert".into(),
            ca_key_pem: "key".into(),
            admin_key: ApiKey {
                id: "admin".into(),
                name: "admin".into(),
                hash: "h".into(),
                role: Role::Admin,
                project: "default".into(),
                created_at: NOW.into(),
                expires_at: None,
            },
            now: NOW.into(),
        },
    );
    s.nodes.insert(
        "n1".into(),
        Node {
            name: "n1".into(),
            ipv4_cidr: "10.0.0.1/16".into(),
            cpus: 64,
            memory_bytes: 256 << 30,
            ..Default::default()
        },
    );
    ok(
        &mut s,
        Command::PutImage {
            image: Image {
                fingerprint: FP.into(),
                locations: ["n1".to_string()].into(),
                ..Default::default()
            },
        },
    );
    ok(
        &mut s,
        Command::CreateProject {
            project: Project {
                name: "p".into(),
                config: config(quota),
                ..Default::default()
            },
        },
    );
    s
}

fn inst(project: &str, name: &str, cfg: &[(&str, &str)]) -> Instance {
    Instance {
        name: scoped_name(project, name),
        project: project.into(),
        image: FP.into(),
        config: config(cfg),
        ..Default::default()
    }
}

fn create(s: &mut State, i: Instance) -> ApplyResult {
    s.apply(Command::CreateInstance {
        instance: i,
        operation: None,
    })
}

#[test]
fn projects_have_a_default_profile_and_names_do_not_collide() {
    let mut s = base(&[]);
    assert!(s.profiles.contains_key("default"));
    assert!(s.profiles.contains_key("p_default"));
    create(&mut s, inst("default", "web", &[])).unwrap();
    create(&mut s, inst("p", "web", &[])).unwrap();
    assert!(s.instances.contains_key("web") && s.instances.contains_key("p_web"));
    let e = rejected(
        &mut s,
        Command::CreateInstance {
            instance: inst("p", "web", &[]),
            operation: None,
        },
        ApplyErrorKind::Conflict,
    );
    assert_eq!(e.message, "instance \"web\" already exists");
    // A key of the wrong shape is refused.
    let mut bad = inst("p", "x", &[]);
    bad.name = "x".into();
    rejected(
        &mut s,
        Command::CreateInstance {
            instance: bad,
            operation: None,
        },
        ApplyErrorKind::Invalid,
    );
    // Unknown project.
    rejected(
        &mut s,
        Command::CreateInstance {
            instance: inst("q", "web", &[]),
            operation: None,
        },
        ApplyErrorKind::NotFound,
    );
}

#[test]
fn instance_quota_exactly_at_and_one_over() {
    let mut s = base(&[("limits.instances", "2")]);
    create(&mut s, inst("p", "a", &[])).unwrap();
    create(&mut s, inst("p", "b", &[])).unwrap();
    let e = rejected(
        &mut s,
        Command::CreateInstance {
            instance: inst("p", "c", &[]),
            operation: None,
        },
        ApplyErrorKind::Forbidden,
    );
    assert_eq!(
        e.message,
        "project \"p\" has a limits.instances quota of 2 instances: 2 instances are in use and this needs 1 instance more"
    );
    // The default project is not limited by p's quota.
    create(&mut s, inst("default", "c", &[])).unwrap();
}

#[test]
fn resource_quotas_need_the_limit_set_and_count_profiles() {
    let mut s = base(&[
        ("limits.cpu", "4"),
        ("limits.memory", "1GiB"),
        ("limits.processes", "1000"),
    ]);
    let e = rejected(
        &mut s,
        Command::CreateInstance {
            instance: inst("p", "a", &[("limits.cpu", "1")]),
            operation: None,
        },
        ApplyErrorKind::Forbidden,
    );
    assert!(e.message.contains("must set limits.memory"), "{e}");
    let e = rejected(
        &mut s,
        Command::CreateInstance {
            instance: inst(
                "p",
                "a",
                &[
                    ("limits.cpu", "1"),
                    ("limits.memory", "10%"),
                    ("limits.processes", "100"),
                ],
            ),
            operation: None,
        },
        ApplyErrorKind::Forbidden,
    );
    assert!(e.message.contains("as a size"), "{e}");
    // Limits from the project's default profile count.
    ok(
        &mut s,
        Command::UpdateProfile {
            name: "p_default".into(),
            description: String::new(),
            config: config(&[
                ("limits.cpu", "2"),
                ("limits.memory", "512MiB"),
                ("limits.processes", "100"),
            ]),
        },
    );
    create(&mut s, inst("p", "a", &[])).unwrap();
    create(&mut s, inst("p", "b", &[])).unwrap();
    assert_eq!(s.project_usage("p").cpu, 4);
    assert_eq!(s.project_usage("p").memory, 1 << 30);
    let e = rejected(
        &mut s,
        Command::CreateInstance {
            instance: inst("p", "c", &[("limits.cpu", "1"), ("limits.memory", "1MiB")]),
            operation: None,
        },
        ApplyErrorKind::Forbidden,
    );
    assert_eq!(
        e.message,
        "project \"p\" has a limits.cpu quota of 4 CPUs: 4 CPUs are in use and this needs 1 CPU more"
    );
    // Raising the profile's memory for both instances would exceed the memory quota.
    let e = rejected(
        &mut s,
        Command::UpdateProfile {
            name: "p_default".into(),
            description: String::new(),
            config: config(&[
                ("limits.cpu", "2"),
                ("limits.memory", "1GiB"),
                ("limits.processes", "100"),
            ]),
        },
        ApplyErrorKind::Forbidden,
    );
    assert!(e.message.contains("limits.memory quota of 1 GiB"), "{e}");
    // Lowering an instance's use is always allowed, even at the limit.
    ok(
        &mut s,
        Command::UpdateInstance {
            name: "p_a".into(),
            config: config(&[("limits.cpu", "1")]),
            description: String::new(),
            profiles: None,
            now: NOW.into(),
        },
    );
    assert_eq!(s.project_usage("p").cpu, 3);
}

#[test]
fn project_limits_cannot_go_below_use() {
    let mut s = base(&[]);
    create(&mut s, inst("p", "a", &[("limits.cpu", "2")])).unwrap();
    let e = rejected(
        &mut s,
        Command::UpdateProject {
            name: "p".into(),
            description: String::new(),
            config: config(&[("limits.cpu", "1")]),
        },
        ApplyErrorKind::Forbidden,
    );
    assert!(e.message.contains("already use 2 CPUs"), "{e}");
    let e = rejected(
        &mut s,
        Command::UpdateProject {
            name: "p".into(),
            description: String::new(),
            config: config(&[("limits.memory", "1GiB")]),
        },
        ApplyErrorKind::Forbidden,
    );
    assert!(e.message.contains("must set limits.memory"), "{e}");
    ok(
        &mut s,
        Command::UpdateProject {
            name: "p".into(),
            description: "x".into(),
            config: config(&[("limits.cpu", "2"), ("restricted", "true")]),
        },
    );
}

#[test]
fn restricted_projects_refuse_privileged_instances_even_through_profiles() {
    let mut s = base(&[("restricted", "true")]);
    rejected(
        &mut s,
        Command::CreateInstance {
            instance: inst("p", "a", &[("security.privileged", "true")]),
            operation: None,
        },
        ApplyErrorKind::Forbidden,
    );
    ok(
        &mut s,
        Command::CreateProfile {
            profile: Profile {
                name: "p_priv".into(),
                project: "p".into(),
                description: String::new(),
                config: config(&[("security.privileged", "true")]),
            },
        },
    );
    let mut i = inst("p", "a", &[]);
    i.profiles = vec!["default".into(), "priv".into()];
    rejected(
        &mut s,
        Command::CreateInstance {
            instance: i,
            operation: None,
        },
        ApplyErrorKind::Forbidden,
    );
    // The default project is not restricted.
    create(
        &mut s,
        inst("default", "a", &[("security.privileged", "true")]),
    )
    .unwrap();
}

#[test]
fn profiles_layer_in_order_then_instance_config() {
    let mut s = base(&[]);
    for (name, cfg) in [
        ("web", vec![("limits.cpu", "2"), ("user.a", "web")]),
        (
            "small",
            vec![("limits.cpu", "1"), ("limits.memory", "256MiB")],
        ),
    ] {
        ok(
            &mut s,
            Command::CreateProfile {
                profile: Profile {
                    name: scoped_name("p", name),
                    project: "p".into(),
                    description: String::new(),
                    config: config(&cfg),
                },
            },
        );
    }
    let mut i = inst("p", "a", &[("limits.memory", "1GiB")]);
    i.profiles = vec!["default".into(), "web".into(), "small".into()];
    create(&mut s, i).unwrap();
    let eff = s.effective_config(&s.instances["p_a"]).into_owned();
    assert_eq!(
        eff,
        config(&[
            ("limits.cpu", "1"),
            ("limits.memory", "1GiB"),
            ("user.a", "web"),
        ])
    );
    // An unknown or repeated profile is refused.
    let mut bad = inst("p", "b", &[]);
    bad.profiles = vec!["nope".into()];
    rejected(
        &mut s,
        Command::CreateInstance {
            instance: bad,
            operation: None,
        },
        ApplyErrorKind::NotFound,
    );
    let mut twice = inst("p", "b", &[]);
    twice.profiles = vec!["web".into(), "web".into()];
    rejected(
        &mut s,
        Command::CreateInstance {
            instance: twice,
            operation: None,
        },
        ApplyErrorKind::Invalid,
    );
    // Profiles of another project are not found.
    let mut other = inst("default", "b", &[]);
    other.profiles = vec!["web".into()];
    rejected(
        &mut s,
        Command::CreateInstance {
            instance: other,
            operation: None,
        },
        ApplyErrorKind::NotFound,
    );
    // Used profiles cannot be deleted; renaming follows into the instances.
    rejected(
        &mut s,
        Command::DeleteProfile {
            name: "p_web".into(),
        },
        ApplyErrorKind::Conflict,
    );
    ok(
        &mut s,
        Command::RenameProfile {
            from: "p_web".into(),
            to: "p_www".into(),
        },
    );
    assert_eq!(s.instances["p_a"].profiles, ["default", "www", "small"]);
    rejected(
        &mut s,
        Command::RenameProfile {
            from: "p_default".into(),
            to: "p_x".into(),
        },
        ApplyErrorKind::Invalid,
    );
    rejected(
        &mut s,
        Command::RenameProfile {
            from: "p_small".into(),
            to: "small".into(),
        },
        ApplyErrorKind::Invalid,
    );
}

#[test]
fn projects_are_deleted_only_when_empty() {
    let mut s = base(&[]);
    create(&mut s, inst("p", "a", &[])).unwrap();
    let e = rejected(
        &mut s,
        Command::DeleteProject { name: "p".into() },
        ApplyErrorKind::Conflict,
    );
    assert_eq!(
        e.message,
        "project \"p\" cannot be deleted: it still has 1 instance"
    );
    ok(&mut s, Command::DeleteInstance { name: "p_a".into() });
    ok(
        &mut s,
        Command::RenameProject {
            from: "p".into(),
            to: "q".into(),
        },
    );
    assert!(s.profiles.contains_key("q_default") && !s.profiles.contains_key("p_default"));
    ok(&mut s, Command::DeleteProject { name: "q".into() });
    assert!(!s.profiles.contains_key("q_default"));
    rejected(
        &mut s,
        Command::DeleteProject {
            name: "default".into(),
        },
        ApplyErrorKind::Invalid,
    );
}

#[test]
fn if_match_applies_only_on_the_current_etag() {
    let mut s = base(&[]);
    create(&mut s, inst("p", "a", &[])).unwrap();
    let key = ObjectKey::Instance("p_a".into());
    let etag = s.etag(&key).unwrap();
    let update = |desc: &str| Command::UpdateInstance {
        name: "p_a".into(),
        config: BTreeMap::new(),
        description: desc.into(),
        profiles: None,
        now: NOW.into(),
    };
    ok(
        &mut s,
        Command::IfMatch {
            expect: vec![(key.clone(), etag.clone())],
            command: Box::new(update("first")),
        },
    );
    // The same ETag is now stale.
    let e = rejected(
        &mut s,
        Command::IfMatch {
            expect: vec![(key.clone(), etag)],
            command: Box::new(update("second")),
        },
        ApplyErrorKind::PreconditionFailed,
    );
    assert!(e.message.starts_with("instance \"a\" changed"), "{e}");
    // Observations do not change the ETag (only the writable part does).
    let before = s.etag(&key);
    s.instances.get_mut("p_a").unwrap().observed.pid = 42;
    assert_eq!(s.etag(&key), before);
}

#[test]
fn aliases_and_images_are_per_project() {
    let mut s = base(&[]);
    ok(
        &mut s,
        Command::PutAlias {
            alias: Alias {
                name: alias_key("p", "mine"),
                project: "p".into(),
                target: FP.into(),
                description: String::new(),
            },
        },
    );
    assert!(s.resolve_image_in("p", "mine").is_some());
    assert!(s.resolve_image_in("default", "mine").is_none());
    // An image held only by project q is invisible to p and to default.
    let fp2 = "cccccccccccccccc0000000000000000";
    ok(
        &mut s,
        Command::PutImage {
            image: Image {
                fingerprint: fp2.into(),
                projects: ["q".to_string()].into(),
                ..Default::default()
            },
        },
    );
    assert!(s.resolve_image_in("p", fp2).is_none());
    assert!(s.resolve_image_in("q", fp2).is_some());
    // Shared images (default project) are visible everywhere.
    assert!(s.resolve_image_in("p", FP).is_some());
}

#[test]
fn api_keys_names_are_unique_and_rotation_replaces_the_hash() {
    let mut s = base(&[]);
    let key = |id: &str, name: &str, hash: &str, role: Role, project: &str| ApiKey {
        id: id.into(),
        name: name.into(),
        hash: hash.into(),
        role,
        project: project.into(),
        created_at: NOW.into(),
        expires_at: None,
    };
    ok(
        &mut s,
        Command::AddApiKey {
            key: key("k1", "alice", "h1", Role::Member, "p"),
        },
    );
    rejected(
        &mut s,
        Command::AddApiKey {
            key: key("k2", "alice", "h2", Role::Member, "p"),
        },
        ApplyErrorKind::Conflict,
    );
    rejected(
        &mut s,
        Command::AddApiKey {
            key: key("k3", "bob", "h3", Role::Viewer, "nope"),
        },
        ApplyErrorKind::NotFound,
    );
    ok(
        &mut s,
        Command::RotateApiKey {
            id: "k1".into(),
            hash: "h9".into(),
            expires_at: Some("2027-01-01T00:00:00Z".into()),
        },
    );
    assert!(s.api_key_by_hash("h1").is_none());
    assert_eq!(s.api_key_by_hash("h9").unwrap().name, "alice");
    // A project with a key cannot be deleted.
    rejected(
        &mut s,
        Command::DeleteProject { name: "p".into() },
        ApplyErrorKind::Conflict,
    );
}

#[test]
fn huge_limits_saturate_instead_of_wrapping() {
    let mut s = base(&[("limits.disk", "10GiB")]);
    // Validation caps sizes at 1 PiB; state built otherwise must still never wrap.
    let huge = "9223372036854775808";
    create(&mut s, inst("p", "a", &[("limits.disk", "1GiB")])).unwrap();
    let e = rejected(
        &mut s,
        Command::CreateInstance {
            instance: inst("p", "b", &[("limits.disk", huge)]),
            operation: None,
        },
        ApplyErrorKind::Forbidden,
    );
    assert!(e.message.contains("limits.disk quota"), "{e}");
    assert!(berth_proto::api::config::validate_key_value("limits.disk", huge).is_err());
    assert!(berth_proto::api::config::validate_key_value("limits.memory", "2PiB").is_err());
}

#[test]
fn placement_groups_belong_to_their_project() {
    let mut s = base(&[]);
    s.nodes.insert(
        "n2".into(),
        Node {
            name: "n2".into(),
            ipv4_cidr: "10.1.0.1/16".into(),
            cpus: 64,
            memory_bytes: 256 << 30,
            ..Default::default()
        },
    );
    s.images.get_mut(FP).unwrap().locations.insert("n2".into());
    let grouped = |project: &str, name: &str| inst(project, name, &[("placement.group", "db")]);
    create(&mut s, grouped("default", "d1")).unwrap();
    create(&mut s, grouped("default", "d2")).unwrap();
    // Project p's group "db" is its own: two strict-spread members still fit on two nodes.
    create(&mut s, grouped("p", "d1")).unwrap();
    create(&mut s, grouped("p", "d2")).unwrap();
    let e = create(&mut s, grouped("p", "d3")).unwrap_err();
    assert!(e.message.contains("group db"), "{e}");
    assert!(!e.message.contains("p_db"), "{e}");
}

#[test]
fn restricted_projects_cannot_pick_nodes_by_labels() {
    let mut s = base(&[("restricted", "true")]);
    rejected(
        &mut s,
        Command::CreateInstance {
            instance: inst("p", "a", &[("placement.constraints", "rack=r1")]),
            operation: None,
        },
        ApplyErrorKind::Forbidden,
    );
}

#[test]
fn images_resolve_only_within_what_a_project_may_use() {
    let mut s = base(&[]);
    ok(
        &mut s,
        Command::CreateProject {
            project: Project {
                name: "q".into(),
                ..Default::default()
            },
        },
    );
    let private = "bbbbbbbbbbbbbbbb1111111111111111";
    ok(
        &mut s,
        Command::PutImage {
            image: Image {
                fingerprint: private.into(),
                projects: ["q".to_string()].into(),
                ..Default::default()
            },
        },
    );
    ok(
        &mut s,
        Command::PutAlias {
            alias: Alias {
                name: alias_key("q", "mine"),
                project: "q".into(),
                target: FP.into(),
                description: String::new(),
            },
        },
    );
    // Another project's alias key spelled out is not found.
    assert!(s.resolve_image_in("p", "q@mine").is_none());
    assert!(s.resolve_image_in("q", "mine").is_some());
    // A prefix shared by q's private image and a shared one is unique for p, and q's image
    // is never found by p.
    assert_eq!(
        s.resolve_image_in("p", "bbbbbbbbbbbbbbbb")
            .map(|i| i.fingerprint.as_str()),
        Some(FP)
    );
    assert!(s.resolve_image_in("q", "bbbbbbbbbbbbbbbb").is_none());
    assert!(s.resolve_image_in("p", private).is_none());
}

#[test]
fn a_deleted_project_takes_its_operations_along() {
    use berth_proto::api::{Operation, OperationStatus};
    let mut s = base(&[]);
    let op = |id: &str, status: OperationStatus| Operation {
        id: id.into(),
        status,
        project: "p".into(),
        ..Default::default()
    };
    ok(
        &mut s,
        Command::PutOperation {
            operation: op("o1", OperationStatus::Running),
        },
    );
    rejected(
        &mut s,
        Command::DeleteProject { name: "p".into() },
        ApplyErrorKind::Conflict,
    );
    ok(
        &mut s,
        Command::PutOperation {
            operation: op("o1", OperationStatus::Success),
        },
    );
    let keys = Command::DeleteProject { name: "p".into() }.touched(&s);
    assert!(keys.contains(&ObjectKey::Operation("o1".into())));
    ok(&mut s, Command::DeleteProject { name: "p".into() });
    assert!(s.operations.is_empty());
}

#[test]
fn aliases_are_created_once_and_images_unshared_per_project() {
    let mut s = base(&[]);
    let alias = |project: &str, name: &str| Alias {
        name: alias_key(project, name),
        project: project.into(),
        target: FP.into(),
        description: String::new(),
    };
    ok(
        &mut s,
        Command::CreateAlias {
            alias: alias("p", "base"),
        },
    );
    let e = rejected(
        &mut s,
        Command::CreateAlias {
            alias: alias("p", "base"),
        },
        ApplyErrorKind::Conflict,
    );
    assert_eq!(e.message, "image alias \"base\" already exists");
    // The same name in another project is another alias.
    ok(
        &mut s,
        Command::CreateAlias {
            alias: alias("default", "base"),
        },
    );
    // An image p holds with q: p lets go of it and of its aliases; q keeps it.
    s.images.get_mut(FP).unwrap().projects = ["p".to_string(), "q".to_string()].into();
    let keys = Command::UnshareImage {
        fingerprint: FP.into(),
        project: "p".into(),
    }
    .touched(&s);
    assert!(keys.contains(&ObjectKey::Alias("p@base".into())));
    ok(
        &mut s,
        Command::UnshareImage {
            fingerprint: FP.into(),
            project: "p".into(),
        },
    );
    assert_eq!(s.images[FP].projects, ["q".to_string()].into());
    assert!(!s.aliases.contains_key("p@base") && s.aliases.contains_key("base"));
    // Never down to no project (that would share it with everyone).
    rejected(
        &mut s,
        Command::UnshareImage {
            fingerprint: FP.into(),
            project: "q".into(),
        },
        ApplyErrorKind::Invalid,
    );
    rejected(
        &mut s,
        Command::UnshareImage {
            fingerprint: FP.into(),
            project: "p".into(),
        },
        ApplyErrorKind::NotFound,
    );
}

#[test]
fn the_last_working_admin_key_stays_even_beside_expired_ones() {
    let mut s = base(&[]);
    ok(
        &mut s,
        Command::AddApiKey {
            key: ApiKey {
                id: "old".into(),
                name: "old-admin".into(),
                hash: "h-old".into(),
                role: Role::Admin,
                project: "default".into(),
                created_at: NOW.into(),
                expires_at: Some("2026-01-01T00:00:00Z".into()),
            },
        },
    );
    // "admin" is the only admin key still working at NOW.
    let e = rejected(
        &mut s,
        Command::DeleteApiKey {
            id: "admin".into(),
            now: NOW.into(),
        },
        ApplyErrorKind::Conflict,
    );
    assert!(e.message.contains("last admin key"), "{e}");
    // The expired one may go.
    ok(
        &mut s,
        Command::DeleteApiKey {
            id: "old".into(),
            now: NOW.into(),
        },
    );
}
