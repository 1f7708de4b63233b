//! Transfer figures on a `deploy/cluster.sh` dev cluster (brought up and torn down here):
//!
//! - cross-node copy throughput of a stopped debian/12 instance carrying `--extra-mib` of
//!   incompressible data, beside raw `btrfs send | btrfs receive` of the same subvolume between
//!   the same two pools on this machine (the ratio is what counts);
//! - the stop-to-running downtime of live moves of an idle busybox and an idle debian/12
//!   instance (`--moves` each, back and forth between n1 and n2; median, min, max), as the move
//!   operations recorded them.
//!
//! Needs root and the built binaries (`make build`); run `cargo run -p berth-tests --bin
//! berth-transfer-bench --release -- --help`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use berth_tests::dev::{DevCluster, printed_downtime};
use berth_tests::wait_for;
use clap::Parser;

#[derive(Parser)]
#[command(about = "Copy throughput and live-move downtime on a dev cluster")]
struct Args {
    /// MiB of random data written into the debian/12 instance before the copy.
    #[arg(long, default_value_t = 1024)]
    extra_mib: u64,
    /// Live moves per image (the median is reported).
    #[arg(long, default_value_t = 5)]
    moves: usize,
    /// Skip the debian/12 parts (busybox downtime only).
    #[arg(long)]
    no_debian: bool,
    /// Also write the figures as JSON to this file (what `berth-bench --cluster` reads).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// The figures of one run.
#[derive(Default)]
struct Report {
    lines: Vec<String>,
    copy: Option<serde_json::Value>,
    downtime: Vec<serde_json::Value>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let c = DevCluster::up()?;
    c.berth_ok(&["image", "build", "busybox", "--target", "n1"])?;
    let mut report = Report::default();
    if !args.no_debian {
        c.berth_ok(&["image", "build", "debian/12", "--target", "n1"])?;
        copy_throughput(&c, args.extra_mib, &mut report)?;
    }
    downtime(&c, "busybox", "bb", args.moves, &mut report)?;
    if !args.no_debian {
        downtime(&c, "debian/12", "deb", args.moves, &mut report)?;
    }
    println!();
    for line in &report.lines {
        println!("{line}");
    }
    if let Some(path) = &args.json {
        let v = serde_json::json!({
            "extra_mib": args.extra_mib,
            "copy": report.copy,
            "downtime": report.downtime,
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn sh(script: &str) -> Result<()> {
    let st = Command::new("bash").arg("-c").arg(script).status()?;
    ensure!(st.success(), "{script} failed");
    Ok(())
}

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

/// The btrfs send stream size of a read-only subvolume (bytes), by sending it to wc.
fn stream_bytes(subvol: &Path) -> Result<u64> {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("btrfs send -q {} | wc -c", subvol.display()))
        .output()?;
    ensure!(out.status.success(), "btrfs send to wc failed");
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

fn copy_throughput(c: &DevCluster, extra_mib: u64, report: &mut Report) -> Result<()> {
    c.berth_ok(&["launch", "debian/12", "tp1", "--target", "n1"])?;
    let (code, _, err) = c.exec(
        "tp1",
        &[
            "sh",
            "-c",
            &format!("head -c {}M /dev/urandom > /root/extra && sync", extra_mib),
        ],
    )?;
    ensure!(code == 0, "writing the extra data failed: {err}");
    c.berth_ok(&["stop", "--force", "tp1"])?;

    // Berth: a cross-node copy of the stopped instance.
    let t = Instant::now();
    c.berth_ok(&["copy", "tp1", "tp1c", "--target", "n2"])?;
    let berth = t.elapsed();

    // Raw: the same subvolume, sent from n1's pool into n2's pool on this machine.
    let n1 = c.base.join("n1/pool");
    let n2 = c.base.join("n2/pool");
    let snap = n1.join("bench-raw-src");
    let dst = n2.join("bench-raw-dst");
    let _ = std::fs::create_dir_all(&dst);
    sh(&format!(
        "btrfs subvolume snapshot -r {} {} >/dev/null",
        n1.join("containers/tp1").display(),
        snap.display()
    ))?;
    let bytes = stream_bytes(&snap)?;
    let t = Instant::now();
    let raw = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "btrfs send -q {} | btrfs receive -q {}",
            snap.display(),
            dst.display()
        ))
        .stdout(Stdio::null())
        .status()?;
    let raw_time = t.elapsed();
    let _ = sh(&format!(
        "btrfs subvolume delete {}/bench-raw-src >/dev/null; btrfs subvolume delete {}/bench-raw-src >/dev/null; rmdir {}",
        dst.display(),
        n1.display(),
        dst.display()
    ));
    if !raw.success() {
        bail!("raw btrfs send | receive failed");
    }
    c.berth_ok(&["delete", "--force", "tp1", "tp1c"])?;
    let (b, r) = (mib_per_s(bytes, berth), mib_per_s(bytes, raw_time));
    report.copy = Some(serde_json::json!({
        "stream_mib": bytes as f64 / (1 << 20) as f64,
        "berth_seconds": berth.as_secs_f64(),
        "raw_seconds": raw_time.as_secs_f64(),
        "berth_mib_per_s": b,
        "raw_mib_per_s": r,
        "ratio": b / r,
    }));
    report.lines.push(format!(
        "cross-node copy of a stopped debian/12 with {extra_mib} MiB extra ({:.0} MiB stream): berth {:.2} s = {b:.0} MiB/s; raw btrfs send|receive {:.2} s = {r:.0} MiB/s; ratio {:.2}",
        bytes as f64 / (1 << 20) as f64,
        berth.as_secs_f64(),
        raw_time.as_secs_f64(),
        b / r
    ));
    Ok(())
}

fn downtime(
    c: &DevCluster,
    image: &str,
    name: &str,
    moves: usize,
    report: &mut Report,
) -> Result<()> {
    c.berth_ok(&["launch", image, name, "--target", "n1"])?;
    if image.starts_with("debian") {
        wait_for("systemd running", Duration::from_secs(120), || {
            c.exec(name, &["systemctl", "is-system-running"])
                .is_ok_and(|(_, o, _)| o.trim() == "running")
        })?;
    }
    let mut samples = Vec::new();
    for i in 0..moves {
        let to = if i % 2 == 0 { "n2" } else { "n1" };
        let out = c.berth_ok(&["move", name, "--target", to])?;
        let ms = printed_downtime(&out)
            .with_context(|| format!("the move printed no downtime: {out:?}"))?;
        eprintln!("{image} move {} -> {to}: downtime {ms} ms", i + 1);
        samples.push(ms);
        if image.starts_with("debian") {
            wait_for("systemd running", Duration::from_secs(120), || {
                c.exec(name, &["systemctl", "is-system-running"])
                    .is_ok_and(|(_, o, _)| o.trim() == "running")
            })?;
        }
    }
    c.berth_ok(&["delete", "--force", name])?;
    report.downtime.push(serde_json::json!({
        "image": image,
        "samples_ms": samples.clone(),
    }));
    samples.sort_unstable();
    let median = samples.get(samples.len() / 2).copied().unwrap_or_default();
    report.lines.push(format!(
        "live move downtime of an idle {image} instance ({} moves): median {median} ms, min {} ms, max {} ms",
        samples.len(),
        samples.first().copied().unwrap_or_default(),
        samples.last().copied().unwrap_or_default()
    ));
    Ok(())
}
