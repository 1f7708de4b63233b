//! Scheduler simulation: places 10,000 instances onto 1,000 simulated nodes through the code the
//! Raft state machine uses, and prints decisions per second and the balance achieved, for the
//! `spread` and `binpack` policies.
//!
//! Run with `cargo bench -p berth-controller --bench scheduler` (or `make bench-scheduler`). Everything is
//! generated from a fixed seed, so two runs make the same decisions; only the timings differ.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use berth_controller::scheduler::{ClusterView, Policy, place_instance};
use berth_controller::state::{Image, Instance, Node, NodeStatus, State};

const NODES: usize = 1_000;
const INSTANCES: usize = 10_000;
const RACKS: usize = 20;
const GIB: u64 = 1 << 30;
/// Every this many decisions the incremental view's answer is checked against
/// `place_instance` on the full state (the apply path).
const CROSS_CHECK_EVERY: usize = 500;

/// xorshift64*: a few lines, no dependency, the same sequence on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in 0..n.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Picks a value by weight.
    fn pick<T: Copy>(&mut self, table: &[(u64, T)]) -> T {
        let total: u64 = table.iter().map(|(w, _)| w).sum();
        let mut r = self.below(total);
        for &(w, v) in table {
            if r < w {
                return v;
            }
            r -= w;
        }
        table[table.len() - 1].1
    }
}

/// 1,000 nodes: small, medium and large, 20 racks, 3 zones, half with SSDs, 5% aarch64, a few
/// offline, evacuated or manual.
fn build_cluster(rng: &mut Rng) -> State {
    let mut s = State::default();
    let mut x86 = Image {
        fingerprint: "x86".into(),
        architecture: "x86_64".into(),
        size: GIB / 2,
        ..Default::default()
    };
    let mut arm = Image {
        fingerprint: "arm".into(),
        architecture: "aarch64".into(),
        size: GIB / 2,
        ..Default::default()
    };
    for k in 0..NODES {
        let name = format!("node{k:04}");
        let (cpus, memory_gib) = rng.pick(&[(40, (8, 32)), (40, (32, 128)), (20, (64, 512))]);
        let architecture = if rng.below(100) < 5 {
            "aarch64"
        } else {
            "x86_64"
        };
        let mut labels = BTreeMap::new();
        labels.insert("rack".to_string(), format!("r{}", k % RACKS));
        labels.insert("zone".to_string(), format!("z{}", k % 3));
        if rng.below(2) == 0 {
            labels.insert("ssd".to_string(), "true".to_string());
        }
        let mut config = BTreeMap::new();
        if rng.below(100) == 0 {
            config.insert("scheduler.instance".to_string(), "manual".to_string());
        }
        let node = Node {
            name: name.clone(),
            status: if rng.below(100) == 0 {
                NodeStatus::Offline
            } else {
                NodeStatus::Online
            },
            evacuated: rng.below(200) == 0,
            cpus,
            memory_bytes: memory_gib * GIB,
            storage_total_bytes: 1024 * GIB,
            storage_free_bytes: 800 * GIB,
            architecture: architecture.into(),
            labels,
            config,
            ..Default::default()
        };
        // Images are on their architecture's nodes, all but 3% of them.
        if rng.below(100) >= 3 {
            if architecture == "x86_64" {
                x86.locations.insert(name.clone());
            } else {
                arm.locations.insert(name.clone());
            }
        }
        s.nodes.insert(name, node);
    }
    s.images.insert(x86.fingerprint.clone(), x86);
    s.images.insert(arm.fingerprint.clone(), arm);
    s
}

