//! `copy` and `move`: copies of instances and snapshots, renames, and moves to other nodes,
//! with the transfer's progress drawn from the operation's metadata while it runs.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use berth_proto::api::{
    InstancePost, InstanceSource, InstancesPost, Operation, OperationStatus, Response,
    ResponseType, TransferMetadata,
};
use clap::Args;
use http::Method;

use super::instance::{create_body, instance_path};
use super::snapshot::{rename_snapshot, split_snapshot};
use super::{check_instance_name, parse_config_pairs};
use crate::client::{Client, ClientError, encode_query, operation_of};
use crate::config::split_remote;
use crate::output::human_bytes;
use crate::{Ctx, say};

/// `copy`.
#[derive(Debug, Args)]
pub struct CopyArgs {
    /// Source: an instance or a snapshot, [REMOTE:]NAME[/SNAP]
    pub source: String,
    /// The new instance, [REMOTE:]NAME (on the source's remote)
    pub destination: String,
    /// Cluster member to place the copy on (default: the source's node)
    #[arg(long, value_name = "NODE")]
    pub target: Option<String>,
    /// Copy the instance without its snapshots
    #[arg(long)]
    pub instance_only: bool,
    /// Bring an existing copy up to date, sending only what changed since the last copy
    #[arg(long)]
    pub refresh: bool,
    /// Config key/value for the copy, over the source's (KEY=VALUE, repeatable)
    #[arg(short = 'c', long = "config", value_name = "KEY=VALUE")]
    pub config: Vec<String>,
    /// Profile for the copy (repeatable, in order; default: the source's profiles)
    #[arg(short = 'p', long = "profile", value_name = "PROFILE")]
    pub profiles: Vec<String>,
    /// Create the copy without any profile
    #[arg(long, conflicts_with = "profiles")]
    pub no_profiles: bool,
    /// Start the copy once it is made
    #[arg(long)]
    pub start: bool,
    /// Do not show progress
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

/// `move` and `rename`.
#[derive(Debug, Args)]
pub struct MoveArgs {
    /// The instance or snapshot, [REMOTE:]NAME or NAME/SNAP
    pub source: String,
    /// Its new name (NAME, or NAME/NEWSNAP for a snapshot); may be left out with --target
    #[arg(required_unless_present = "target")]
    pub destination: Option<String>,
    /// Cluster member to move the instance to (a running instance moves live)
    #[arg(long, value_name = "NODE")]
    pub target: Option<String>,
    /// Do not show progress
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

/// Refuses a second remote: `what` names the command for the sentence. As with lxc, a name
/// without a prefix is on the default remote.
fn same_remote(ctx: &Ctx, src: &str, dst: &str, what: &str) -> anyhow::Result<()> {
    let (a, _) = split_remote(src);
    let (b, _) = split_remote(dst);
    if a != b {
        let ca = ctx.client(a)?;
        let cb = ctx.client(b)?;
        if ca.name() != cb.name() {
            anyhow::bail!(
                "{what} between remotes (\"{}\" to \"{}\") is not supported: {what} within one remote, or publish an image and use `berth image copy`",
                ca.name(),
                cb.name()
            );
        }
    }
    Ok(())
}

/// The request path of a create or move, with `?target=NODE` when a node is named.
pub fn target_path(base: &str, target: Option<&str>) -> String {
    match target.map(str::trim) {
        Some(t) if !t.is_empty() => format!("{base}?target={}", encode_query(t)),
        _ => base.to_string(),
    }
}

/// The body of `copy`.
pub fn copy_request(
    name: &str,
    source: &str,
    args: &CopyArgs,
) -> anyhow::Result<serde_json::Value> {
    let req = InstancesPost {
        name: name.to_string(),
        source: InstanceSource {
            kind: "copy".into(),
            source: source.to_string(),
            instance_only: args.instance_only,
            refresh: args.refresh,
            ..Default::default()
        },
        config: parse_config_pairs(&args.config)?,
        profiles: args.profiles.clone(),
        start: args.start,
        target: args.target.clone().unwrap_or_default(),
        kind: "container".into(),
        description: String::new(),
    };
    create_body(&req, args.no_profiles)
}

/// `copy`.
pub async fn copy(ctx: &Ctx, args: CopyArgs) -> anyhow::Result<i32> {
    same_remote(ctx, &args.source, &args.destination, "copying")?;
    let (client, source) = ctx.resolve(&args.source)?;
    split_snapshot(source)?;
    let (_, dest) = split_remote(&args.destination);
    check_instance_name(dest)?;
    for p in &args.profiles {
        super::check_name(berth_proto::api::names::validate_profile_name, p)?;
    }
    let body = copy_request(dest, source, &args)?;
    let path = target_path("/1.0/instances", args.target.as_deref());
    let resp = client.call(Method::POST, &path, Some(&body)).await?;
    wait_transfer(&client, resp, Progress::new(args.quiet)).await?;
    Ok(0)
}

/// `move` / `rename`: a snapshot rename (`NAME/SNAP NAME/NEW`), an instance rename
/// (`NAME NEW`) or a move to another node (`NAME --target NODE`, optionally with a new name).
pub async fn move_instance(ctx: &Ctx, args: MoveArgs) -> anyhow::Result<i32> {
    let dest_arg = args.destination.clone().unwrap_or_default();
    if !dest_arg.is_empty() {
        same_remote(ctx, &args.source, &dest_arg, "moving")?;
    }
    let (client, source) = ctx.resolve(&args.source)?;
    let (_, dest) = split_remote(&dest_arg);
    let (inst, snap) = split_snapshot(source)?;
    if let Some(snap) = snap {
        if args.target.is_some() {
            anyhow::bail!("a snapshot cannot move to another node: move its instance");
        }
        // `NAME/SNAP NAME/NEW`, or just `NEW`.
        let new = match dest.split_once('/') {
            Some((i, s)) if i == inst => s,
            Some((i, _)) => anyhow::bail!(
                "a snapshot stays with its instance: \"{i}\" is not \"{inst}\" (use `berth copy` to make a new instance from it)"
            ),
            None => dest,
        };
        rename_snapshot(&client, inst, snap, new).await?;
        return Ok(0);
    }
    let new = if dest.is_empty() { inst } else { dest };
    check_instance_name(new)?;
    let target = args
        .target
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty());
    if target.is_none() && new == inst {
        anyhow::bail!("\"{inst}\" already has that name: give a new name or --target NODE");
    }
    if let Some(node) = target {
        // A move keeps the name; a new name is a rename once it has moved.
        let body = InstancePost {
            name: inst.to_string(),
            migration: true,
            live: true,
        };
        let path = target_path(&instance_path(inst), Some(node));
        let resp = client.call(Method::POST, &path, Some(&body)).await?;
        let op = wait_transfer(&client, resp, Progress::new(args.quiet)).await?;
        let meta: TransferMetadata = serde_json::from_value(op.metadata).unwrap_or_default();
        for line in move_summary(&meta) {
            say(&line);
        }
    }
    if new != inst {
        let body = InstancePost {
            name: new.to_string(),
            ..Default::default()
        };
        client
            .run(Method::POST, &instance_path(inst), Some(&body))
            .await?;
    }
    Ok(0)
}

/// The plain lines printed after a move: the downtime of a live move, and the passes.
pub fn move_summary(meta: &TransferMetadata) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(ms) = meta.downtime_ms {
        out.push(format!("Downtime: {ms} ms"));
    }
    if !meta.passes.is_empty() {
        let passes: Vec<String> = meta
            .passes
            .iter()
            .map(|p| {
                format!(
                    "{} {} in {:.1} s",
                    p.kind,
                    human_bytes(p.bytes),
                    p.millis as f64 / 1000.0
                )
            })
            .collect();
        out.push(format!(
            "Passes: {} ({})",
            meta.passes.len(),
            passes.join(", ")
        ));
    }
    out
}

