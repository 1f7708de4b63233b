#![allow(clippy::unwrap_used)]

use super::*;

const MOUNTINFO: &str = "\
25 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 25 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
33 30 0:29 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset,clone_children
34 30 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
35 30 0:31 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
36 30 0:32 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,release_agent=/x,name=systemd
37 30 0:33 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
38 30 0:33 / /mnt/again rw,relatime - cgroup2 cgroup2 rw
";

#[test]
fn parses_hybrid_mountinfo() {
    let hs = parse_mountinfo(MOUNTINFO);
    assert_eq!(hs.len(), 7);
    assert_eq!(hs[0].mount, PathBuf::from("/sys/fs/cgroup/cpu"));
    assert_eq!(hs[2].controllers, Some(vec!["cpuset".to_string()]));
    assert_eq!(hs[5].controllers, Some(vec!["name=systemd".to_string()]));
    assert_eq!(hs[6].controllers, None);
    let cg = Cgroups::with_hierarchies(hs, false);
    assert_eq!(cg.layout(), Layout::V1Hybrid);
}

struct Fake {
    _dir: tempfile::TempDir,
    cg: Cgroups,
    root: PathBuf,
}

/// A fake v1-hybrid cgroupfs in a temp dir.
fn fake_hybrid() -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let mut hs = Vec::new();
    for c in [
        "cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "systemd",
    ] {
        std::fs::create_dir(root.join(c)).unwrap();
        let name = if c == "systemd" { "name=systemd" } else { c };
        hs.push(Hierarchy {
            mount: root.join(c),
            controllers: Some(vec![name.to_string()]),
        });
    }
    std::fs::create_dir(root.join("unified")).unwrap();
    std::fs::write(root.join("unified/cgroup.controllers"), "hugetlb\n").unwrap();
    hs.push(Hierarchy {
        mount: root.join("unified"),
        controllers: None,
    });
    std::fs::write(root.join("cpuset/cpuset.cpus"), "0-3\n").unwrap();
    std::fs::write(root.join("cpuset/cpuset.mems"), "0\n").unwrap();
    Fake {
        cg: Cgroups::with_hierarchies(hs, false),
        root,
        _dir: dir,
    }
}

#[test]
fn create_places_payload_in_every_hierarchy() {
    let f = fake_hybrid();
    // Fake cgroupfs: the kernel would create these files.
    f.cg.create("c1", None).unwrap();
    for p in f.cg.paths("c1") {
        assert!(p.is_dir(), "{p:?}");
        assert!(p.ends_with("berth.payload.c1"));
    }
    let cs = f.root.join("cpuset/berth.payload.c1");
    assert_eq!(
        std::fs::read_to_string(cs.join("cpuset.cpus")).unwrap(),
        "0-3"
    );
    assert_eq!(
        std::fs::read_to_string(cs.join("cpuset.mems")).unwrap(),
        "0"
    );
    assert_eq!(
        std::fs::read_to_string(cs.join("cgroup.clone_children")).unwrap(),
        "1"
    );
    // Idempotent.
    f.cg.create("c1", None).unwrap();
}

#[test]
fn create_chowns_to_root_gid() {
    let f = fake_hybrid();
    for h in f.cg.hierarchies() {
        let d = h.mount.join("berth.payload.c2");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("cgroup.procs"), "").unwrap();
        std::fs::write(d.join("tasks"), "").unwrap();
    }
    f.cg.create("c2", Some(1_065_536)).unwrap();
    use std::os::unix::fs::MetadataExt;
    let d = f.root.join("memory/berth.payload.c2");
    let m = std::fs::metadata(&d).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 1_065_536, 0o775));
    let m = std::fs::metadata(d.join("cgroup.procs")).unwrap();
    assert_eq!((m.gid(), m.mode() & 0o7777), (1_065_536, 0o664));
    let m = std::fs::metadata(d.join("tasks")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o664);
}