/// 10,000 instance requests: mixed CPU and memory limits (10% without), 3-replica strict
/// spread groups, compact groups, label constraints, an aarch64 share.
fn build_requests(rng: &mut Rng) -> Vec<Instance> {
    let mut out = Vec::with_capacity(INSTANCES);
    let mut spread_group = 0;
    let mut spread_left = 0;
    let mut compact_group = 0;
    let mut compact_left = 0;
    for k in 0..INSTANCES {
        let mut config = BTreeMap::new();
        let mut set = |k: &str, v: String| {
            config.insert(k.to_string(), v);
        };
        if rng.below(10) != 0 {
            let cpus = rng.pick(&[(50, 1), (30, 2), (15, 4), (5, 8)]);
            set("limits.cpu", cpus.to_string());
            let memory = rng.pick(&[
                (30, "1GiB"),
                (30, "2GiB"),
                (20, "4GiB"),
                (15, "8GiB"),
                (5, "16GiB"),
            ]);
            set("limits.memory", memory.to_string());
        }
        match rng.below(100) {
            // A service with three replicas on three nodes.
            0..20 => {
                if spread_left == 0 {
                    spread_group += 1;
                    spread_left = 3;
                }
                spread_left -= 1;
                set("placement.group", format!("svc{spread_group}"));
            }
            // Chatty pairs of four: together if they can be.
            20..25 => {
                if compact_left == 0 {
                    compact_group += 1;
                    compact_left = 4;
                }
                compact_left -= 1;
                set("placement.group", format!("pod{compact_group}"));
                set("placement.group.policy", "compact".into());
                set("placement.group.enforce", "permissive".into());
            }
            _ => {}
        }
        match rng.below(100) {
            0..10 => set("placement.constraints", "ssd=true".into()),
            10..15 => set("placement.constraints", "rack!=r3".into()),
            15..18 => set("placement.constraints", "zone=z1,ssd=true".into()),
            _ => {}
        }
        let image = if rng.below(100) < 3 { "arm" } else { "x86" };
        out.push(Instance {
            name: format!("i{k:05}"),
            image: image.into(),
            config,
            ..Default::default()
        });
    }
    out
}

struct Stats {
    min: f64,
    mean: f64,
    max: f64,
    cv: f64,
}

fn stats(values: &[f64]) -> Stats {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    Stats {
        min: values.iter().copied().fold(f64::INFINITY, f64::min),
        mean,
        max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        cv: if mean > 0.0 { var.sqrt() / mean } else { 0.0 },
    }
}

fn print_stats(what: &str, s: &Stats) {
    println!(
        "  {what:<28} min {:.3}  mean {:.3}  max {:.3}  cv {:.3}",
        s.min, s.mean, s.max, s.cv
    );
}

