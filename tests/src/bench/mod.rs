//! `berth-bench` (`make bench`): the benchmark suite that runs the same scenarios against a
//! running Berth and, when it is installed and initialised, LXD on the same machine, with the
//! same image contents, alternating the two so drift hits both; prints a table and writes the
//! raw samples as JSON. See docs/benchmarks.md.
//!
//! - [`system`]: the two systems driven through their CLIs (timed commands, cleanup, images);
//! - [`scenarios`]: what each scenario runs;
//! - [`host`]: memory and process readings from the host;
//! - [`report`]: statistics, targets and the table (pure).

pub mod host;
pub mod report;
pub mod scenarios;
pub mod system;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;

use report::{Outcome, Row, format_table};
use scenarios::{DensityOpts, Results, Selection};
use system::{Kind, Side, interrupted};

/// The suite's options.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "berth-bench",
    about = "Benchmark Berth beside LXD on this machine: lifecycle, list, density, CPU (and cluster figures with --cluster)"
)]
pub struct Options {
    /// Runs of each lifecycle scenario (each system's turn alternates first and second).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Only these scenarios (comma separated ids; see docs/benchmarks.md).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Skip these scenarios (comma separated ids).
    #[arg(long, value_delimiter = ',')]
    pub skip: Vec<String>,
    /// Instance counts of the density scenario, ascending; it stops at the first that does not
    /// fit.
    #[arg(long, value_delimiter = ',', default_value = "250,1000")]
    pub density: Vec<usize>,
    /// Concurrent launch (and delete) commands in the density scenario, the same for both.
    #[arg(long, default_value_t = 4)]
    pub density_parallel: usize,
    /// Do not run anything against LXD.
    #[arg(long)]
    pub no_lxd: bool,
    /// The Berth remote to use (default: the CLI's default remote, or $BERTH_REMOTE).
    #[arg(long)]
    pub remote: Option<String>,
    /// The `berth` binary (default: $BERTH_BIN_DIR/berth, else `berth` on PATH).
    #[arg(long)]
    pub berth_bin: Option<PathBuf>,
    /// Where to write the raw samples (default: bench-results/bench-<UTC time>.json).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also run the cluster figures (API writes on 3 controllers, cross-node copy, live-move
    /// downtime) on deploy/cluster.sh clusters this run brings up and down (Berth only).
    #[arg(long)]
    pub cluster: bool,
    /// Concurrent clients of the API write figure (--cluster).
    #[arg(long, default_value_t = 64)]
    pub api_clients: usize,
    /// Seconds the API write figure runs (--cluster).
    #[arg(long, default_value_t = 20)]
    pub api_seconds: u64,
    /// MiB of random data in the instance of the cross-node copy figure (--cluster).
    #[arg(long, default_value_t = 1024)]
    pub transfer_extra_mib: u64,
}

/// Exit code when Berth cannot be reached.
pub const EXIT_UNREACHABLE: u8 = 2;