/// The progress line of a transfer: `Transferring instance: pre-copy 2: 1.50GiB (80.00MiB/s)`.
pub fn progress_line(meta: &TransferMetadata) -> String {
    let stage = if meta.stage.is_empty() {
        "starting"
    } else {
        meta.stage.as_str()
    };
    if meta.bytes == 0 && meta.rate == 0 {
        return format!("Transferring instance: {stage}");
    }
    format!(
        "Transferring instance: {stage}: {} ({}/s)",
        human_bytes(meta.bytes),
        human_bytes(meta.rate)
    )
}

/// How the progress of a transfer is shown: a line redrawn in place on a terminal, plain
/// lines when the stage changes otherwise (CI logs), or nothing.
pub struct Progress {
    mode: ProgressMode,
    last: String,
    drawn: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ProgressMode {
    Bar,
    Lines,
    Quiet,
}

impl Progress {
    /// Progress on stderr: redrawn when stderr is a terminal, else plain lines; none if `quiet`.
    pub fn new(quiet: bool) -> Progress {
        let mode = if quiet {
            ProgressMode::Quiet
        } else if std::io::stderr().is_terminal() {
            ProgressMode::Bar
        } else {
            ProgressMode::Lines
        };
        Progress {
            mode,
            last: String::new(),
            drawn: false,
        }
    }

    fn update(&mut self, meta: &TransferMetadata) {
        let mut err = std::io::stderr();
        match self.mode {
            ProgressMode::Quiet => {}
            ProgressMode::Bar => {
                let line = progress_line(meta);
                if line != self.last {
                    let _ = write!(err, "\r{line}\x1b[K");
                    let _ = err.flush();
                    self.drawn = true;
                    self.last = line;
                }
            }
            ProgressMode::Lines => {
                // One line per stage: a log gets the steps, not a line a second.
                if meta.stage != self.last && !meta.stage.is_empty() {
                    let _ = writeln!(err, "Transferring instance: {}", meta.stage);
                    self.last = meta.stage.clone();
                }
            }
        }
    }

