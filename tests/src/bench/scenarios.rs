//! The scenarios: what each one runs on a side, how it is timed, and in which order the two
//! sides take their turns.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::host;
use super::report::{Outcome, Row, Target, Unit, shorten};
use super::system::{self, CmdOutput, Kind, Side, interrupted};

/// Every scenario id, in the order they run.
pub const SCENARIOS: [&str; 17] = [
    "launch-busybox",
    "stop-force-busybox",
    "launch-debian",
    "exec",
    "snapshot",
    "restore",
    "stop-clean",
    "start",
    "restart",
    "stop-force",
    "copy",
    "delete",
    "delete-running",
    "list",
    "density",
    "cpu",
    "cluster",
];

/// The steps of the debian/12 chain, in order (one instance per run and side): the scenarios
/// from `launch-debian` to `delete-running`.
fn debian_steps() -> &'static [&'static str] {
    let first = SCENARIOS.iter().position(|s| *s == "launch-debian");
    let last = SCENARIOS.iter().position(|s| *s == "delete-running");
    match (first, last) {
        (Some(a), Some(b)) => &SCENARIOS[a..=b],
        _ => &[],
    }
}

/// The `list` populations measured while the density batch grows.
pub const LIST_CHECKPOINTS: [usize; 4] = [1, 100, 250, 1000];

/// Samples of `exec -- true` per run and side.
const EXEC_SAMPLES: usize = 10;
/// Samples of `list` at each population.
const LIST_SAMPLES: usize = 5;
/// How long systemd may take to reach `running`.
const SYSTEMD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a busybox instance may take to answer its first exec.
const BUSYBOX_TIMEOUT: Duration = Duration::from_secs(60);
/// MemAvailable the density batch never goes below (MiB).
const MEM_FLOOR_MIB: f64 = 2048.0;
/// Time the instances get to settle before the memory reading.
const SETTLE: Duration = Duration::from_secs(20);

/// The unit and target of a row id (`list@1000`, `density-mem@250`, ...).
pub fn row_spec(id: &str) -> (Unit, Target) {
    let base = id.split('@').next().unwrap_or(id);
    match base {
        "launch-busybox" => (Unit::Ms, Target::RatioAtMost(0.2)),
        "launch-debian" => (Unit::Ms, Target::RatioAtMost(0.5)),
        "exec" => (Unit::Ms, Target::RatioAtMost(0.25)),
        "stop-clean" => (Unit::Ms, Target::RatioAtMost(0.5)),
        "stop-force" | "stop-force-busybox" => (Unit::Ms, Target::RatioAtMost(0.2)),
        "snapshot" => (Unit::Ms, Target::RatioAtMost(0.2)),
        "restore" => (Unit::Ms, Target::RatioAtMost(0.25)),
        "copy" => (Unit::Ms, Target::RatioAtMost(0.2)),
        "delete" => (Unit::Ms, Target::RatioAtMost(0.5)),
        "list" if id == "list@1000" => (Unit::Ms, Target::BerthAtMost(50.0)),
        "density-mem" => (Unit::MiB, Target::BerthAtMost(3.0)),
        "density-rate" => (Unit::PerSecond, Target::None),
        "density-max" => (Unit::Count, Target::BerthAtLeast(1000.0)),
        "cpu" => (Unit::EventsPerSecond, Target::None),
        "cpu-vs-host" => (Unit::Ratio, Target::BerthAtLeast(0.98)),
        "api-writes" => (Unit::WritesPerSecond, Target::None),
        "api-p99" => (Unit::Ms, Target::None),
        "copy-cross-node-vs-raw" => (Unit::Ratio, Target::None),
        "move-downtime-busybox" | "move-downtime-debian" => (Unit::Ms, Target::None),
        _ => (Unit::Ms, Target::None),
    }
}

/// Everything measured so far.
#[derive(Debug, Default)]
pub struct Results {
    /// The rows, in the order they were first recorded.
    pub rows: Vec<Row>,
    /// Lines printed under the table (density details, cluster figures).
    pub details: Vec<String>,
    /// Scenario details for the JSON (density, cpu, cluster).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Results {
    /// The row `id`, made (with its unit and target) when first used.
    pub fn row(&mut self, id: &str) -> &mut Row {
        let i = match self.rows.iter().position(|r| r.id == id) {
            Some(i) => i,
            None => {
                let (unit, target) = row_spec(id);
                self.rows.push(Row {
                    id: id.to_string(),
                    unit,
                    berth: Outcome::empty(),
                    lxd: Outcome::empty(),
                    target,
                });
                self.rows.len() - 1
            }
        };
        &mut self.rows[i]
    }

    fn outcome(&mut self, id: &str, kind: Kind) -> &mut Outcome {
        let row = self.row(id);
        match kind {
            Kind::Berth => &mut row.berth,
            Kind::Lxd => &mut row.lxd,
        }
    }

