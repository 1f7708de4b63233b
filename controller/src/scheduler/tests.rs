//! Unit tests for the scheduler: every filter, both policies, groups, constraints, targets,
//! the error message, determinism.

use std::collections::BTreeMap;

use super::*;
use crate::state::{Image, Instance, Node, NodeStatus, State};

const FP: &str = "img";
const GIB: u64 = 1 << 30;

fn node(name: &str, cpus: u32, memory_gib: u64) -> Node {
    Node {
        name: name.into(),
        status: NodeStatus::Online,
        cpus,
        memory_bytes: memory_gib * GIB,
        architecture: "x86_64".into(),
        ..Default::default()
    }
}

/// A cluster of `nodes`, all holding image FP (x86_64, 1 GiB).
fn cluster(nodes: Vec<Node>) -> State {
    let mut s = State::default();
    let locations = nodes.iter().map(|n| n.name.clone()).collect();
    for n in nodes {
        s.nodes.insert(n.name.clone(), n);
    }
    s.images.insert(
        FP.into(),
        Image {
            fingerprint: FP.into(),
            architecture: "x86_64".into(),
            size: GIB,
            locations,
            ..Default::default()
        },
    );
    s
}

/// Three equal nodes n1..n3: 4 CPUs, 8 GiB.
fn three() -> State {
    cluster(vec![node("n1", 4, 8), node("n2", 4, 8), node("n3", 4, 8)])
}