#[test]
fn limits_are_written_and_read_back() {
    let f = fake_hybrid();
    f.cg.create("c3", None).unwrap();
    let mut cfg = BTreeMap::new();
    cfg.insert("limits.cpu".to_string(), "1".to_string());
    cfg.insert("limits.cpu.allowance".to_string(), "50%".to_string());
    cfg.insert("limits.memory".to_string(), "64MiB".to_string());
    cfg.insert("limits.processes".to_string(), "100".to_string());
    let l = Limits::from_config(&cfg, &[0, 1, 2, 3], 1 << 30).unwrap();
    assert_eq!(l.cpus, Some(vec![0]));
    assert_eq!(l.cpu_quota, Some((50_000, 100_000)));
    assert_eq!(l.memory_bytes, Some(64 << 20));
    f.cg.apply_limits("c3", &l).unwrap();
    let p = f.root.join("memory/berth.payload.c3/memory.limit_in_bytes");
    assert_eq!(
        std::fs::read_to_string(p).unwrap(),
        (64u64 << 20).to_string()
    );
    let back = f.cg.read_limits("c3");
    assert_eq!(back.get("limits.cpu").map(String::as_str), Some("0"));
    assert_eq!(back.get("limits.memory"), Some(&(64u64 << 20).to_string()));
    assert_eq!(
        back.get("limits.processes").map(String::as_str),
        Some("100")
    );
    assert_eq!(
        back.get("limits.cpu.allowance").map(String::as_str),
        Some("50ms/100ms")
    );

    // Removing the keys resets to unlimited.
    f.cg.apply_limits("c3", &Limits::default()).unwrap();
    let p = f.root.join("memory/berth.payload.c3/memory.limit_in_bytes");
    assert_eq!(std::fs::read_to_string(p).unwrap(), "-1");
    let cs = f.root.join("cpuset/berth.payload.c3/cpuset.cpus");
    assert_eq!(std::fs::read_to_string(cs).unwrap(), "0-3");
    let back = f.cg.read_limits("c3");
    assert!(back.is_empty(), "{back:?}");
}

#[test]
fn cpu_set_outside_host_is_refused() {
    let mut cfg = BTreeMap::new();
    cfg.insert("limits.cpu".to_string(), "5-6".to_string());
    assert!(matches!(
        Limits::from_config(&cfg, &[0, 1], 1 << 30),
        Err(CgroupError::InvalidLimit(_))
    ));
    cfg.insert("limits.cpu".to_string(), "8".to_string());
    assert_eq!(
        Limits::from_config(&cfg, &[0, 1], 1 << 30).unwrap().cpus,
        Some(vec![0, 1])
    );
}

#[test]
fn usage_reads_v1_files() {
    let f = fake_hybrid();
    f.cg.create("c4", None).unwrap();
    std::fs::write(
        f.root.join("memory/berth.payload.c4/memory.usage_in_bytes"),
        "4096\n",
    )
    .unwrap();
    std::fs::write(
        f.root.join("cpuacct/berth.payload.c4/cpuacct.usage"),
        "123\n",
    )
    .unwrap();
    std::fs::write(f.root.join("pids/berth.payload.c4/pids.current"), "3\n").unwrap();
    assert_eq!(
        f.cg.usage("c4"),
        Usage {
            memory_bytes: 4096,
            cpu_ns: 123,
            processes: 3
        }
    );
}

#[test]
fn destroy_removes_nested_bottom_up() {
    let f = fake_hybrid();
    f.cg.create("c5", None).unwrap();
    let nested = f
        .root
        .join("systemd/berth.payload.c5/system.slice/foo.service");
    std::fs::create_dir_all(&nested).unwrap();
    std::fs::write(nested.join("cgroup.procs"), "").unwrap();
    assert!(f.cg.exists("c5"));
    f.cg.destroy("c5").unwrap();
    assert!(!f.cg.exists("c5"));
    // Already gone is fine.
    f.cg.destroy("c5").unwrap();
}

#[test]
fn exec_files_use_unified_leaf() {
    let f = fake_hybrid();
    f.cg.create("c6", None).unwrap();
    let files = f.cg.exec_procs_files("c6").unwrap();
    assert_eq!(files.len(), 8);
    assert!(files.contains(&f.root.join("unified/berth.payload.c6/.berth/cgroup.procs")));
    assert!(files.contains(&f.root.join("memory/berth.payload.c6/cgroup.procs")));
}

#[test]
fn parent_is_configurable() {
    let f = fake_hybrid();
    let cg = f.cg.clone().with_parent("berth");
    cg.create("c7", None).unwrap();
    assert!(f.root.join("pids/berth/berth.payload.c7").is_dir());
    // The intermediate cpuset parent gets CPUs too, else nothing could join it.
    assert_eq!(
        std::fs::read_to_string(f.root.join("cpuset/berth/cpuset.cpus")).unwrap(),
        "0-3"
    );
}