    /// Records samples (or the error) of `kind` for row `id`.
    pub fn record(&mut self, id: &str, kind: Kind, result: Result<Vec<f64>, String>) {
        let o = self.outcome(id, kind);
        if let Outcome::NotRun(_) = o {
            *o = Outcome::empty();
        }
        if let Outcome::Measured { samples, errors } = o {
            match result {
                Ok(s) => samples.extend(s),
                Err(e) => errors.push(e),
            }
        }
    }

    /// Marks `kind`'s side of row `id` as not run, with the reason shown in its cell.
    pub fn not_run(&mut self, id: &str, kind: Kind, why: &str) {
        *self.outcome(id, kind) = Outcome::NotRun(why.to_string());
    }

    /// Adds a line under the table (also echoed on stderr as progress).
    pub fn detail(&mut self, line: String) {
        eprintln!("  {line}");
        self.details.push(line);
    }
}

/// The scenarios chosen with `--only` and `--skip` (and `--cluster`).
#[derive(Debug, Clone)]
pub struct Selection(pub BTreeSet<String>);

impl Selection {
    /// Checks the ids and makes the set: `only` (empty: all but `cluster`, which needs
    /// `cluster`) minus `skip`.
    pub fn new(only: &[String], skip: &[String], cluster: bool) -> Result<Selection> {
        for id in only.iter().chain(skip) {
            if !SCENARIOS.contains(&id.as_str()) {
                bail!(
                    "unknown scenario {id}; the scenarios are {}",
                    SCENARIOS.join(", ")
                );
            }
        }
        let mut set: BTreeSet<String> = if only.is_empty() {
            SCENARIOS
                .iter()
                .filter(|s| **s != "cluster" || cluster)
                .map(|s| s.to_string())
                .collect()
        } else {
            only.iter().cloned().collect()
        };
        if cluster {
            set.insert("cluster".into());
        }
        for s in skip {
            set.remove(s);
        }
        Ok(Selection(set))
    }

    /// Whether `id` runs.
    pub fn has(&self, id: &str) -> bool {
        self.0.contains(id)
    }
}

/// The order of the sides in run `i`: Berth first on even runs, LXD first on odd ones.
pub fn order(sides: &[Side], i: usize) -> Vec<&Side> {
    let mut v: Vec<&Side> = sides.iter().collect();
    if i % 2 == 1 {
        v.reverse();
    }
    v
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn sleep_checked(d: Duration) -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    std::thread::sleep(d);
    Ok(())
}

/// Runs `exec NAME -- CMD` once (stdout captured), failing only when the command could not
/// run at all or timed out.
fn exec(side: &Side, name: &str, cmd: &[&str]) -> Result<CmdOutput> {
    let mut args = vec!["exec", name, "--"];
    args.extend_from_slice(cmd);
    side.run_with(&args, Duration::from_secs(60), true, false)
}

/// Polls `exec NAME -- true` every 10 ms until it succeeds; returns when it did.
fn wait_exec_ok(side: &Side, name: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let out = exec(side, name, &["true"])?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{name} did not answer exec within {timeout:?}: {}",
                system::failure(&side.show(&["exec", name, "--", "true"]), &out)
            );
        }
        sleep_checked(Duration::from_millis(10))?;
    }
}

/// Polls `systemctl is-system-running` every 50 ms until it prints `running`; `degraded` (or
/// anything else) after [`SYSTEMD_TIMEOUT`] fails with the failed units.
fn wait_systemd(side: &Side, name: &str) -> Result<()> {
    let deadline = Instant::now() + SYSTEMD_TIMEOUT;
    let last = loop {
        let out = exec(side, name, &["systemctl", "is-system-running"])?;
        let state = out.stdout.trim();
        if state == "running" {
            return Ok(());
        }
        if Instant::now() > deadline {
            break if state.is_empty() {
                shorten(&out.stderr, 120)
            } else {
                state.to_string()
            };
        }
        sleep_checked(Duration::from_millis(50))?;
    };
    let failed = exec(
        side,
        name,
        &["systemctl", "--failed", "--no-legend", "--plain"],
    )
    .map(|o| {
        o.stdout
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect::<Vec<_>>()
            .join(" ")
    })
    .unwrap_or_default();
    if last == "degraded" {
        bail!(
            "systemd in {name} is degraded, not running, after {SYSTEMD_TIMEOUT:?} (failed units: {})",
            if failed.is_empty() {
                "none listed"
            } else {
                &failed
            }
        );
    }
    bail!("systemd in {name} did not reach running within {SYSTEMD_TIMEOUT:?} (last state: {last})")
}

/// The debian/12 instance of one side in one run, and what is known of its state.
#[derive(Debug)]
struct Debian {
    name: String,
    copy: String,
    exists: bool,
    running: bool,
    /// systemd reported `running` since the last (re)start.
    ready: bool,
    snapshot: bool,
    copy_exists: bool,
    /// The first failure of this run: later steps are not measured.
    broken: Option<String>,
}