/// Runs the suite; returns the process exit code.
pub fn run(opts: Options) -> Result<u8> {
    if opts.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut sizes = opts.density.clone();
    sizes.retain(|n| *n > 0);
    sizes.sort_unstable();
    sizes.dedup();
    let sel = Selection::new(&opts.only, &opts.skip, opts.cluster)?;
    system::catch_interrupts()?;
    let started = host::utc_now("%Y-%m-%dT%H:%M:%SZ");
    let json_path = opts.json.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "bench-results/bench-{}.json",
            host::utc_now("%Y%m%dT%H%M%SZ")
        ))
    });

    // Berth.
    let berth_bin = match berth_binary(&opts) {
        Some(b) => b,
        None => {
            eprintln!(
                "berth-bench: no berth binary found (give --berth-bin, set BERTH_BIN_DIR, or run deploy/quickstart.sh, which installs it)"
            );
            return Ok(EXIT_UNREACHABLE);
        }
    };
    let mut env = Vec::new();
    if let Some(r) = &opts.remote {
        env.push((OsString::from("BERTH_REMOTE"), OsString::from(r)));
    }
    let berth = Side {
        kind: Kind::Berth,
        bin: berth_bin.clone(),
        env,
        busybox: "busybox".into(),
        debian: "debian/12".into(),
    };
    if let Err(e) = berth.list_states("", false) {
        eprintln!(
            "berth-bench: Berth is not reachable ({}); run deploy/quickstart.sh to start it, or point --remote or BERTH_REMOTE at a running cluster",
            report::shorten(&format!("{e:#}"), 200)
        );
        return Ok(EXIT_UNREACHABLE);
    }

    // LXD.
    let mut lxd_missing: Option<String> = None;
    let lxd = if opts.no_lxd {
        lxd_missing = Some("skipped (--no-lxd)".into());
        None
    } else {
        match system::which("lxc") {
            None => {
                lxd_missing = Some("not installed".into());
                None
            }
            Some(bin) => {
                let side = Side {
                    kind: Kind::Lxd,
                    bin,
                    env: Vec::new(),
                    busybox: "berth-busybox".into(),
                    debian: "berth-debian12".into(),
                };
                match side.ok(&["query", "/1.0"], Duration::from_secs(30)) {
                    Ok(_) => Some(side),
                    Err(e) => {
                        eprintln!(
                            "LXD: lxc query /1.0 failed ({}); measuring Berth only (deploy/lxd-reference.sh sets LXD up)",
                            report::shorten(&format!("{e:#}"), 200)
                        );
                        lxd_missing = Some("not installed".into());
                        None
                    }
                }
            }
        }
    };
    let mut sides = vec![berth.clone()];
    sides.extend(lxd.clone());

    let mut machine = machine_facts(&berth, lxd.as_ref());
    eprintln!(
        "machine: kernel {}, {} CPUs, {} MiB; Berth {}, LXD {}; load {}",
        machine["kernel"].as_str().unwrap_or("?"),
        machine["nproc"],
        machine["mem_total_mib"],
        machine["berth_version"].as_str().unwrap_or("?"),
        machine["lxd_version"].as_str().unwrap_or("-"),
        machine["loadavg_start"].as_str().unwrap_or("?"),
    );

    // Leftovers of a crashed run, then a guard that deletes everything at the end.
    for s in &sides {
        if let Err(e) = s.sweep() {
            bail!("cannot clear leftovers of an earlier run: {e:#}");
        }
    }
    let _guard = SweepGuard(sides.clone());

    // Images: the very same contents on both sides.
    let mut res = Results::default();
    for image in ["busybox", "debian/12"] {
        if let Err(e) = system::ensure_berth_image(&berth, image) {
            bail!("Berth has no {image} image and could not build it: {e:#}");
        }
    }
    if let Some(l) = &lxd {
        for (image, alias) in [
            ("busybox", "berth-busybox"),
            ("debian/12", "berth-debian12"),
        ] {
            match system::ensure_lxd_image(&berth, l, image, alias) {
                Ok(fp) => {
                    machine["images"][alias] = serde_json::json!({
                        "berth_image": image,
                        "berth_fingerprint": berth.image_fingerprint(image),
                        "lxd_fingerprint": fp,
                    });
                }
                Err(e) => {
                    let why = format!("importing Berth's {image} into LXD failed: {e:#}");
                    eprintln!("LXD: {why}; measuring Berth only");
                    lxd_missing = Some(format!("failed: {}", report::shorten(&why, 80)));
                    sides.truncate(1);
                    break;
                }
            }
        }
    }

    // Warm-up: LXD unpacks an image into a volume of its pool on its first use; neither side
    // should pay such one-time costs inside a measurement.
    for side in &sides {
        for image in [&side.busybox, &side.debian] {
            if interrupted() {
                break;
            }
            let name = "bench-warmup-0";
            if let Err(e) = side.timed(&["launch", image, name]) {
                eprintln!("{}: warm-up launch of {image}: {e:#}", side.kind.name());
            }
            for e in side.force_delete(&[name.to_string()], 1, true) {
                eprintln!("{}: {e}", side.kind.name());
            }
        }
    }

    // The phases.
    let write = |res: &Results, machine: &serde_json::Value, finished: Option<&str>| {
        if let Err(e) = write_json(
            &json_path,
            &opts,
            &sel,
            machine,
            res,
            &started,
            finished,
            lxd_missing.as_deref(),
        ) {
            eprintln!("berth-bench: {e:#}");
        }
    };
    scenarios::lifecycle(&sides, opts.runs, &sel, &mut res);
    write(&res, &machine, None);
    if (sel.has("density") || sel.has("list")) && !sizes.is_empty() && !interrupted() {
        let d = DensityOpts {
            sizes: sizes.clone(),
            parallel: opts.density_parallel.max(1),
            list: sel.has("list"),
            density: sel.has("density"),
        };
        for side in &sides {
            if interrupted() {
                break;
            }
            scenarios::density(side, &d, &mut res);
        }
        write(&res, &machine, None);
    }
    if sel.has("cpu") && !interrupted() {
        scenarios::cpu(&sides, &mut res);
        write(&res, &machine, None);
    }
    if sel.has("cluster") && !interrupted() {
        cluster(&opts, &berth_bin, &mut res);
    }

    // Sides that were not measured.
    let cluster_rows = [
        "api-writes",
        "api-p99",
        "copy-cross-node-vs-raw",
        "move-downtime-busybox",
        "move-downtime-debian",
    ];
    for row in &mut res.rows {
        let base = row.id.split('@').next().unwrap_or(&row.id).to_string();
        if cluster_rows.contains(&base.as_str()) {
            row.lxd = Outcome::NotRun("—".into());
        } else if let Some(why) = &lxd_missing {
            row.lxd = Outcome::NotRun(why.clone());
        }
    }
    machine["loadavg_end"] = host::loadavg().into();
    let finished = host::utc_now("%Y-%m-%dT%H:%M:%SZ");
    write(&res, &machine, Some(&finished));

    println!();
    print!("{}", format_table(&res.rows));
    for d in &res.details {
        println!("{d}");
    }
    println!(
        "raw samples: {} (load average at start {}, at end {})",
        json_path.display(),
        machine["loadavg_start"].as_str().unwrap_or("?"),
        machine["loadavg_end"].as_str().unwrap_or("?")
    );
    if interrupted() {
        return Ok(130);
    }
    Ok(0)
}