    fn finish(&mut self) {
        if self.drawn {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
            self.drawn = false;
        }
    }
}

/// How long one poll of a running transfer waits for it to end before the progress is drawn
/// again.
const POLL: Duration = Duration::from_secs(1);

/// Waits for the operation of `resp`, showing the transfer metadata it carries while it
/// runs; `Failure` and `Cancelled` are errors (the server's sentence).
pub async fn wait_transfer(
    client: &Client,
    resp: Response,
    mut progress: Progress,
) -> Result<Operation, ClientError> {
    if resp.kind != ResponseType::Async {
        return client.finish(resp).await;
    }
    let first = operation_of(&resp)?;
    let result = poll(client, &first.id, &mut progress).await;
    progress.finish();
    result
}

async fn poll(
    client: &Client,
    id: &str,
    progress: &mut Progress,
) -> Result<Operation, ClientError> {
    let op = poll_until_done(client, id, POLL, |meta| {
        if let Ok(meta) = serde_json::from_value::<TransferMetadata>(meta.clone()) {
            progress.update(&meta);
        }
    })
    .await?;
    operation_result(op)
}

/// The final operation as a result: `Failure` and `Cancelled` become their sentence.
pub fn operation_result(op: Operation) -> Result<Operation, ClientError> {
    match op.status {
        OperationStatus::Failure => Err(ClientError::OperationFailed(if op.err.is_empty() {
            format!("operation {} failed", op.id)
        } else {
            op.err
        })),
        OperationStatus::Cancelled => Err(ClientError::OperationFailed(format!(
            "operation {} was cancelled",
            op.id
        ))),
        _ => Ok(op),
    }
}

/// Polls operation `id` (each poll waits up to `every` for it to end) until it reaches a
/// final status, and returns it whatever that status is (its metadata may say what failed);
/// `running` sees the metadata of each poll that found it still running.
pub async fn poll_until_done(
    client: &Client,
    id: &str,
    every: Duration,
    mut running: impl FnMut(&serde_json::Value),
) -> Result<Operation, ClientError> {
    let path = format!(
        "/1.0/operations/{}/wait?timeout={}",
        encode_query(id),
        every.as_secs().max(1)
    );
    loop {
        let op: Operation = client.get(&path).await?;
        match op.status {
            OperationStatus::Pending | OperationStatus::Running => running(&op.metadata),
            _ => return Ok(op),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::api::TransferPass;

    #[test]
    fn progress_and_summary_lines() {
        assert_eq!(
            progress_line(&TransferMetadata::default()),
            "Transferring instance: starting"
        );
        let meta = TransferMetadata {
            stage: "pre-copy 2".into(),
            bytes: 3 << 29,
            rate: 80 << 20,
            ..Default::default()
        };
        assert_eq!(
            progress_line(&meta),
            "Transferring instance: pre-copy 2: 1.50GiB (80.00MiB/s)"
        );
        assert!(move_summary(&TransferMetadata::default()).is_empty());
        let done = TransferMetadata {
            passes: vec![
                TransferPass {
                    kind: "pre-copy".into(),
                    bytes: 400 << 20,
                    millis: 5200,
                },
                TransferPass {
                    kind: "final".into(),
                    bytes: 2 << 20,
                    millis: 120,
                },
            ],
            downtime_ms: Some(312),
            ..Default::default()
        };
        assert_eq!(
            move_summary(&done),
            [
                "Downtime: 312 ms",
                "Passes: 2 (pre-copy 400.00MiB in 5.2 s, final 2.00MiB in 0.1 s)"
            ]
        );
    }

    #[test]
    fn paths() {
        assert_eq!(target_path("/1.0/instances", None), "/1.0/instances");
        assert_eq!(target_path("/1.0/instances", Some(" ")), "/1.0/instances");
        assert_eq!(
            target_path("/1.0/instances/web1", Some("node 2")),
            "/1.0/instances/web1?target=node%202"
        );
    }

    #[test]
    fn copy_bodies() {
        let args = CopyArgs {
            source: "web1/snap0".into(),
            destination: "web2".into(),
            target: Some("node2".into()),
            instance_only: true,
            refresh: false,
            config: vec!["user.role=clone".into()],
            profiles: vec![],
            no_profiles: false,
            start: true,
            quiet: false,
        };
        let body = copy_request("web2", "web1/snap0", &args).unwrap();
        assert_eq!(body["name"], "web2");
        assert_eq!(body["source"]["type"], "copy");
        assert_eq!(body["source"]["source"], "web1/snap0");
        assert_eq!(body["source"]["instance_only"], true);
        assert_eq!(body["config"]["user.role"], "clone");
        assert_eq!(body["start"], true);
        assert!(body.get("profiles").is_none(), "the source's profiles");
        let none = CopyArgs {
            no_profiles: true,
            ..args
        };
        assert_eq!(
            copy_request("web2", "web1", &none).unwrap()["profiles"],
            serde_json::json!([])
        );
    }
}