impl Debian {
    fn new(i: usize) -> Debian {
        Debian {
            name: format!("bench-debian-{i}"),
            copy: format!("bench-debian-{i}-copy"),
            exists: false,
            running: false,
            ready: false,
            snapshot: false,
            copy_exists: false,
            broken: None,
        }
    }

    fn ensure_ready(&mut self, side: &Side) -> Result<()> {
        if !self.exists {
            side.timed(&["launch", &side.debian, &self.name])?;
            self.exists = true;
            self.running = true;
        } else if !self.running {
            side.timed(&["start", &self.name])?;
            self.running = true;
        }
        if !self.ready {
            wait_systemd(side, &self.name)?;
            self.ready = true;
        }
        Ok(())
    }

    fn ensure_stopped(&mut self, side: &Side) -> Result<()> {
        if !self.exists {
            self.ensure_ready(side)?;
        }
        if self.running {
            side.timed(&["stop", "--force", &self.name])?;
            self.running = false;
            self.ready = false;
        }
        Ok(())
    }

    /// One step of the chain: its samples in ms.
    fn step(&mut self, side: &Side, step: &str) -> Result<Vec<f64>> {
        let n = self.name.clone();
        match step {
            "launch-debian" => {
                let t0 = Instant::now();
                side.timed(&["launch", &side.debian, &n])?;
                self.exists = true;
                self.running = true;
                wait_systemd(side, &n)?;
                self.ready = true;
                Ok(vec![ms(t0.elapsed())])
            }
            "exec" => {
                self.ensure_ready(side)?;
                (0..EXEC_SAMPLES)
                    .map(|_| side.timed(&["exec", &n, "--", "true"]).map(ms))
                    .collect()
            }
            "snapshot" => {
                self.ensure_ready(side)?;
                let d = side.timed(&["snapshot", &n, "s1"])?;
                self.snapshot = true;
                Ok(vec![ms(d)])
            }
            "restore" => {
                self.ensure_ready(side)?;
                if !self.snapshot {
                    side.timed(&["snapshot", &n, "s1"])?;
                    self.snapshot = true;
                }
                let d = side.timed(&["restore", &n, "s1"])?;
                self.ready = false;
                Ok(vec![ms(d)])
            }
            "stop-clean" => {
                self.ensure_ready(side)?;
                let d = side.timed(&["stop", &n])?;
                self.running = false;
                self.ready = false;
                Ok(vec![ms(d)])
            }
            "start" => {
                self.ensure_stopped(side)?;
                let d = side.timed(&["start", &n])?;
                self.running = true;
                Ok(vec![ms(d)])
            }
            "restart" => {
                self.ensure_ready(side)?;
                let d = side.timed(&["restart", &n])?;
                self.ready = false;
                Ok(vec![ms(d)])
            }
            "stop-force" => {
                self.ensure_ready(side)?;
                let d = side.timed(&["stop", "--force", &n])?;
                self.running = false;
                self.ready = false;
                Ok(vec![ms(d)])
            }
            "copy" => {
                self.ensure_stopped(side)?;
                let d = side.timed(&["copy", &n, &self.copy])?;
                self.copy_exists = true;
                Ok(vec![ms(d)])
            }
            "delete" => {
                if !self.copy_exists {
                    self.ensure_stopped(side)?;
                    side.timed(&["copy", &n, &self.copy])?;
                    self.copy_exists = true;
                }
                let d = side.timed(&["delete", &self.copy])?;
                self.copy_exists = false;
                Ok(vec![ms(d)])
            }
            "delete-running" => {
                self.ensure_ready(side)?;
                let d = side.timed(&["delete", "--force", &n])?;
                self.exists = false;
                self.running = false;
                self.ready = false;
                Ok(vec![ms(d)])
            }
            other => bail!("unknown step {other}"),
        }
    }

    fn teardown(&self, side: &Side) {
        let names = vec![self.name.clone(), self.copy.clone()];
        let existing: Vec<String> = side
            .list_states(system::PREFIX, true)
            .map(|l| {
                l.into_iter()
                    .map(|(n, _)| n)
                    .filter(|n| names.contains(n))
                    .collect()
            })
            .unwrap_or(names);
        for e in side.force_delete(&existing, 1, true) {
            eprintln!("  {}: {e}", side.kind.name());
        }
    }
}

