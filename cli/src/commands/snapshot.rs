//! Snapshot commands: `snapshot`, `restore`, and the snapshot parts of `delete`, `move` /
//! `rename` and `info` (`NAME/SNAP` arguments, as lxc spells them).

use berth_proto::api::{
    InstancePut, InstanceSnapshot, InstanceSnapshotPost, InstanceSnapshotsPost,
};
use clap::Args;
use http::Method;

use super::check_instance_name;
use crate::Ctx;
use crate::client::{Client, encode_query};
use crate::output::{self, Format, human_bytes};

/// `snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// Instance name, optionally REMOTE:NAME
    pub name: String,
    /// Snapshot name (default: the next of snapshots.pattern, snap0, snap1...)
    pub snapshot: Option<String>,
    /// When the snapshot expires (RFC 3339, e.g. 2026-12-31T00:00:00Z; default:
    /// snapshots.expiry of the instance, if set)
    #[arg(long, value_name = "TIME")]
    pub expires_at: Option<String>,
}

/// `restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Instance name, optionally REMOTE:NAME
    pub name: String,
    /// Snapshot to restore (a running instance is stopped, restored and started again)
    pub snapshot: String,
}

/// The path of an instance's snapshots.
pub fn snapshots_path(instance: &str) -> String {
    format!("/1.0/instances/{instance}/snapshots")
}

/// The path of one snapshot.
pub fn snapshot_path(instance: &str, snapshot: &str) -> String {
    format!(
        "/1.0/instances/{instance}/snapshots/{}",
        encode_query(snapshot)
    )
}

/// Checks a snapshot name with the server's rules before sending it.
pub fn check_snapshot_name(name: &str) -> anyhow::Result<()> {
    if name.contains('/') {
        anyhow::bail!(
            "snapshot name \"{}\" may not contain \"/\"",
            name.escape_default()
        );
    }
    berth_proto::api::names::validate_snapshot_name(name).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Splits `NAME/SNAP` into the instance and the snapshot (none for a plain `NAME`), checking
/// both names.
pub fn split_snapshot(arg: &str) -> anyhow::Result<(&str, Option<&str>)> {
    match arg.split_once('/') {
        None => {
            check_instance_name(arg)?;
            Ok((arg, None))
        }
        Some((inst, snap)) => {
            check_instance_name(inst)?;
            check_snapshot_name(snap)?;
            Ok((inst, Some(snap)))
        }
    }
}

/// `snapshot`: takes a snapshot and waits for it.
pub async fn snapshot(ctx: &Ctx, args: SnapshotArgs) -> anyhow::Result<i32> {
    let (client, name) = ctx.resolve(&args.name)?;
    check_instance_name(name)?;
    let snap = args.snapshot.unwrap_or_default();
    if !snap.is_empty() {
        check_snapshot_name(&snap)?;
    }
    let body = InstanceSnapshotsPost {
        name: snap,
        expires_at: args.expires_at.unwrap_or_default(),
        stateful: false,
    };
    client
        .run(Method::POST, &snapshots_path(name), Some(&body))
        .await?;
    Ok(0)
}

/// `restore`: `PUT /1.0/instances/NAME {"restore": SNAP}`, then waits.
pub async fn restore(ctx: &Ctx, args: RestoreArgs) -> anyhow::Result<i32> {
    let (client, name) = ctx.resolve(&args.name)?;
    check_instance_name(name)?;
    // `lxc restore c1 c1/snap0` names the instance twice; accept that spelling too.
    let snap = match args.snapshot.split_once('/') {
        Some((inst, snap)) if inst == name => snap,
        _ => args.snapshot.as_str(),
    };
    check_snapshot_name(snap)?;
    let body = InstancePut {
        restore: snap.to_string(),
        ..Default::default()
    };
    client
        .run(
            Method::PUT,
            &super::instance::instance_path(name),
            Some(&body),
        )
        .await?;
    Ok(0)
}

/// Deletes one snapshot and waits.
pub async fn delete_snapshot(client: &Client, instance: &str, snap: &str) -> anyhow::Result<()> {
    client
        .run::<()>(Method::DELETE, &snapshot_path(instance, snap), None)
        .await?;
    Ok(())
}

/// Renames one snapshot and waits.
pub async fn rename_snapshot(
    client: &Client,
    instance: &str,
    snap: &str,
    new: &str,
) -> anyhow::Result<()> {
    check_snapshot_name(new)?;
    client
        .run(
            Method::POST,
            &snapshot_path(instance, snap),
            Some(&InstanceSnapshotPost { name: new.into() }),
        )
        .await?;
    Ok(())
}

/// The snapshots of an instance with their sizes (`?recursion=1`).
pub async fn list_snapshots(
    client: &Client,
    instance: &str,
) -> anyhow::Result<Vec<InstanceSnapshot>> {
    super::list_objects(client, &snapshots_path(instance)).await
}

/// An RFC 3339 time as lxc prints it in tables (`2026/11/30 02:05 UTC`); other text as it is.
pub fn table_time(t: &str) -> String {
    let b = t.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    let shaped = b.len() >= 16
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && (b[10] == b'T' || b[10] == b' ')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16);
    if !shaped || !(t.ends_with('Z') || t.ends_with("+00:00")) {
        return t.to_string();
    }
    format!("{}/{}/{} {} UTC", &t[0..4], &t[5..7], &t[8..10], &t[11..16])
}

