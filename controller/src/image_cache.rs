//! Cached copies of images expire (the leader's slow pass).
//!
//! A node that pulled an image from a peer holds a cached copy (a location not in the image's
//! `origins`). When no instance on that node was made from the image and the image was last
//! used (or, never used, uploaded) longer ago than `images.remote_cache_expiry` days (cluster
//! config, default 10, 0 = never), the copy is deleted on the node and the location removed.
//! The nodes that built, imported or published an image keep it, and an image never loses its
//! last location.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use berth_proto::v1;
use tracing::{info, warn};

use crate::api::AppState;
use crate::state::{Command, NodeStatus, State};

/// Cluster config key: days a cached copy may stay unused (0 = never expire).
pub const EXPIRY_KEY: &str = "images.remote_cache_expiry";

/// Days when the key is unset.
pub const DEFAULT_EXPIRY_DAYS: u64 = 10;

/// The largest value accepted (a century).
const MAX_EXPIRY_DAYS: u64 = 36_500;

/// Parses `images.remote_cache_expiry`: whole days, 0 to 36500.
pub fn parse_expiry(value: &str) -> Result<u64, String> {
    value
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|d| *d <= MAX_EXPIRY_DAYS)
        .ok_or_else(|| {
            format!(
                "{EXPIRY_KEY} \"{}\" must be a number of days from 0 (never) to {MAX_EXPIRY_DAYS}",
                value.escape_debug()
            )
        })
}

/// The expiry in force, in days (0 = never).
pub fn expiry_days(state: &State) -> u64 {
    state
        .cluster
        .config
        .get(EXPIRY_KEY)
        .and_then(|v| parse_expiry(v).ok())
        .unwrap_or(DEFAULT_EXPIRY_DAYS)
}

/// The cached copies to drop, as `(fingerprint, node)`, for a cut-off `cutoff` (RFC 3339:
/// copies of images last used, or never used and uploaded, before it). Never an origin, never
/// a copy an instance on that node was made from, and never the last location of an image (of
/// several expired copies of an image without another location, the first by name stays).
pub fn expired_copies(state: &State, cutoff: &str) -> Vec<(String, String)> {
    let mut in_use: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for i in state.instances.values() {
        in_use
            .entry(i.image.as_str())
            .or_default()
            .insert(i.node.as_str());
    }
    let mut out = Vec::new();
    for image in state.images.values() {
        let since = if image.last_used_at.is_empty() {
            &image.uploaded_at
        } else {
            &image.last_used_at
        };
        // An image without any date is left alone: nothing says it is old.
        if since.is_empty() || since.as_str() >= cutoff {
            continue;
        }
        let used = in_use.get(image.fingerprint.as_str());
        let (drop, keep): (Vec<&String>, Vec<&String>) = image.locations.iter().partition(|node| {
            !image.origins.contains(*node) && !used.is_some_and(|u| u.contains(node.as_str()))
        });
        let skip = usize::from(keep.is_empty());
        out.extend(
            drop.into_iter()
                .skip(skip)
                .map(|node| (image.fingerprint.clone(), node.clone())),
        );
    }
    out
}

/// The cut-off for `days` of expiry from now; `None` when copies never expire.
fn cutoff(days: u64) -> Option<String> {
    (days > 0).then(|| crate::clock::ago(Duration::from_secs(days.saturating_mul(86_400))))
}