/// The busybox scenarios (launch to first exec, forced stop) and the debian/12 chain, `runs`
/// times, alternating which side goes first.
pub fn lifecycle(sides: &[Side], runs: usize, sel: &Selection, res: &mut Results) {
    let busybox = sel.has("launch-busybox") || sel.has("stop-force-busybox");
    let debian_steps: Vec<&str> = debian_steps()
        .iter()
        .copied()
        .filter(|s| sel.has(s))
        .collect();
    if !busybox && debian_steps.is_empty() {
        return;
    }
    for i in 0..runs {
        if interrupted() {
            return;
        }
        let order = order(sides, i);
        eprintln!(
            "run {}/{runs}: {} first",
            i + 1,
            order.first().map_or("", |s| s.kind.name())
        );
        if busybox {
            let name = format!("bench-busybox-{i}");
            let mut launched = vec![false; order.len()];
            for (k, side) in order.iter().enumerate() {
                let r = (|| {
                    let t0 = Instant::now();
                    side.timed(&["launch", &side.busybox, &name])?;
                    launched[k] = true;
                    wait_exec_ok(side, &name, BUSYBOX_TIMEOUT)?;
                    Ok::<_, anyhow::Error>(vec![ms(t0.elapsed())])
                })();
                report(res, "launch-busybox", side.kind, sel, r);
            }
            if sel.has("stop-force-busybox") {
                for (k, side) in order.iter().enumerate() {
                    let r = if launched[k] {
                        side.timed(&["stop", "--force", &name]).map(|d| vec![ms(d)])
                    } else {
                        Err(anyhow::anyhow!(
                            "not measured: the busybox launch failed in this run"
                        ))
                    };
                    report(res, "stop-force-busybox", side.kind, sel, r);
                }
            }
            for side in &order {
                let _ = side.force_delete(std::slice::from_ref(&name), 1, true);
            }
        }
        if debian_steps.is_empty() {
            continue;
        }
        let mut debs: Vec<Debian> = order.iter().map(|_| Debian::new(i)).collect();
        for step in &debian_steps {
            for (side, deb) in order.iter().zip(debs.iter_mut()) {
                if interrupted() {
                    break;
                }
                let r = match &deb.broken {
                    Some(why) => Err(anyhow::anyhow!("not measured: {why}")),
                    None => {
                        let r = deb.step(side, step);
                        if r.is_err() {
                            deb.broken = Some(format!("{step} failed earlier in this run"));
                        }
                        r
                    }
                };
                report(res, step, side.kind, sel, r);
            }
        }
        for (side, deb) in order.iter().zip(&debs) {
            deb.teardown(side);
        }
    }
}

fn report(res: &mut Results, id: &str, kind: Kind, sel: &Selection, r: Result<Vec<f64>>) {
    if !sel.has(id) {
        return;
    }
    match &r {
        Ok(s) => {
            let text: Vec<String> = s.iter().map(|x| format!("{x:.0}")).collect();
            eprintln!("  {} {id}: {} ms", kind.name(), text.join(" "));
        }
        Err(e) => eprintln!(
            "  {} {id}: {}",
            kind.name(),
            shorten(&format!("{e:#}"), 300)
        ),
    }
    res.record(id, kind, r.map_err(|e| format!("{e:#}")));
}

/// Options of the density scenario.
#[derive(Debug, Clone)]
pub struct DensityOpts {
    /// Instance counts at which memory is measured, ascending.
    pub sizes: Vec<usize>,
    /// Concurrent launch commands.
    pub parallel: usize,
    /// Whether `list` is measured at the checkpoints.
    pub list: bool,
    /// Whether the density rows are recorded.
    pub density: bool,
}

/// The counts the batch stops at: every density size and every list checkpoint up to the
/// largest size, ascending.
pub fn density_stops(sizes: &[usize], with_list: bool) -> Vec<usize> {
    let max = sizes.iter().copied().max().unwrap_or(0);
    let mut stops: BTreeSet<usize> = sizes.iter().copied().filter(|n| *n > 0).collect();
    if with_list {
        stops.extend(LIST_CHECKPOINTS.iter().copied().filter(|c| *c <= max));
    }
    stops.into_iter().collect()
}

/// Launches `names` with `parallel` concurrent commands; stops at the first failure or when
/// MemAvailable falls below the floor. Returns the names launched, the wall-clock time of the
/// batch and the reason it stopped early, if it did.
fn launch_batch(
    side: &Side,
    names: &[String],
    parallel: usize,
) -> (Vec<String>, Duration, Option<String>) {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let launched = Mutex::new(Vec::new());
    let stop: Mutex<Option<String>> = Mutex::new(None);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..parallel.max(1) {
            s.spawn(|| {
                loop {
                    if interrupted() || stop.lock().map(|g| g.is_some()).unwrap_or(true) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(name) = names.get(i) else { break };
                    match host::mem_available_mib() {
                        Ok(m) if m < MEM_FLOOR_MIB => {
                            if let Ok(mut g) = stop.lock() {
                                g.get_or_insert(format!(
                                    "MemAvailable fell to {m:.0} MiB (the floor is {MEM_FLOOR_MIB:.0} MiB)"
                                ));
                            }
                            break;
                        }
                        _ => {}
                    }
                    match side.timed(&["launch", &side.busybox, name]) {
                        Ok(_) => {
                            if let Ok(mut l) = launched.lock() {
                                l.push(name.clone());
                            }
                        }
                        Err(e) => {
                            if let Ok(mut g) = stop.lock() {
                                g.get_or_insert(format!("launching {name} failed: {e:#}"));
                            }
                            break;
                        }
                    }
                }
            });
        }
    });
    let elapsed = t0.elapsed();
    let mut stop = stop.into_inner().unwrap_or(None);
    if stop.is_none() && interrupted() {
        stop = Some("interrupted".into());
    }
    (launched.into_inner().unwrap_or_default(), elapsed, stop)
}