/// The `Snapshots:` table of `berth info` (empty text when there are none).
pub fn render_snapshots(snaps: &[InstanceSnapshot]) -> anyhow::Result<String> {
    if snaps.is_empty() {
        return Ok(String::new());
    }
    let rows: Vec<Vec<String>> = snaps
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                table_time(&s.created_at),
                table_time(&s.expires_at),
                if s.size == 0 {
                    String::new()
                } else {
                    human_bytes(s.size)
                },
                if s.stateful { "YES" } else { "NO" }.into(),
            ]
        })
        .collect();
    let table = output::render(
        Format::Table,
        &["NAME", "TAKEN AT", "EXPIRES AT", "SIZE", "STATEFUL"],
        &rows,
        snaps,
    )?;
    Ok(format!("\nSnapshots:\n{table}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_arguments() {
        assert_eq!(split_snapshot("web1").unwrap(), ("web1", None));
        assert_eq!(
            split_snapshot("web1/snap0").unwrap(),
            ("web1", Some("snap0"))
        );
        assert!(split_snapshot("web1/").is_err());
        assert!(split_snapshot("web1/a/b").is_err());
        assert!(split_snapshot("/snap0").is_err());
        assert!(check_snapshot_name(&"s".repeat(64)).is_err());
        assert!(check_snapshot_name(&"é".repeat(40)).is_err());
        assert!(check_snapshot_name("before-upgrade.1").is_ok());
        assert!(check_snapshot_name("a..b").is_err());
        assert_eq!(
            snapshot_path("web1", "before upgrade"),
            "/1.0/instances/web1/snapshots/before%20upgrade"
        );
    }

    #[test]
    fn times_as_lxc_prints_them() {
        assert_eq!(table_time("2026-11-30T02:05:09Z"), "2026/11/30 02:05 UTC");
        assert_eq!(
            table_time("2026-11-30T02:05:09.123+00:00"),
            "2026/11/30 02:05 UTC"
        );
        assert_eq!(table_time(""), "");
        assert_eq!(
            table_time("2026-11-30T02:05:09+02:00"),
            "2026-11-30T02:05:09+02:00"
        );
        assert_eq!(table_time("soon"), "soon");
    }

    #[test]
    fn snapshots_table() {
        assert_eq!(render_snapshots(&[]).unwrap(), "");
        let snaps = vec![
            InstanceSnapshot {
                name: "snap0".into(),
                created_at: "2026-11-30T02:05:09Z".into(),
                size: 3 << 20,
                ..Default::default()
            },
            InstanceSnapshot {
                name: "daily".into(),
                created_at: "2026-11-30T03:00:00Z".into(),
                expires_at: "2026-12-14T03:00:00Z".into(),
                scheduled: true,
                ..Default::default()
            },
        ];
        let text = render_snapshots(&snaps).unwrap();
        assert!(text.starts_with("\nSnapshots:\n+"), "{text}");
        assert!(
            text.contains(
                "| snap0 | 2026/11/30 02:05 UTC |                      | 3.00MiB | NO       |"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "| daily | 2026/11/30 03:00 UTC | 2026/12/14 03:00 UTC |         | NO       |"
            ),
            "{text}"
        );
    }
}