/// Deletes the expired cached copies (leader only; called by the reconciler's slow pass).
/// Copies on offline nodes wait for the node to return.
pub async fn expire(state: &Arc<AppState>) {
    let work = state.cp.read_local(|s| {
        let Some(cutoff) = cutoff(expiry_days(s)) else {
            return Vec::new();
        };
        expired_copies(s, &cutoff)
            .into_iter()
            .filter_map(|(fp, node)| {
                s.nodes
                    .get(&node)
                    .filter(|n| n.status == NodeStatus::Online)
                    .cloned()
                    .map(|n| (fp, n))
            })
            .collect::<Vec<_>>()
    });
    for (fingerprint, node) in work {
        // The location goes first: a create on that node from now on pulls the image again
        // instead of counting on a copy that is about to be deleted.
        if let Err(e) = state
            .cp
            .write(Command::SetImageLocation {
                fingerprint: fingerprint.clone(),
                node: node.name.clone(),
                present: false,
            })
            .await
        {
            warn!(image = %fingerprint, node = %node.name, error = %e, "could not forget a cached image copy; it stays");
            continue;
        }
        let deleted = match state.agents.client(&node) {
            Ok(mut client) => client
                .delete_image(crate::agents::short(v1::DeleteImageRequest {
                    fingerprint: fingerprint.clone(),
                }))
                .await
                .map(|_| ())
                .or_else(|e| match e.code() {
                    tonic::Code::NotFound => Ok(()),
                    _ => Err(e.message().to_string()),
                }),
            Err(e) => Err(e.to_string()),
        };
        match deleted {
            Ok(()) => {
                info!(image = %fingerprint, node = %node.name, "cached image copy expired and removed")
            }
            // The bytes stay on the node until a later pull finds them and records them again.
            Err(error) => {
                warn!(image = %fingerprint, node = %node.name, %error, "cached image copy forgotten but not deleted from its node")
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::state::{Image, Instance};

    fn image(fp: &str, locations: &[&str], origins: &[&str], last_used: &str) -> Image {
        Image {
            fingerprint: fp.into(),
            locations: locations.iter().map(|s| s.to_string()).collect(),
            origins: origins.iter().map(|s| s.to_string()).collect(),
            last_used_at: last_used.into(),
            uploaded_at: "2026-01-01T00:00:00Z".into(),
            ..Default::default()
        }
    }

    #[test]
    fn expiry_parses_days() {
        assert_eq!(parse_expiry("10"), Ok(10));
        assert_eq!(parse_expiry(" 0 "), Ok(0));
        assert!(parse_expiry("-1").is_err());
        assert!(parse_expiry("1d").is_err());
        assert!(parse_expiry("36501").is_err());
        let mut s = State::default();
        assert_eq!(expiry_days(&s), DEFAULT_EXPIRY_DAYS);
        s.cluster.config.insert(EXPIRY_KEY.into(), "0".into());
        assert_eq!(expiry_days(&s), 0);
        assert_eq!(cutoff(0), None);
        assert!(cutoff(1).is_some());
    }

    #[test]
    fn only_unused_old_cached_copies_expire() {
        let cutoff = "2026-06-01T00:00:00Z";
        let old = "2026-05-01T00:00:00Z";
        let recent = "2026-06-02T00:00:00Z";
        let mut s = State::default();
        for img in [
            // n1 built it; n2 and n3 pulled it; an instance on n3 uses it.
            image("old", &["n1", "n2", "n3"], &["n1"], old),
            // Used recently: every copy stays.
            image("recent", &["n1", "n2"], &["n1"], recent),
            // Never used: its upload date counts (long ago).
            image("unused", &["n1", "n2"], &["n1"], ""),
            // Its origin left the cluster: of two cached copies one stays.
            image("orphan", &["n4", "n5"], &["n9"], old),
            // A single cached copy is the last location: it stays.
            image("last", &["n2"], &[], old),
        ] {
            s.images.insert(img.fingerprint.clone(), img);
        }
        s.instances.insert(
            "web".into(),
            Instance {
                name: "web".into(),
                node: "n3".into(),
                image: "old".into(),
                ..Default::default()
            },
        );
        let mut got = expired_copies(&s, cutoff);
        got.sort();
        let want: Vec<(String, String)> = [("old", "n2"), ("orphan", "n5"), ("unused", "n2")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(got, want);
        // No date at all: left alone.
        let mut undated = image("undated", &["n1", "n2"], &["n1"], "");
        undated.uploaded_at.clear();
        s.images.insert("undated".into(), undated);
        assert_eq!(expired_copies(&s, cutoff).len(), 3);
    }
}