/// Waits until every one of `names` is listed as running.
fn wait_all_running(side: &Side, names: &[String], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let states = side.list_states("bench-density-", false)?;
        let running: BTreeSet<&str> = states
            .iter()
            .filter(|(_, s)| s == "RUNNING")
            .map(|(n, _)| n.as_str())
            .collect();
        let missing = names
            .iter()
            .filter(|n| !running.contains(n.as_str()))
            .count();
        if missing == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{missing} of {} instances are not running after {timeout:?}",
                names.len()
            );
        }
        sleep_checked(Duration::from_secs(2))?;
    }
}

/// The density batch of one side: launches busybox instances up to each stop, measures `list`
/// at the list checkpoints and memory at the density sizes, then deletes them all.
pub fn density(side: &Side, opts: &DensityOpts, res: &mut Results) {
    let kind = side.kind;
    let stops = density_stops(&opts.sizes, opts.list);
    let Some(&max) = stops.last() else { return };
    eprintln!(
        "density on {}: up to {max} busybox instances, {} launches at a time",
        kind.name(),
        opts.parallel
    );
    let mut json = serde_json::Map::new();
    let before = match host::clean_mem_available_mib() {
        Ok(m) => m,
        Err(e) => {
            res.record("density-mem", kind, Err(format!("{e:#}")));
            return;
        }
    };
    json.insert("mem_available_before_mib".into(), before.into());
    let mut launched: Vec<String> = Vec::new();
    let mut launch_time = Duration::ZERO;
    // MiB per instance assumed before the first reading (generous: LXD needs about 15).
    let mut per_instance_guess = 25.0;
    let mut stopped: Option<String> = None;
    let mut checkpoints = Vec::new();
    for &stop in &stops {
        if interrupted() {
            stopped = Some("interrupted".into());
            break;
        }
        let want = stop - launched.len().min(stop);
        let avail = host::mem_available_mib().unwrap_or(0.0);
        let need = want as f64 * per_instance_guess;
        if avail - need < MEM_FLOOR_MIB {
            stopped = Some(format!(
                "refused to launch {want} more: about {need:.0} MiB needed, {avail:.0} MiB available, floor {MEM_FLOOR_MIB:.0} MiB"
            ));
            break;
        }
        let names: Vec<String> = (launched.len()..stop)
            .map(|k| format!("bench-density-{k}"))
            .collect();
        let (ok, elapsed, why) = launch_batch(side, &names, opts.parallel);
        launch_time += elapsed;
        launched.extend(ok);
        eprintln!(
            "  {}: {} instances launched ({:.1}/s so far)",
            kind.name(),
            launched.len(),
            launched.len() as f64 / launch_time.as_secs_f64().max(1e-9)
        );
        if let Some(why) = why {
            stopped = Some(why);
            break;
        }
        if let Err(e) = wait_all_running(side, &launched, Duration::from_secs(600)) {
            stopped = Some(format!("{e:#}"));
            break;
        }
        let mut cp = serde_json::Map::new();
        cp.insert("instances".into(), launched.len().into());
        if opts.list && LIST_CHECKPOINTS.contains(&stop) {
            let id = format!("list@{stop}");
            let mut listed = 0;
            for _ in 0..LIST_SAMPLES {
                let r = side
                    .run_with(&["list"], system::COMMAND_TIMEOUT, true, false)
                    .and_then(|o| {
                        if o.status.success() {
                            listed = o
                                .stdout
                                .lines()
                                .filter(|l| l.contains(system::PREFIX))
                                .count();
                            Ok(vec![ms(o.elapsed)])
                        } else {
                            bail!("{}", system::failure(&side.show(&["list"]), &o))
                        }
                    });
                res.record(&id, kind, r.map_err(|e| format!("{e:#}")));
            }
            if let Some(m) = res.row(&id).berth_or_lxd(kind).median() {
                eprintln!(
                    "  {} list with {stop} bench instances: median {m:.0} ms",
                    kind.name()
                );
            }
            cp.insert("list_rows_seen".into(), listed.into());
        }
        if opts.density && opts.sizes.contains(&stop) {
            eprintln!("  settling {SETTLE:?} before reading memory");
            if sleep_checked(SETTLE).is_err() {
                stopped = Some("interrupted".into());
                break;
            }
            match host::clean_mem_available_mib() {
                Ok(after) => {
                    let per = (before - after) / stop as f64;
                    per_instance_guess = (per * 1.25).max(5.0);
                    let rate = launched.len() as f64 / launch_time.as_secs_f64().max(1e-9);
                    res.record(&format!("density-mem@{stop}"), kind, Ok(vec![per]));
                    res.record(&format!("density-rate@{stop}"), kind, Ok(vec![rate]));
                    let mem = system::daemon_mem(kind, "bench-density-");
                    let daemons: Vec<String> = mem
                        .daemons
                        .iter()
                        .map(|(k, m)| format!("{k} {}", m.describe()))
                        .collect();
                    res.detail(format!(
                        "{} density {stop}: host memory {per:.2} MiB/instance (MemAvailable {before:.0} → {after:.0} MiB), launch rate {rate:.1}/s; {}; monitors {} (per instance: RSS {:.2} MiB, PSS {:.2} MiB)",
                        kind.name(),
                        daemons.join(", "),
                        mem.monitors.describe(),
                        mem.monitors.rss_kib as f64 / 1024.0 / stop as f64,
                        mem.monitors.pss_kib as f64 / 1024.0 / stop as f64,
                    ));
                    cp.insert("mem_available_after_mib".into(), after.into());
                    cp.insert("mib_per_instance".into(), per.into());
                    cp.insert("launch_rate_per_s".into(), rate.into());
                    cp.insert("launch_seconds".into(), launch_time.as_secs_f64().into());
                    cp.insert("memory".into(), mem.json());
                }
                Err(e) => res.record(&format!("density-mem@{stop}"), kind, Err(format!("{e:#}"))),
            }
        }
        checkpoints.push(serde_json::Value::Object(cp));
    }
    if opts.list {
        for &c in LIST_CHECKPOINTS.iter().filter(|c| stops.contains(c)) {
            if c > launched.len() {
                let why = stopped.clone().unwrap_or_else(|| "not reached".into());
                res.record(
                    &format!("list@{c}"),
                    kind,
                    Err(format!("only {} instances ran: {why}", launched.len())),
                );
            }
        }
    }
    if opts.density {
        res.record("density-max", kind, Ok(vec![launched.len() as f64]));
        for &n in &opts.sizes {
            if n > launched.len() {
                let why = stopped.clone().unwrap_or_else(|| "not reached".into());
                res.record(
                    &format!("density-mem@{n}"),
                    kind,
                    Err(format!("only {} of {n} launched: {why}", launched.len())),
                );
            }
        }
    }
    if let Some(why) = &stopped {
        res.detail(format!(
            "{} density stopped at {} instances: {why}",
            kind.name(),
            launched.len()
        ));
    }
    json.insert("checkpoints".into(), checkpoints.into());
    json.insert("launched".into(), launched.len().into());
    json.insert("stopped".into(), stopped.clone().into());
    // Delete the whole batch (all of bench-density-*, also any whose launch half-failed).
    let t0 = Instant::now();
    let all: Vec<String> = side
        .list_states("bench-density-", true)
        .map(|l| l.into_iter().map(|(n, _)| n).collect())
        .unwrap_or(launched);
    eprintln!("  {}: deleting {} instances", kind.name(), all.len());
    let errors = side.force_delete(&all, opts.parallel, true);
    for e in errors.iter().take(3) {
        eprintln!("  {}: {e}", kind.name());
    }
    if !errors.is_empty() {
        res.detail(format!(
            "{} density: {} of the parallel delete commands failed (first: {}); the instances left were deleted again one by one",
            kind.name(),
            errors.len(),
            shorten(&errors[0], 200)
        ));
        let left: Vec<String> = side
            .list_states("bench-density-", true)
            .map(|l| l.into_iter().map(|(n, _)| n).collect())
            .unwrap_or_default();
        for e in side.force_delete(&left, 1, true) {
            res.detail(format!(
                "{} density: deleting again: {}",
                kind.name(),
                shorten(&e, 200)
            ));
        }
    }
    json.insert("delete_seconds".into(), t0.elapsed().as_secs_f64().into());
    let key = format!("density_{}", kind.key());
    res.extra.insert(key, serde_json::Value::Object(json));
}