/// Deletes every `bench-*` instance on each side when dropped (also after a failure or an
/// interrupt).
struct SweepGuard(Vec<Side>);

impl Drop for SweepGuard {
    fn drop(&mut self) {
        for s in &self.0 {
            if let Err(e) = s.sweep() {
                eprintln!(
                    "berth-bench: cleaning up on {} failed: {e:#}; delete the bench-* instances by hand",
                    s.kind.name()
                );
            }
        }
    }
}

/// The `berth` binary: `--berth-bin`, else `$BERTH_BIN_DIR/berth`, else `berth` on PATH.
fn berth_binary(opts: &Options) -> Option<PathBuf> {
    if let Some(b) = &opts.berth_bin {
        return Some(b.clone());
    }
    if let Some(d) = std::env::var_os("BERTH_BIN_DIR") {
        let p = PathBuf::from(d).join("berth");
        if p.is_file() {
            return Some(p);
        }
    }
    system::which("berth")
}

/// Kernel, CPUs, memory, versions, date and load.
fn machine_facts(berth: &Side, lxd: Option<&Side>) -> serde_json::Value {
    serde_json::json!({
        "kernel": host::read_trimmed("/proc/sys/kernel/osrelease"),
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "mem_total_mib": host::mem_total_mib().map(|m| m.round()).unwrap_or(0.0),
        "berth_version": berth.server_version(),
        "berth_cli": berth.bin.display().to_string(),
        "lxd_version": lxd.map(Side::server_version),
        "date": host::utc_now("%Y-%m-%dT%H:%M:%SZ"),
        "loadavg_start": host::loadavg(),
        "images": {},
    })
}

fn outcome_json(o: &Outcome) -> serde_json::Value {
    match o {
        Outcome::NotRun(why) => serde_json::json!({ "not_run": why }),
        Outcome::Measured { samples, errors } => {
            let mm = report::min_max(samples);
            serde_json::json!({
                "samples": samples,
                "errors": errors,
                "median": report::median(samples),
                "min": mm.map(|m| m.0),
                "max": mm.map(|m| m.1),
            })
        }
    }
}

fn row_json(r: &Row) -> serde_json::Value {
    let (b, l) = (r.berth.median(), r.lxd.median());
    serde_json::json!({
        "id": r.id,
        "unit": r.unit.label(),
        "berth": outcome_json(&r.berth),
        "lxd": outcome_json(&r.lxd),
        "ratio": report::ratio(b, l),
        "target": r.target.describe(r.unit),
        "met": r.target.met(b, l),
    })
}

#[allow(clippy::too_many_arguments)]
fn write_json(
    path: &Path,
    opts: &Options,
    sel: &Selection,
    machine: &serde_json::Value,
    res: &Results,
    started: &str,
    finished: Option<&str>,
    lxd_missing: Option<&str>,
) -> Result<()> {
    let mut v = serde_json::json!({
        "format": 1,
        "started": started,
        "finished": finished,
        "machine": machine,
        "options": {
            "runs": opts.runs,
            "scenarios": sel.0.iter().collect::<Vec<_>>(),
            "density": opts.density,
            "density_parallel": opts.density_parallel,
            "remote": opts.remote,
            "lxd": lxd_missing.unwrap_or("measured"),
        },
        "rows": res.rows.iter().map(row_json).collect::<Vec<_>>(),
        "details": res.details,
    });
    for (k, x) in &res.extra {
        v[k] = x.clone();
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&v).context("cannot encode the results")?;
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// The repository's root (for deploy/cluster.sh).
fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).unwrap_or(manifest)
}