fn simulate(cluster: &State, requests: &[Instance], policy: Policy) {
    let mut state = cluster.clone();
    state.cluster.config.insert(
        "scheduler.policy".into(),
        match policy {
            Policy::Spread => "spread",
            Policy::Binpack => "binpack",
        }
        .into(),
    );
    let mut view = ClusterView::new(&state);
    let mut deciding = Duration::ZERO;
    let mut slowest_thousand = Duration::ZERO;
    let mut this_thousand = Duration::ZERO;
    let mut placed = 0usize;
    let mut failures: Vec<String> = Vec::new();
    let mut cross_checked = 0usize;
    for (k, request) in requests.iter().enumerate() {
        let image = &state.images[&request.image];
        let started = Instant::now();
        let req = match view.request(request, image) {
            Ok(r) => r,
            Err(e) => panic!("request {} does not parse: {e}", request.name),
        };
        let decision = view.place(&req);
        if let Ok(i) = decision {
            view.commit(i, &req);
        }
        let took = started.elapsed();
        deciding += took;
        this_thousand += took;
        if (k + 1) % 1000 == 0 {
            slowest_thousand = slowest_thousand.max(this_thousand);
            this_thousand = Duration::ZERO;
        }
        let chosen = decision.map(|i| view.node(i).name.clone());
        if k % CROSS_CHECK_EVERY == 0 {
            let apply_path = place_instance(&state, request);
            assert_eq!(
                apply_path.as_ref().map_err(|e| e.0.clone()),
                chosen.as_ref().map_err(|e| e.0.clone()),
                "the incremental view and place_instance disagree on {}",
                request.name
            );
            cross_checked += 1;
        }
        match chosen {
            Ok(node) => {
                placed += 1;
                let mut inst = request.clone();
                inst.node = node;
                state.instances.insert(inst.name.clone(), inst);
            }
            Err(e) => failures.push(format!("{}: {}", request.name, e.0)),
        }
    }

    // The apply path at the end state: building the view over every instance, then deciding.
    let probe = Instance {
        name: "probe".into(),
        image: "x86".into(),
        config: [("limits.cpu".to_string(), "1".to_string())].into(),
        ..Default::default()
    };
    let rounds = 20;
    let started = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(place_instance(&state, &probe).ok());
    }
    let apply_path = started.elapsed() / rounds;

    // Strict spread groups never share a node.
    let mut members: BTreeMap<(&str, &str), u32> = BTreeMap::new();
    for i in state.instances.values() {
        if let Some(g) = i.config.get("placement.group")
            && g.starts_with("svc")
        {
            *members.entry((g.as_str(), i.node.as_str())).or_insert(0) += 1;
        }
    }
    assert!(
        members.values().all(|&n| n == 1),
        "a strict spread group has two members on one node"
    );

    let name = match policy {
        Policy::Spread => "spread",
        Policy::Binpack => "binpack",
    };
    println!("policy {name}: {NODES} nodes, {INSTANCES} instances");
    println!(
        "  placed {placed}, refused {}; {:.0} decisions/s; {:.1} ms for all, slowest 1000 in {:.1} ms",
        INSTANCES - placed,
        INSTANCES as f64 / deciding.as_secs_f64(),
        deciding.as_secs_f64() * 1e3,
        slowest_thousand.as_secs_f64() * 1e3
    );
    println!(
        "  place_instance on the final state (view built from {} instances): {:.2} ms per decision; {cross_checked} decisions cross-checked against it",
        state.instances.len(),
        apply_path.as_secs_f64() * 1e3
    );
    for f in failures.iter().take(2) {
        println!("  refused {f}");
    }
    // Balance over the nodes automatic placement may use: online, not evacuated, not manual,
    // holding the image of their architecture.
    let holds_image = |n: &str| state.images.values().any(|i| i.locations.contains(n));
    let usable: Vec<_> = view
        .nodes()
        .iter()
        .filter(|n| n.online && !n.evacuated && !n.manual && holds_image(&n.name))
        .collect();
    let cpu: Vec<f64> = usable
        .iter()
        .map(|n| n.usage.cpus as f64 / f64::from(n.cpus))
        .collect();
    let mem: Vec<f64> = usable
        .iter()
        .map(|n| n.usage.memory_bytes as f64 / n.memory_bytes as f64)
        .collect();
    let count: Vec<f64> = usable
        .iter()
        .map(|n| f64::from(n.usage.instances))
        .collect();
    let empty = usable.iter().filter(|n| n.usage.instances == 0).count();
    println!("  over {} usable nodes ({empty} left empty):", usable.len());
    print_stats("allocated cpu fraction", &stats(&cpu));
    print_stats("allocated memory fraction", &stats(&mem));
    print_stats("instances per node", &stats(&count));
    for arch in ["x86_64", "aarch64"] {
        let cpu: Vec<f64> = usable
            .iter()
            .filter(|n| n.architecture == arch)
            .map(|n| n.usage.cpus as f64 / f64::from(n.cpus))
            .collect();
        print_stats(&format!("cpu fraction, {arch} only"), &stats(&cpu));
    }
}

fn main() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let cluster = build_cluster(&mut rng);
    let requests = build_requests(&mut rng);
    let (cpus, memory) = cluster.nodes.values().fold((0u64, 0u64), |(c, m), n| {
        (c + u64::from(n.cpus), m + n.memory_bytes)
    });
    let (want_cpus, want_memory) = requests.iter().fold((0u64, 0u64), |(c, m), i| {
        let cpu = i
            .config
            .get("limits.cpu")
            .map_or(0, |v| v.parse().unwrap_or(0));
        let mem = i
            .config
            .get("limits.memory")
            .map_or(0, |v| berth_proto::api::config::parse_bytes(v).unwrap_or(0));
        (c + cpu, m + mem)
    });
    println!(
        "cluster: {NODES} nodes, {cpus} CPUs, {} GiB; requests: {INSTANCES} instances claiming {want_cpus} CPUs ({:.0}%), {} GiB ({:.0}%)",
        memory / GIB,
        100.0 * want_cpus as f64 / cpus as f64,
        want_memory / GIB,
        100.0 * want_memory as f64 / memory as f64
    );
    simulate(&cluster, &requests, Policy::Spread);
    simulate(&cluster, &requests, Policy::Binpack);
}