impl Row {
    /// `kind`'s outcome.
    pub fn berth_or_lxd(&self, kind: Kind) -> &Outcome {
        match kind {
            Kind::Berth => &self.berth,
            Kind::Lxd => &self.lxd,
        }
    }
}

/// Where the sysbench copy goes inside the instances.
const SYSBENCH_DIR: &str = "/opt/berth-bench";

/// Pushes the host's sysbench and the libraries `ldd` lists into `name` (under
/// `/opt/berth-bench`, so the instance's own libraries stay untouched).
fn push_sysbench(side: &Side, name: &str, sysbench: &std::path::Path) -> Result<()> {
    let t = Duration::from_secs(120);
    let ldd = std::process::Command::new("ldd")
        .arg(sysbench)
        .output()
        .context("cannot run ldd")?;
    let ldd = String::from_utf8_lossy(&ldd.stdout);
    if let Some(l) = ldd.lines().find(|l| l.contains("not found")) {
        bail!("sysbench needs a library the host lacks: {}", l.trim());
    }
    let libs = host::ldd_paths(&ldd);
    let bin_target = format!("{name}{SYSBENCH_DIR}/sysbench");
    side.ok(
        &[
            "file",
            "push",
            "-p",
            "--mode",
            "0755",
            &sysbench.display().to_string(),
            &bin_target,
        ],
        t,
    )?;
    for lib in libs {
        let real = std::fs::canonicalize(&lib).with_context(|| format!("cannot resolve {lib}"))?;
        let base = std::path::Path::new(&lib)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .with_context(|| format!("{lib} has no file name"))?;
        let target = format!("{name}{SYSBENCH_DIR}/lib/{base}");
        side.ok(
            &[
                "file",
                "push",
                "-p",
                "--mode",
                "0755",
                &real.display().to_string(),
                &target,
            ],
            t,
        )?;
    }
    Ok(())
}