/// Settings of the dev cluster the API figure runs on: its own prefix, bridge, nets, nft table
/// and base dir, so it coexists with the quickstart and with the e2e tests' dev cluster.
const API_CLUSTER_ENV: [(&str, &str); 6] = [
    ("BERTH_DEV_BASE", "/var/lib/berth-dev-bench"),
    ("BERTH_DEV_PREFIX", "bbench-"),
    ("BERTH_DEV_BRIDGE", "berthbench0"),
    ("BERTH_DEV_NET", "10.98.0"),
    ("BERTH_DEV_INSTANCE_NET", "10.102"),
    ("BERTH_DEV_NFT_TABLE", "berthbench"),
];

/// A `deploy/cluster.sh` cluster, taken down when dropped.
struct ApiCluster {
    bin_dir: PathBuf,
}

impl ApiCluster {
    fn script(&self, args: &[&str], timeout: Duration) -> Result<system::CmdOutput> {
        let mut cmd = Command::new("bash");
        cmd.arg(repo_root().join("deploy/cluster.sh"))
            .args(args)
            .env("BERTH_BIN", &self.bin_dir);
        for (k, v) in API_CLUSTER_ENV {
            cmd.env(k, v);
        }
        let show = format!("deploy/cluster.sh {}", args.join(" "));
        let out = system::run_bounded(cmd, &show, timeout, true, args == ["down"])?;
        if !out.status.success() {
            bail!("{}", system::failure(&show, &out));
        }
        Ok(out)
    }
}

impl Drop for ApiCluster {
    fn drop(&mut self) {
        if let Err(e) = self.script(&["down"], Duration::from_secs(300)) {
            eprintln!("berth-bench: {e:#}");
        }
    }
}