#[test]
fn monitor_cgroup_enter_and_leave() {
    let f = fake_hybrid();
    f.cg.enter_monitor("c8", 4242).unwrap();
    let d = f.root.join("memory/berth.monitor.c8");
    assert_eq!(
        std::fs::read_to_string(d.join("cgroup.procs")).unwrap(),
        "4242"
    );
    assert_eq!(
        std::fs::read_to_string(f.root.join("cpuset/berth.monitor.c8/cpuset.cpus")).unwrap(),
        "0-3"
    );
    f.cg.leave_monitor("c8", Some(4242)).unwrap();
    assert!(!d.exists());
    assert_eq!(
        std::fs::read_to_string(f.root.join("memory/cgroup.procs")).unwrap(),
        "4242"
    );
}

#[test]
fn v2_limits_and_usage() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    std::fs::write(
        root.join("cgroup.controllers"),
        "cpuset cpu io memory pids\n",
    )
    .unwrap();
    std::fs::write(root.join("cpuset.cpus.effective"), "0-1\n").unwrap();
    let cg = Cgroups::with_hierarchies(
        vec![Hierarchy {
            mount: root.clone(),
            controllers: None,
        }],
        false,
    );
    assert_eq!(cg.layout(), Layout::V2);
    for f in ["cgroup.procs", "cgroup.threads", "cgroup.subtree_control"] {
        std::fs::create_dir_all(root.join("berth.payload.v")).unwrap();
        std::fs::write(root.join("berth.payload.v").join(f), "").unwrap();
    }
    cg.create("v", Some(2_000_000)).unwrap();
    assert_eq!(
        std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
        "+cpu +cpuset +memory +pids"
    );
    let mut cfg = BTreeMap::new();
    cfg.insert("limits.cpu".to_string(), "1".to_string());
    cfg.insert("limits.cpu.allowance".to_string(), "25ms/100ms".to_string());
    cfg.insert("limits.memory".to_string(), "1GiB".to_string());
    cfg.insert("limits.processes".to_string(), "50".to_string());
    let l = Limits::from_config(&cfg, &[0, 1], 4 << 30).unwrap();
    cg.apply_limits("v", &l).unwrap();
    let d = root.join("berth.payload.v");
    let rd = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    assert_eq!(rd("cpu.max"), "25000 100000");
    assert_eq!(rd("memory.max"), (1u64 << 30).to_string());
    assert_eq!(rd("pids.max"), "50");
    assert_eq!(rd("cpuset.cpus"), "0");
    let back = cg.read_limits("v");
    assert_eq!(
        back.get("limits.cpu.allowance").map(String::as_str),
        Some("25ms/100ms")
    );
    assert_eq!(back.get("limits.processes").map(String::as_str), Some("50"));
    cg.apply_limits("v", &Limits::default()).unwrap();
    assert_eq!(rd("cpu.max"), "max 100000");
    assert_eq!(rd("memory.max"), "max");
    assert_eq!(rd("pids.max"), "max");
    assert_eq!(rd("cpuset.cpus"), "");
    std::fs::write(d.join("memory.current"), "8192\n").unwrap();
    std::fs::write(d.join("cpu.stat"), "usage_usec 7\nuser_usec 5\n").unwrap();
    let u = cg.usage("v");
    assert_eq!((u.memory_bytes, u.cpu_ns), (8192, 7000));
    let files = cg.exec_procs_files("v").unwrap();
    assert_eq!(files, vec![d.join(".berth/cgroup.procs")]);
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(d.join("cgroup.subtree_control")).unwrap();
    assert_eq!((m.gid(), m.mode() & 0o777), (2_000_000, 0o664));
}

#[test]
fn privileged_device_rules() {
    let f = fake_hybrid();
    f.cg.create("c9", None).unwrap();
    f.cg.restrict_devices("c9").unwrap();
    let d = f.root.join("devices/berth.payload.c9");
    assert_eq!(
        std::fs::read_to_string(d.join("devices.deny")).unwrap(),
        "a"
    );
    // The fake keeps the last write only.
    assert_eq!(
        std::fs::read_to_string(d.join("devices.allow")).unwrap(),
        *DEVICE_ALLOW.last().unwrap()
    );
}

#[test]
fn scoped_instance_cgroup_names() {
    // A project's instance keeps its scoped name: distinct from the default project's
    // instance of the same own name, one path component, well under NAME_MAX, also with the
    // longest tag.
    let longest = format!("{}_{}", "p".repeat(63), "w".repeat(63));
    let long_tag = "t".repeat(TAG_MAX);
    for tag in [None, Some(long_tag.as_str())] {
        for n in ["acme_web1", longest.as_str()] {
            for d in [payload_name(tag, n), monitor_name(tag, n)] {
                assert!(d.len() <= 255 && !d.contains('/'), "{d}");
            }
        }
        assert_ne!(payload_name(tag, "acme_web1"), payload_name(tag, "web1"));
    }
}