/// The dynamic loader `ldd` lists for the host's sysbench (x86_64 glibc), pushed with it.
const SYSBENCH_LOADER: &str = "ld-linux-x86-64.so.2";

/// sysbench's arguments, the same on the host and inside.
const SYSBENCH_ARGS: [&str; 4] = ["cpu", "--threads=1", "--time=10", "run"];

/// sysbench on the host: events per second.
fn sysbench_host(sysbench: &std::path::Path) -> Result<f64> {
    let out = std::process::Command::new(sysbench)
        .args(SYSBENCH_ARGS)
        .output()
        .context("cannot run sysbench")?;
    if !out.status.success() {
        bail!(
            "sysbench on the host failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    host::sysbench_events_per_second(&String::from_utf8_lossy(&out.stdout))
        .context("sysbench printed no events per second")
}

/// sysbench inside `name`: events per second.
fn sysbench_inside(side: &Side, name: &str) -> Result<f64> {
    // Through the host's own loader, pushed with the libraries: the instance's loader may not
    // match the host's libc.
    let loader = format!("{SYSBENCH_DIR}/lib/{SYSBENCH_LOADER}");
    let lib = format!("{SYSBENCH_DIR}/lib");
    let bin = format!("{SYSBENCH_DIR}/sysbench");
    let mut args = vec!["exec", name, "--", &loader, "--library-path", &lib, &bin];
    args.extend(SYSBENCH_ARGS);
    let out = side.ok(&args, Duration::from_secs(120))?;
    host::sysbench_events_per_second(&out.stdout)
        .with_context(|| format!("sysbench in {name} printed no events per second"))
}

/// The CPU scenario: sysbench on the host and inside a running debian/12 of each side, three
/// rounds, the order rotating so each takes each position once.
pub fn cpu(sides: &[Side], res: &mut Results) {
    let name = "bench-cpu-0";
    let sysbench = match system::which("sysbench") {
        Some(p) => p,
        None => {
            for s in sides {
                res.record(
                    "cpu",
                    s.kind,
                    Err("sysbench is not installed on the host (apt-get install sysbench)".into()),
                );
            }
            return;
        }
    };
    eprintln!("cpu: preparing a debian/12 instance on each side");
    let mut ready: Vec<&Side> = Vec::new();
    for side in sides {
        let r = (|| {
            side.timed(&["launch", &side.debian, name])?;
            wait_systemd(side, name)?;
            push_sysbench(side, name, &sysbench)
        })();
        match r {
            Ok(()) => ready.push(side),
            Err(e) => {
                let e = format!("{e:#}");
                eprintln!("  {}: {e}", side.kind.name());
                res.record("cpu", side.kind, Err(e.clone()));
                res.record("cpu-vs-host", side.kind, Err(e));
            }
        }
    }
    let mut host_samples = Vec::new();
    // Entries: None = the host, Some(i) = ready[i].
    let mut slots: Vec<Option<usize>> = vec![None];
    slots.extend((0..ready.len()).map(Some));
    for round in 0..3 {
        if interrupted() {
            break;
        }
        let mut this_host = None;
        let mut inside: Vec<(Kind, Result<f64>)> = Vec::new();
        let n = slots.len();
        for k in 0..n {
            match slots[(k + round) % n] {
                None => {
                    let r = sysbench_host(&sysbench);
                    match &r {
                        Ok(v) => eprintln!("  cpu round {}: host {v:.0} events/s", round + 1),
                        Err(e) => eprintln!("  cpu round {}: host: {e:#}", round + 1),
                    }
                    this_host = r.ok();
                }
                Some(i) => {
                    let side = ready[i];
                    let r = sysbench_inside(side, name);
                    if let Ok(v) = &r {
                        eprintln!(
                            "  cpu round {}: {} {v:.0} events/s",
                            round + 1,
                            side.kind.name()
                        );
                    }
                    inside.push((side.kind, r));
                }
            }
        }
        if let Some(h) = this_host {
            host_samples.push(h);
        }
        for (kind, r) in inside {
            match r {
                Ok(v) => {
                    res.record("cpu", kind, Ok(vec![v]));
                    match this_host {
                        Some(h) if h > 0.0 => res.record("cpu-vs-host", kind, Ok(vec![v / h])),
                        _ => res.record(
                            "cpu-vs-host",
                            kind,
                            Err("the host's run in this round failed".into()),
                        ),
                    }
                }
                Err(e) => {
                    res.record("cpu", kind, Err(format!("{e:#}")));
                }
            }
        }
    }
    if let Some(m) = super::report::median(&host_samples) {
        res.detail(format!(
            "cpu: sysbench cpu --threads=1 --time=10 on the host: median {m:.0} events/s (samples {})",
            host_samples
                .iter()
                .map(|v| format!("{v:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    res.extra.insert(
        "cpu_host_events_per_s".into(),
        serde_json::Value::from(host_samples),
    );
    for side in sides {
        let _ = side.force_delete(&[name.to_string()], 1, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_chain_is_launch_to_delete_running() {
        let steps = debian_steps();
        assert_eq!(steps.len(), 11);
        assert_eq!(steps.first(), Some(&"launch-debian"));
        assert_eq!(steps.last(), Some(&"delete-running"));
        assert!(!steps.contains(&"list") && !steps.contains(&"launch-busybox"));
    }

    #[test]
    fn selection() {
        let all = Selection::new(&[], &[], false).unwrap();
        assert!(all.has("launch-busybox") && all.has("cpu") && !all.has("cluster"));
        let with_cluster = Selection::new(&[], &["cpu".into()], true).unwrap();
        assert!(with_cluster.has("cluster") && !with_cluster.has("cpu"));
        let only = Selection::new(&["exec".into(), "list".into()], &[], false).unwrap();
        assert_eq!(only.0.len(), 2);
        let err = Selection::new(&["nope".into()], &[], false).unwrap_err();
        assert!(err.to_string().starts_with("unknown scenario nope"));
    }

    #[test]
    fn stops_of_the_density_batch() {
        assert_eq!(density_stops(&[250, 1000], true), vec![1, 100, 250, 1000]);
        assert_eq!(density_stops(&[20], true), vec![1, 20]);
        assert_eq!(density_stops(&[20], false), vec![20]);
        assert_eq!(density_stops(&[], true), Vec::<usize>::new());
    }

    #[test]
    fn specs_of_rows() {
        assert_eq!(
            row_spec("launch-busybox"),
            (Unit::Ms, Target::RatioAtMost(0.2))
        );
        assert_eq!(row_spec("list@1000"), (Unit::Ms, Target::BerthAtMost(50.0)));
        assert_eq!(row_spec("list@100"), (Unit::Ms, Target::None));
        assert_eq!(
            row_spec("density-mem@250"),
            (Unit::MiB, Target::BerthAtMost(3.0))
        );
        assert_eq!(
            row_spec("cpu-vs-host"),
            (Unit::Ratio, Target::BerthAtLeast(0.98))
        );
    }

    #[test]
    fn results_record_and_order() {
        let mut r = Results::default();
        r.record("exec", Kind::Berth, Ok(vec![1.0, 2.0]));
        r.record("exec", Kind::Lxd, Err("boom".into()));
        r.record("copy", Kind::Berth, Ok(vec![3.0]));
        r.not_run("copy", Kind::Lxd, "not installed");
        assert_eq!(r.rows.len(), 2);
        assert_eq!(r.rows[0].berth.samples(), &[1.0, 2.0]);
        assert_eq!(r.rows[0].lxd.errors(), &["boom".to_string()]);
        assert_eq!(r.rows[1].lxd, Outcome::NotRun("not installed".into()));
    }

    #[test]
    fn sides_alternate() {
        let side = |kind| Side {
            kind,
            bin: "x".into(),
            env: vec![],
            busybox: String::new(),
            debian: String::new(),
        };
        let sides = vec![side(Kind::Berth), side(Kind::Lxd)];
        assert_eq!(order(&sides, 0)[0].kind, Kind::Berth);
        assert_eq!(order(&sides, 1)[0].kind, Kind::Lxd);
        assert_eq!(order(&sides[..1], 1)[0].kind, Kind::Berth);
    }
}