/// Reads a JSON file a figure program wrote.
fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// The cluster figures (Berth only): API writes with many clients on 3 controllers, then
/// cross-node copy throughput and live-move downtime (berth-transfer-bench, which brings its
/// own cluster up and down).
fn cluster(opts: &Options, berth_bin: &Path, res: &mut Results) {
    // The daemons and figure programs next to this program (target/release), else next to
    // the berth CLI.
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
        .filter(|d| d.join("berthd").is_file() && d.join("berth-agent").is_file())
        .or_else(|| berth_bin.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let tmp = match tempfile::tempdir() {
        Ok(t) => t,
        Err(e) => {
            res.record(
                "api-writes",
                Kind::Berth,
                Err(format!("no temporary directory: {e}")),
            );
            return;
        }
    };
    let clients = opts.api_clients;
    let id = format!("api-writes@{clients}");
    let p99 = format!("api-p99@{clients}");
    eprintln!("cluster: API writes, {clients} clients on 3 controllers");
    let r = (|| -> Result<serde_json::Value> {
        let c = ApiCluster {
            bin_dir: bin_dir.clone(),
        };
        // A cluster a killed run left behind.
        let _ = c.script(&["down"], Duration::from_secs(300));
        c.script(&["up"], Duration::from_secs(600))?;
        let base = PathBuf::from(API_CLUSTER_ENV[0].1);
        let conf = base.join("cli");
        let mut build = Command::new(berth_bin);
        build
            .args(["image", "build", "busybox", "--target", "n1"])
            .env("BERTH_CONF", &conf)
            .env_remove("BERTH_REMOTE")
            .env_remove("BERTH_URL");
        let out = system::run_bounded(
            build,
            "berth image build busybox",
            Duration::from_secs(300),
            true,
            false,
        )?;
        if !out.status.success() {
            bail!("{}", system::failure("berth image build busybox", &out));
        }
        let urls: Vec<String> = (1..=3)
            .map(|k| format!("https://10.98.0.1{k}:8443"))
            .collect();
        let json = tmp.path().join("api.json");
        let mut cmd = Command::new(bin_dir.join("berth-api-bench"));
        cmd.arg("--urls")
            .arg(urls.join(","))
            .arg("--key-file")
            .arg(conf.join("admin.key"))
            .arg("--ca-file")
            .arg(conf.join("ca.pem"))
            .arg("--clients")
            .arg(clients.to_string())
            .arg("--seconds")
            .arg(opts.api_seconds.to_string())
            .arg("--json")
            .arg(&json);
        let out = system::run_bounded(
            cmd,
            "berth-api-bench",
            Duration::from_secs(opts.api_seconds + 120),
            true,
            false,
        )?;
        if !out.status.success() {
            bail!("{}", system::failure("berth-api-bench", &out));
        }
        read_json(&json)
    })();
    match r {
        Ok(v) => {
            let tp = v["writes_per_s"].as_f64();
            let p = v["latency_ms"]["p99"].as_f64();
            res.record(
                &id,
                Kind::Berth,
                tp.map(|x| vec![x])
                    .ok_or_else(|| "no writes_per_s in the JSON".into()),
            );
            res.record(
                &p99,
                Kind::Berth,
                p.map(|x| vec![x])
                    .ok_or_else(|| "no p99 in the JSON".into()),
            );
            res.detail(format!(
                "cluster API writes: {} clients on 3 controllers: {:.0} writes/s, p50 {:.1} ms, p99 {:.1} ms, errors {}",
                clients,
                tp.unwrap_or(0.0),
                v["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
                p.unwrap_or(0.0),
                v["errors_total"].as_u64().unwrap_or(0)
            ));
            res.extra.insert("cluster_api".into(), v);
        }
        Err(e) => {
            let e = format!("{e:#}");
            eprintln!("  {e}");
            res.record(&id, Kind::Berth, Err(e.clone()));
            res.record(&p99, Kind::Berth, Err(e));
        }
    }
    if interrupted() {
        return;
    }
    eprintln!("cluster: cross-node copy and live-move downtime (berth-transfer-bench)");
    let json = tmp.path().join("transfer.json");
    let r = (|| -> Result<serde_json::Value> {
        let mut cmd = Command::new(bin_dir.join("berth-transfer-bench"));
        cmd.arg("--extra-mib")
            .arg(opts.transfer_extra_mib.to_string())
            .arg("--json")
            .arg(&json)
            .env("BERTH_BIN_DIR", &bin_dir);
        let out = system::run_bounded(
            cmd,
            "berth-transfer-bench",
            Duration::from_secs(3600),
            true,
            false,
        )?;
        if !out.status.success() {
            bail!("{}", system::failure("berth-transfer-bench", &out));
        }
        read_json(&json)
    })();
    match r {
        Ok(v) => {
            let copy = &v["copy"];
            match copy["ratio"].as_f64() {
                Some(x) => {
                    res.record("copy-cross-node-vs-raw", Kind::Berth, Ok(vec![x]));
                    res.detail(format!(
                        "cluster copy: {:.0} MiB stream, Berth {:.2} s ({:.0} MiB/s), raw btrfs send|receive {:.2} s ({:.0} MiB/s), ratio {x:.2}",
                        copy["stream_mib"].as_f64().unwrap_or(0.0),
                        copy["berth_seconds"].as_f64().unwrap_or(0.0),
                        copy["berth_mib_per_s"].as_f64().unwrap_or(0.0),
                        copy["raw_seconds"].as_f64().unwrap_or(0.0),
                        copy["raw_mib_per_s"].as_f64().unwrap_or(0.0),
                    ));
                }
                None => res.record(
                    "copy-cross-node-vs-raw",
                    Kind::Berth,
                    Err("berth-transfer-bench reported no copy".into()),
                ),
            }
            for (image, id) in [
                ("busybox", "move-downtime-busybox"),
                ("debian/12", "move-downtime-debian"),
            ] {
                let samples: Vec<f64> = v["downtime"]
                    .as_array()
                    .and_then(|a| a.iter().find(|d| d["image"] == image))
                    .and_then(|d| d["samples_ms"].as_array())
                    .map(|s| s.iter().filter_map(serde_json::Value::as_f64).collect())
                    .unwrap_or_default();
                if samples.is_empty() {
                    res.record(id, Kind::Berth, Err("no downtime samples".into()));
                } else {
                    res.record(id, Kind::Berth, Ok(samples));
                }
            }
            res.extra.insert("cluster_transfer".into(), v);
        }
        Err(e) => {
            let e = format!("{e:#}");
            eprintln!("  {e}");
            for id in [
                "copy-cross-node-vs-raw",
                "move-downtime-busybox",
                "move-downtime-debian",
            ] {
                res.record(id, Kind::Berth, Err(e.clone()));
            }
        }
    }
}