#[test]
fn tagged_names_and_parsing() {
    assert_eq!(payload_name(None, "c1"), "berth.payload.c1");
    assert_eq!(monitor_name(None, "c1"), "berth.monitor.c1");
    assert_eq!(
        payload_name(Some("dev-n1"), "a_web"),
        "berth-dev-n1.payload.a_web"
    );
    assert_eq!(
        monitor_name(Some("dev-n1"), "a_web"),
        "berth-dev-n1.monitor.a_web"
    );
    for tag in [None, Some("dev-n1"), Some("e2e1a2b3c")] {
        for n in ["c1", "acme_web1"] {
            assert_eq!(parse_payload_name(tag, &payload_name(tag, n)), Some(n));
            assert_eq!(parse_monitor_name(tag, &monitor_name(tag, n)), Some(n));
            assert_eq!(parse_payload_name(tag, &monitor_name(tag, n)), None);
            assert_eq!(parse_monitor_name(tag, &payload_name(tag, n)), None);
        }
    }
    // Never another agent's cgroups: no tag vs a tag, a tag vs a longer one.
    assert_eq!(parse_payload_name(None, "berth-a.payload.x"), None);
    assert_eq!(parse_payload_name(Some("a"), "berth.payload.x"), None);
    assert_eq!(parse_payload_name(Some("a"), "berth-a-b.payload.x"), None);
    assert_eq!(parse_payload_name(Some("a-b"), "berth-a.payload.x"), None);
    for bad in [
        "berth.payload.",
        "berth.payload",
        "berth.lxcfs",
        "system.slice",
        "berth",
    ] {
        assert_eq!(parse_payload_name(None, bad), None, "{bad}");
    }
    for ok in ["a", "dev-n1", "e2e0a1b2c", &"x".repeat(TAG_MAX)] {
        assert!(validate_tag(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "Dev",
        "a.b",
        "a_b",
        "a/b",
        "a b",
        &"x".repeat(TAG_MAX + 1),
    ] {
        assert!(validate_tag(bad).is_err(), "{bad}");
    }
}

#[test]
fn tagged_cgroups_are_separate() {
    // Two agents on one host with an instance of the same name: each has its own cgroups in
    // every hierarchy (v1 controllers, name=systemd, unified), and neither sees the other's.
    let f = fake_hybrid();
    let a = f.cg.clone().with_tag("n1");
    let b = f.cg.clone().with_tag("n2");
    let plain = f.cg.clone().with_tag("");
    assert_eq!(plain.tag(), None);
    for cg in [&a, &b, &plain] {
        cg.create("web", None).unwrap();
        cg.apply_limits(
            "web",
            &Limits {
                cpus: Some(vec![1]),
                ..Limits::default()
            },
        )
        .unwrap();
    }
    for h in ["memory", "cpuset", "systemd", "unified"] {
        for d in [
            "berth-n1.payload.web",
            "berth-n2.payload.web",
            "berth.payload.web",
        ] {
            assert!(f.root.join(h).join(d).is_dir(), "{h}/{d}");
        }
    }
    assert_eq!(
        std::fs::read_to_string(f.root.join("cpuset/berth-n1.payload.web/cpuset.cpus")).unwrap(),
        "1"
    );
    let files = a.exec_procs_files("web").unwrap();
    assert!(
        files.contains(
            &f.root
                .join("unified/berth-n1.payload.web/.berth/cgroup.procs")
        )
    );
    assert!(files.contains(&f.root.join("systemd/berth-n1.payload.web/cgroup.procs")));
    a.enter_monitor("web", 4242).unwrap();
    assert!(f.root.join("memory/berth-n1.monitor.web").is_dir());
    assert_eq!(a.list_instances(), vec!["web".to_string()]);
    a.create("only-a", None).unwrap();
    assert_eq!(
        a.list_instances(),
        vec!["only-a".to_string(), "web".to_string()]
    );
    assert_eq!(b.list_instances(), vec!["web".to_string()]);
    assert_eq!(plain.list_instances(), vec!["web".to_string()]);
    // Destroying one agent's instance leaves the others' alone.
    a.destroy("web").unwrap();
    a.leave_monitor("web", None).unwrap();
    assert!(!a.exists("web"));
    assert!(b.exists("web") && plain.exists("web"));
    assert!(!f.root.join("memory/berth-n1.monitor.web").exists());
    assert!(f.root.join("systemd/berth-n2.payload.web").is_dir());
}