fn inst(name: &str, config: &[(&str, &str)]) -> Instance {
    Instance {
        name: name.into(),
        image: FP.into(),
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn targeted(name: &str, target: &str, config: &[(&str, &str)]) -> Instance {
    Instance {
        node: target.into(),
        ..inst(name, config)
    }
}

/// Places `i` and records it in the state, as apply does; returns the node.
fn launch(s: &mut State, mut i: Instance) -> Result<String, String> {
    let node = place_instance(s, &i).map_err(|e| e.0)?;
    i.node = node.clone();
    s.instances.insert(i.name.clone(), i);
    Ok(node)
}

fn counts(s: &State) -> BTreeMap<String, u32> {
    node_usage(s)
        .into_iter()
        .map(|(n, u)| (n, u.instances))
        .collect()
}

fn expect_err(s: &State, i: &Instance) -> String {
    match place_instance(s, i) {
        Ok(n) => panic!("placed on {n}, expected an error"),
        Err(e) => e.0,
    }
}

#[test]
fn twelve_plain_instances_spread_4_4_4() {
    let mut s = three();
    for k in 0..12 {
        launch(&mut s, inst(&format!("w{k}"), &[])).unwrap();
    }
    let c = counts(&s);
    assert_eq!(c.values().copied().collect::<Vec<_>>(), [4, 4, 4], "{c:?}");
    // Round robin in name order: the first three go to n1, n2, n3.
    assert_eq!(s.instances["w0"].node, "n1");
    assert_eq!(s.instances["w1"].node, "n2");
    assert_eq!(s.instances["w2"].node, "n3");
}

#[test]
fn offline_evacuated_and_manual_nodes_are_skipped() {
    let mut s = cluster(vec![
        node("a", 4, 8),
        node("b", 4, 8),
        node("c", 4, 8),
        node("d", 4, 8),
    ]);
    s.nodes.get_mut("a").unwrap().status = NodeStatus::Offline;
    s.nodes.get_mut("b").unwrap().evacuated = true;
    s.nodes
        .get_mut("c")
        .unwrap()
        .config
        .insert("scheduler.instance".into(), "manual".into());
    for k in 0..3 {
        assert_eq!(launch(&mut s, inst(&format!("i{k}"), &[])).unwrap(), "d");
    }
    // A target may pick a manual node, not an offline or evacuated one.
    assert_eq!(launch(&mut s, targeted("t", "c", &[])).unwrap(), "c");
    assert_eq!(
        expect_err(&s, &targeted("u", "a", &[])),
        "node a is offline"
    );
    assert_eq!(
        expect_err(&s, &targeted("u", "b", &[])),
        "node b is evacuated"
    );
    s.nodes.get_mut("d").unwrap().status = NodeStatus::Offline;
    assert_eq!(
        expect_err(&s, &inst("x", &[])),
        "no node can take the instance: 2 are offline, 1 is evacuated, \
         1 takes instances only by target (scheduler.instance=manual)"
    );
}

#[test]
fn cpu_claims_counts_and_sets() {
    let mut s = cluster(vec![node("a", 4, 64), node("b", 2, 64)]);
    // 3 CPUs fit only on a.
    assert_eq!(
        launch(&mut s, inst("x", &[("limits.cpu", "3")])).unwrap(),
        "a"
    );
    // a has 1 free, b 2: 2 CPUs go to b.
    assert_eq!(
        launch(&mut s, inst("y", &[("limits.cpu", "2")])).unwrap(),
        "b"
    );
    assert_eq!(
        expect_err(&s, &inst("z", &[("limits.cpu", "2")])),
        "no node can take the instance: 2 lack 2 free CPUs"
    );
    // Instances without limits.cpu claim nothing and still fit.
    launch(&mut s, inst("free", &[])).unwrap();
    assert_eq!(
        expect_err(&s, &inst("c3", &[("limits.cpu", "3")])),
        "no node can take the instance: 2 lack 3 free CPUs"
    );
    // A set claims its size, and the node must have its highest CPU.
    assert_eq!(
        expect_err(&s, &inst("s1", &[("limits.cpu", "3-4")])),
        "no node can take the instance: 2 lack CPUs 3-4"
    );
    assert_eq!(
        launch(&mut s, inst("s2", &[("limits.cpu", "3-3")])).unwrap(),
        "a"
    );
    let u = node_usage(&s);
    assert_eq!((u["a"].cpus, u["b"].cpus), (4, 2));
    let mut s = cluster(vec![node("a", 4, 64), node("b", 2, 64)]);
    assert_eq!(
        launch(&mut s, inst("s", &[("limits.cpu", "2-3")])).unwrap(),
        "a"
    );
    assert_eq!(node_usage(&s)["a"].cpus, 2);
}

#[test]
fn memory_in_bytes_and_percent() {
    let mut s = cluster(vec![node("a", 8, 4), node("b", 8, 8)]);
    // 6 GiB fits only on b.
    assert_eq!(
        launch(&mut s, inst("x", &[("limits.memory", "6GiB")])).unwrap(),
        "b"
    );
    assert_eq!(
        expect_err(&s, &inst("y", &[("limits.memory", "5GiB")])),
        "no node can take the instance: 2 lack 5 GiB of free memory"
    );
    // 50% of a is 2 GiB (fits), of b 4 GiB (2 free: does not).
    assert_eq!(
        launch(&mut s, inst("p", &[("limits.memory", "50%")])).unwrap(),
        "a"
    );
    assert_eq!(node_usage(&s)["a"].memory_bytes, 2 * GIB);
    assert_eq!(
        expect_err(&s, &inst("q", &[("limits.memory", "60%")])),
        "no node can take the instance: 2 lack 60% of their memory free"
    );
    assert_eq!(
        expect_err(&s, &targeted("q", "a", &[("limits.memory", "2.5GiB")])),
        "node a lacks 2.5 GiB of free memory"
    );
    // Without a limit an instance claims nothing.
    launch(&mut s, inst("free", &[])).unwrap();
}

#[test]
fn storage_checked_only_when_known() {
    let mut s = cluster(vec![node("a", 4, 8), node("b", 4, 8)]);
    for (name, total, free) in [("a", 10 * GIB, GIB / 2), ("b", 0, 0)] {
        let n = s.nodes.get_mut(name).unwrap();
        n.storage_total_bytes = total;
        n.storage_free_bytes = free;
    }
    // a lacks room for the 1 GiB image; b reports nothing, so it is not checked.
    for k in 0..3 {
        assert_eq!(launch(&mut s, inst(&format!("i{k}"), &[])).unwrap(), "b");
    }
    assert_eq!(
        expect_err(&s, &targeted("t", "a", &[])),
        "node a lacks 1 GiB of free storage for the image"
    );
    s.nodes.get_mut("a").unwrap().storage_free_bytes = 2 * GIB;
    assert_eq!(launch(&mut s, inst("j", &[])).unwrap(), "a");
}

#[test]
fn architecture_must_match_unless_unknown() {
    let mut s = cluster(vec![
        node("arm", 4, 8),
        node("unknown", 4, 8),
        node("x86", 4, 8),
    ]);
    s.nodes.get_mut("arm").unwrap().architecture = "aarch64".into();
    s.nodes.get_mut("unknown").unwrap().architecture.clear();
    let got: Vec<String> = (0..4)
        .map(|k| launch(&mut s, inst(&format!("i{k}"), &[])).unwrap())
        .collect();
    assert_eq!(got, ["unknown", "x86", "unknown", "x86"]);
    assert_eq!(
        expect_err(&s, &targeted("t", "arm", &[])),
        "node arm is not x86_64"
    );
}

#[test]
fn the_image_must_be_somewhere() {
    let mut s = three();
    s.images.get_mut(FP).unwrap().locations = ["n2".to_string()].into();
    // Nodes without the image pull it: they take instances too; the holder wins ties.
    assert_eq!(launch(&mut s, inst("i0", &[])).unwrap(), "n2");
    let mut placed: Vec<String> = (1..3)
        .map(|k| launch(&mut s, inst(&format!("i{k}"), &[])).unwrap())
        .collect();
    placed.sort();
    assert_eq!(placed, ["n1", "n3"]);
    assert_eq!(
        launch(&mut s, targeted("t", "n1", &[])).unwrap(),
        "n1",
        "a target without the image is fine"
    );
    s.images.get_mut(FP).unwrap().locations.clear();
    assert_eq!(
        expect_err(&s, &inst("x", &[])),
        "no node can take the instance: 3 do not hold the image"
    );
    assert_eq!(
        expect_err(
            &s,
            &Instance {
                image: "gone".into(),
                ..inst("y", &[])
            }
        ),
        "image gone of the instance does not exist"
    );
}

#[test]
fn label_constraints() {
    let mut s = cluster(vec![
        node("a", 4, 8),
        node("b", 4, 8),
        node("c", 4, 8),
        node("d", 4, 8),
    ]);
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    s.nodes.get_mut("a").unwrap().labels = labels(&[("rack", "r1"), ("ssd", "true")]);
    s.nodes.get_mut("b").unwrap().labels = labels(&[("rack", "r2"), ("ssd", "true")]);
    s.nodes.get_mut("c").unwrap().labels = labels(&[("rack", "r2")]);
    // d has no labels: it never equals, so it passes rack!=r1 but fails ssd=true.
    let c = [("placement.constraints", "rack!=r1,ssd=true")];
    for k in 0..3 {
        assert_eq!(launch(&mut s, inst(&format!("i{k}"), &c)).unwrap(), "b");
    }
    // b, c and d match; c and d are empty, c comes first by name.
    assert_eq!(
        launch(&mut s, inst("j", &[("placement.constraints", "rack!=r1")])).unwrap(),
        "c"
    );
    assert_eq!(
        launch(
            &mut s,
            inst("k", &[("placement.constraints", "ssd=true,rack=r9")])
        )
        .unwrap_err(),
        "no node can take the instance: 2 do not match ssd=true, 2 do not match rack=r9"
    );
    assert_eq!(
        expect_err(&s, &targeted("t", "a", &c)),
        "node a does not match rack!=r1"
    );
    // Node config overrides the agent's labels; scheduler.* keys are not labels.
    let cfg = &mut s.nodes.get_mut("c").unwrap().config;
    cfg.insert("ssd".into(), "true".into());
    cfg.insert("scheduler.instance".into(), "all".into());
    assert_eq!(launch(&mut s, inst("l", &c)).unwrap(), "c");
    assert_eq!(
        expect_err(
            &s,
            &inst("m", &[("placement.constraints", "scheduler.instance=all")])
        ),
        "no node can take the instance: 4 do not match scheduler.instance=all"
    );
}

#[test]
fn spread_by_allocated_fraction_then_instance_count() {
    // big: 16 CPUs, small: 4. Two-CPU instances go where the fraction after placing is lowest.
    let mut s = cluster(vec![node("big", 16, 64), node("small", 4, 16)]);
    let got: Vec<String> = (0..6)
        .map(|k| launch(&mut s, inst(&format!("i{k}"), &[("limits.cpu", "2")])).unwrap())
        .collect();
    // big after placing: 2/16, 4/16, 6/16 beat small's 2/4; then 8/16 ties 2/4 and small,
    // with fewer instances, wins; then big's 8/16 and 10/16 beat small's 4/4.
    assert_eq!(got, ["big", "big", "big", "small", "big", "big"]);
    // Memory counts too: the max of both fractions.
    let mut s = cluster(vec![node("a", 4, 4), node("b", 4, 16)]);
    launch(&mut s, inst("m", &[("limits.memory", "2GiB")])).unwrap();
    assert_eq!(s.instances["m"].node, "b");
}

#[test]
fn binpack_fills_the_most_allocated_node_that_fits() {
    let mut s = three();
    s.cluster
        .config
        .insert("scheduler.policy".into(), "binpack".into());
    let got: Vec<String> = (0..5)
        .map(|k| launch(&mut s, inst(&format!("i{k}"), &[("limits.cpu", "1")])).unwrap())
        .collect();
    assert_eq!(got, ["n1", "n1", "n1", "n1", "n2"]);
    // A plain instance counts at its nominal size for the score: it would overfill n1, so it
    // goes to the fullest node it leaves at most full.
    assert_eq!(launch(&mut s, inst("p", &[])).unwrap(), "n2");
    // The same cluster under spread would have chosen n3.
    s.cluster
        .config
        .insert("scheduler.policy".into(), "spread".into());
    assert_eq!(place_instance(&s, &inst("q", &[])).unwrap(), "n3");
}

#[test]
fn plain_instances_have_a_nominal_size_for_the_score() {
    // Binpack: 4 CPUs hold 40 instances of a tenth of a CPU, then the next node fills.
    let mut s = three();
    s.cluster
        .config
        .insert("scheduler.policy".into(), "binpack".into());
    for k in 0..41 {
        launch(&mut s, inst(&format!("p{k}"), &[])).unwrap();
    }
    assert_eq!(counts(&s).into_values().collect::<Vec<_>>(), [40, 1, 0]);
    // They still claim nothing for the filters.
    assert_eq!(node_usage(&s)["n1"].cpus, 0);
    assert_eq!(
        launch(&mut s, inst("big", &[("limits.cpu", "4")])).unwrap(),
        "n3"
    );
    // Spread: ten plain instances weigh about as much as one with a whole CPU.
    let mut s = cluster(vec![node("a", 10, 1000), node("b", 10, 1000)]);
    launch(&mut s, targeted("one", "a", &[("limits.cpu", "1")])).unwrap();
    for k in 0..9 {
        assert_eq!(launch(&mut s, inst(&format!("q{k}"), &[])).unwrap(), "b");
    }
    // The tenth brings b to 1.0 CPU against a's 1.1; the eleventh ties at 1.1 and goes to a,
    // with fewer instances.
    assert_eq!(launch(&mut s, inst("q9", &[])).unwrap(), "b");
    assert_eq!(launch(&mut s, inst("q10", &[])).unwrap(), "a");
}

#[test]
fn strict_spread_group_puts_three_replicas_on_three_nodes() {
    let mut s = three();
    // Unrelated load on n1 must not matter to where the group goes first.
    launch(&mut s, targeted("other", "n1", &[])).unwrap();
    let web = [("placement.group", "web")];
    let mut nodes: Vec<String> = (0..3)
        .map(|k| launch(&mut s, inst(&format!("web{k}"), &web)).unwrap())
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["n1", "n2", "n3"]);
    assert_eq!(
        expect_err(&s, &inst("web3", &web)),
        "no node can take the instance: 3 already have a member of strict spread group web"
    );
    assert_eq!(
        expect_err(&s, &targeted("web3", "n2", &web)),
        "node n2 already has a member of strict spread group web"
    );
    // Another group is independent.
    assert!(launch(&mut s, inst("db0", &[("placement.group", "db")])).is_ok());
}

#[test]
fn permissive_spread_prefers_the_fewest_members() {
    let mut s = three();
    let g = [
        ("placement.group", "web"),
        ("placement.group.enforce", "permissive"),
    ];
    for k in 0..7 {
        launch(&mut s, inst(&format!("w{k}"), &g)).unwrap();
    }
    let per_node: Vec<u32> = counts(&s).into_values().collect();
    assert_eq!(per_node, [3, 2, 2]);
    // Group preference ranks before load: n1 is busier but has no member of "db".
    let mut s = three();
    for k in 0..3 {
        launch(&mut s, targeted(&format!("x{k}"), "n1", &[])).unwrap();
    }
    launch(&mut s, targeted("db0", "n2", &[("placement.group", "db")])).unwrap();
    launch(&mut s, targeted("db1", "n3", &[("placement.group", "db")])).unwrap();
    let db = [
        ("placement.group", "db"),
        ("placement.group.enforce", "permissive"),
    ];
    assert_eq!(launch(&mut s, inst("db2", &db)).unwrap(), "n1");
}

#[test]
fn compact_groups_stay_together() {
    let mut s = three();
    let strict = [
        ("placement.group", "c"),
        ("placement.group.policy", "compact"),
    ];
    // The first member goes by load (n1, n2 are busier), the others follow it.
    launch(&mut s, targeted("x", "n1", &[])).unwrap();
    launch(&mut s, targeted("y", "n2", &[])).unwrap();
    for k in 0..3 {
        assert_eq!(
            launch(&mut s, inst(&format!("c{k}"), &strict)).unwrap(),
            "n3"
        );
    }
    // Strict: when the group's node is full, placement fails rather than split the group.
    s.nodes.get_mut("n3").unwrap().cpus = 1;
    let big = [
        ("placement.group", "c"),
        ("placement.group.policy", "compact"),
        ("limits.cpu", "2"),
    ];
    assert_eq!(
        expect_err(&s, &inst("c9", &big)),
        "no node can take the instance: 2 have no member of strict compact group c, 1 lacks 2 free CPUs"
    );
    assert_eq!(
        expect_err(&s, &targeted("c9", "n1", &strict)),
        "node n1 has no member of strict compact group c"
    );
    // Permissive: prefers the group's node, goes elsewhere when it must.
    let soft = [
        ("placement.group", "c"),
        ("placement.group.policy", "compact"),
        ("placement.group.enforce", "permissive"),
        ("limits.cpu", "2"),
    ];
    assert_eq!(launch(&mut s, inst("c10", &soft)).unwrap(), "n1");
    let soft_small = [
        ("placement.group", "c"),
        ("placement.group.policy", "compact"),
        ("placement.group.enforce", "permissive"),
    ];
    assert_eq!(launch(&mut s, inst("c11", &soft_small)).unwrap(), "n3");
}

#[test]
fn target_errors_name_the_node_and_the_reason() {
    let mut s = three();
    assert_eq!(
        expect_err(&s, &targeted("t", "nowhere", &[])),
        "node nowhere does not exist"
    );
    s.nodes.get_mut("n2").unwrap().status = NodeStatus::Offline;
    assert_eq!(
        expect_err(&s, &targeted("t", "n2", &[])),
        "node n2 is offline"
    );
    assert_eq!(
        expect_err(&s, &targeted("t", "n1", &[("limits.cpu", "5")])),
        "node n1 lacks 5 free CPUs"
    );
    assert_eq!(
        expect_err(&s, &targeted("t", "n1", &[("limits.memory", "9GiB")])),
        "node n1 lacks 9 GiB of free memory"
    );
    // A target overrides the scheduler's choice, not the resource filters.
    for k in 0..3 {
        assert_eq!(
            launch(&mut s, targeted(&format!("t{k}"), "n3", &[])).unwrap(),
            "n3"
        );
    }
}

#[test]
fn no_node_error_counts_every_filter() {
    let mut s = cluster(vec![
        node("a", 4, 8),
        node("b", 4, 8),
        node("c", 4, 2),
        node("d", 4, 8),
        node("e", 4, 8),
        node("f", 4, 8),
    ]);
    s.nodes.get_mut("a").unwrap().status = NodeStatus::Offline;
    s.nodes.get_mut("b").unwrap().status = NodeStatus::Offline;
    for n in ["d", "e", "f"] {
        s.nodes
            .get_mut(n)
            .unwrap()
            .labels
            .insert("rack".into(), "r1".into());
    }
    let i = inst(
        "x",
        &[
            ("limits.memory", "4GiB"),
            ("placement.constraints", "rack!=r1"),
        ],
    );
    assert_eq!(
        expect_err(&s, &i),
        "no node can take the instance: 2 are offline, 3 do not match rack!=r1, 1 lacks 4 GiB of free memory"
    );
    assert_eq!(
        expect_err(&State::default(), &inst("x", &[])),
        "image img of the instance does not exist"
    );
    let mut empty = cluster(vec![]);
    empty.images.get_mut(FP).unwrap().locations.clear();
    assert_eq!(
        expect_err(&empty, &inst("x", &[])),
        "no node can take the instance: the cluster has no nodes"
    );
}

#[test]
fn decisions_are_deterministic() {
    // The same cluster built in two insertion orders, and once more through serde (as a
    // follower restoring a snapshot would), gives the same answers, decision after decision.
    let build = |reverse: bool| {
        let mut nodes: Vec<Node> = (0..20u32)
            .map(|k| node(&format!("n{k:02}"), 4 + k % 3, 8))
            .collect();
        let mut pre: Vec<Instance> = (0..7)
            .map(|k| {
                targeted(
                    &format!("pre{k}"),
                    &format!("n{:02}", k * 2),
                    &[("limits.cpu", "1")],
                )
            })
            .collect();
        if reverse {
            nodes.reverse();
            pre.reverse();
        }
        let mut s = cluster(nodes);
        for i in pre {
            s.instances.insert(i.name.clone(), i);
        }
        s
    };
    let mut a = build(false);
    let mut b = build(true);
    let mut c: State = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
    for k in 0..50 {
        let cfg: &[(&str, &str)] = match k % 3 {
            0 => &[("limits.cpu", "1")],
            1 => &[
                ("placement.group", "g"),
                ("placement.group.enforce", "permissive"),
            ],
            _ => &[],
        };
        let i = inst(&format!("i{k}"), cfg);
        let x = launch(&mut a, i.clone()).unwrap();
        assert_eq!(launch(&mut b, i.clone()).unwrap(), x);
        assert_eq!(launch(&mut c, i).unwrap(), x);
    }
    assert_eq!(a, b);
    assert_eq!(a, c);
}

#[test]
fn incremental_view_matches_place_instance() {
    let mut s = cluster(
        (0..10)
            .map(|k| node(&format!("n{k}"), 2 + k % 4, 4 + u64::from(k)))
            .collect(),
    );
    let mut view = ClusterView::new(&s);
    let image = s.images[FP].clone();
    for k in 0..60 {
        let cfg: Vec<(&str, &str)> = match k % 4 {
            0 => vec![("limits.cpu", "1"), ("limits.memory", "512MiB")],
            1 => vec![
                ("placement.group", "web"),
                ("placement.group.enforce", "permissive"),
            ],
            2 => vec![("limits.memory", "10%")],
            _ => vec![],
        };
        let mut i = inst(&format!("i{k}"), &cfg);
        let expected = place_instance(&s, &i);
        let req = view.request(&i, &image).unwrap();
        let got = view.place(&req).map(|n| view.node(n).name.clone());
        assert_eq!(got, expected, "decision {k}");
        let Ok(chosen) = got else { continue };
        let idx = view.nodes().iter().position(|n| n.name == chosen).unwrap();
        view.commit(idx, &req);
        i.node = chosen;
        s.instances.insert(i.name.clone(), i);
    }
    assert_eq!(
        ClusterView::new(&s).nodes(),
        view.nodes(),
        "usage diverged between the incremental view and a fresh one"
    );
}

#[test]
fn usage_counts_every_node() {
    let mut s = cluster(vec![node("a", 4, 8), node("b", 4, 8)]);
    launch(
        &mut s,
        targeted("x", "a", &[("limits.cpu", "0-1"), ("limits.memory", "25%")]),
    )
    .unwrap();
    launch(&mut s, targeted("y", "a", &[])).unwrap();
    let u = node_usage(&s);
    assert_eq!(
        u["a"],
        NodeUsage {
            instances: 2,
            cpus: 2,
            memory_bytes: 2 * GIB
        }
    );
    assert_eq!(u["b"], NodeUsage::default());
}

#[test]
fn config_keys() {
    assert!(validate_cluster_config_key("scheduler.policy", "binpack").is_ok());
    assert!(validate_cluster_config_key("scheduler.policy", "spread").is_ok());
    assert_eq!(
        validate_cluster_config_key("scheduler.policy", "random").unwrap_err(),
        "scheduler.policy \"random\" must be spread or binpack"
    );
    assert!(validate_cluster_config_key("images.remote_cache_expiry", "0").is_ok());
    assert!(validate_cluster_config_key("images.remote_cache_expiry", "soon").is_err());
    assert_eq!(
        validate_cluster_config_key("scheduler.other", "x").unwrap_err(),
        "unknown cluster config key scheduler.other"
    );
    assert!(validate_node_config_key("scheduler.instance", "manual").is_ok());
    assert!(validate_node_config_key("scheduler.instance", "all").is_ok());
    assert!(validate_node_config_key("scheduler.instance", "never").is_err());
    assert!(validate_node_config_key("scheduler.x", "1").is_err());
    assert!(validate_node_config_key("rack", "r1").is_ok());
    assert!(validate_node_config_key("ra ck", "r1").is_err());
    assert_eq!(Policy::of_cluster(&State::default()), Policy::Spread);
}

#[test]
fn byte_counts_read_well() {
    use super::view::human_bytes;
    assert_eq!(human_bytes(100), "100 B");
    assert_eq!(human_bytes(4 * GIB), "4 GiB");
    assert_eq!(human_bytes(3 * GIB / 2), "1.5 GiB");
    assert_eq!(human_bytes(512 << 20), "512 MiB");
    assert_eq!(human_bytes(1536), "1.5 KiB");
    assert_eq!(human_bytes(u64::MAX), "16384 PiB");
}
